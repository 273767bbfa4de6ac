"""files.py: a file is replaced whole or not at all, and JSON lines are read with errors naming file:line."""
import gzip
import json
import os
import re

import pytest

from files import atomic_write, iter_jsonl, read_jsonl, write_jsonl_atomic, write_text_atomic


# --- writing ---------------------------------------------------------------------------------------

def test_atomic_write_replaces_the_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "out.txt"                   # the folder is created
    write_text_atomic(path, "first\n")
    write_text_atomic(path, "second — ü\n")
    assert path.read_text(encoding="utf-8") == "second — ü\n"
    assert os.listdir(path.parent) == ["out.txt"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_write_that_fails_half_way_leaves_the_old_file_and_no_temp_file(tmp_path, error):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def half_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"new, half")
        raise error

    with pytest.raises(type(error)):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_a_temp_file_left_by_a_killed_writer_is_replaced_by_the_next_write(tmp_path):
    path = tmp_path / "out.txt"
    (tmp_path / "out.txt.tmp").write_text("half")          # what SIGKILL mid-write leaves
    write_text_atomic(path, "whole")
    assert path.read_text() == "whole" and os.listdir(tmp_path) == ["out.txt"]


def test_jsonl_round_trips_plain_and_gzip_with_exact_line_numbers(tmp_path):
    records = [{"id": "a", "text": "naïve → ok"}, {"id": "b", "n": [1, 2]}]
    for name in ("r.jsonl", "r.jsonl.gz"):
        path = write_jsonl_atomic(tmp_path / name, records)
        raw = (gzip.open if name.endswith(".gz") else open)(path, "rb").read()
        assert raw == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        assert list(iter_jsonl(path)) == [(1, records[0]), (2, records[1])]
    assert sorted(os.listdir(tmp_path)) == ["r.jsonl", "r.jsonl.gz"]


# --- reading ---------------------------------------------------------------------------------------

def test_line_numbers_count_every_newline_including_blank_lines_and_crlf(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\r\n\n   \n{"a": 2}\n{"a": 3}')             # no newline after the last line
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2}), (5, {"a": 3})]


def test_bytes_that_are_not_utf8_name_their_line_and_byte_offset(tmp_path):
    path = tmp_path / "in.jsonl"
    head = b"".join(b'{"i": %d, "text": "\xc3\xa9t\xc3\xa9"}\n' % i for i in range(5000))  # é: two bytes each
    path.write_bytes(head + b'{"i": "bad \xff"}\n{"i": 1}\n')
    offset = len(head) + len(b'{"i": "bad ')                                        # where \xff sits
    with pytest.raises(ValueError, match=re.escape(f"{path}:5001: not UTF-8 at byte offset {offset} ")):
        read_jsonl(path)
    rows, bad = read_jsonl(path, skip_bad=True)
    assert (len(rows), bad, rows[-1]) == (5001, 1, (5002, {"i": 1}))


def test_a_bad_line_is_an_error_naming_file_and_line_unless_skip_bad_counts_it(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = ['{"id": "a"}', "{not json", "[1, 2]", '{"id": 3}', '{"id": "b"}']
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not valid JSON")):
        read_jsonl(path)
    assert list(iter_jsonl(path, skip_bad=True)) == [(1, {"id": "a"}), (2, None), (3, None), (4, {"id": 3}),
                                                     (5, {"id": "b"})]
    assert read_jsonl(path, {"id": str}, skip_bad=True) == ([(1, {"id": "a"}), (5, {"id": "b"})], 3)
    path.write_text("\n".join([lines[0], "", lines[2]]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: expected a JSON object, got list")):
        read_jsonl(path)
    path.write_text("\n".join([lines[0], "", "", lines[3]]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:4: field 'id' should be str, got int")):
        read_jsonl(path, {"id": str})


def test_a_missing_or_cut_off_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'no.jsonl'}: file not found (expected JSONL)")):
        read_jsonl(tmp_path / "no.jsonl")
    whole = write_jsonl_atomic(tmp_path / "r.jsonl.gz", [{"id": str(i) * 50} for i in range(2000)])
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(open(whole, "rb").read()[:4000])
    with pytest.raises(ValueError, match=re.escape(f"{cut}:") + r"\d+: cannot read"):
        read_jsonl(cut, skip_bad=True)                    # skip_bad skips lines, never a broken file
