"""Bad input on the command line ends in one line on stderr and a non-zero exit, for every script
(config.run_cli); `--debug` adds the traceback. Locations are exact: a byte that is not UTF-8 on line 121
of an SFT file is reported as line 121, with its byte offset."""
import gzip
import json
import subprocess
import sys

import pytest

from micro_model import ENV, REPO, micro_model


def run(*argv):
    """(return code, stdout, stderr lines) of `python argv…` from the repository root."""
    p = subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, env=ENV, capture_output=True, text=True,
                       timeout=120)
    return p.returncode, p.stdout, p.stderr.splitlines()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return micro_model(tmp_path_factory.mktemp("base"))[0]


def sft_toml(tmp, base, data, **top):
    settings = dict(base=str(base), dtype="float32", device="cpu", batch_size=8, micro_batch_size=2, max_len=128,
                    min_prompt_len=16, **top)
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    lines += ["[[stages]]", 'name = "lamini"', 'scheme = "lamini"', f"data = [{json.dumps(str(data))}]"]
    path = tmp / "sft.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def records_with_bad_byte(line):
    """Lines of SFT records, the `line`-th holding a Latin-1 byte (not UTF-8) in its response."""
    rows = [json.dumps({"instruction": f"say {i}", "response": f"{i}"}).encode() for i in range(1, 131)]
    rows[line - 1] = b'{"instruction": "say caf\xe9", "response": "x"}'
    return b"\n".join(rows) + b"\n", sum(len(r) + 1 for r in rows[:line - 1]) + len(b'{"instruction": "say caf')


def test_train_sft_reports_a_missing_data_file_and_a_bad_byte_in_one_line_and_debug_shows_the_traceback(
        tmp_path, base):
    missing = tmp_path / "nope.jsonl"
    code, _, err = run("train_sft.py", "--config", sft_toml(tmp_path, base, missing), "--out_dir", tmp_path / "a")
    assert code == 1 and err == [f"{missing}: file not found (expected JSONL)"], err
    code, _, err = run("train_sft.py", "--config", sft_toml(tmp_path, base, missing), "--out_dir", tmp_path / "b",
                       "--debug")
    assert code == 1 and err[0] == "Traceback (most recent call last):" and err[-1].endswith("file not found "
                                                                                              "(expected JSONL)")
    data = tmp_path / "lamini.jsonl"
    raw, offset = records_with_bad_byte(121)
    data.write_bytes(raw)
    code, _, err = run("train_sft.py", "--config", sft_toml(tmp_path, base, data), "--out_dir", tmp_path / "c")
    assert code == 1 and err == [f"{data}:121: not UTF-8 at byte offset {offset} (invalid continuation byte)"], err


def test_sft_reader_names_line_121_of_plain_and_gzip_files_with_the_byte_offset(tmp_path):
    from data.sft import sft_examples
    raw, offset = records_with_bad_byte(121)
    for name, content in (("a.jsonl", raw), ("a.jsonl.gz", gzip.compress(raw))):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError) as e:
            sft_examples([str(path)])
        assert str(e.value) == f"{path}:121: not UTF-8 at byte offset {offset} (invalid continuation byte)"


def test_train_sft_config_values_out_of_range_or_quoted_are_one_line(tmp_path, base):
    data = tmp_path / "lamini.jsonl"
    for value, expected in (('"2e-3"', "is '2e-3', a string (TOML: write the number without quotes), expected float"),
                            ("nan", "is nan, expected a finite number > 0"),
                            ("-2e-3", "is -0.002, expected a finite number > 0")):
        toml = sft_toml(tmp_path, base, data)
        toml.write_text(f"lr = {value}\n" + toml.read_text())
        code, _, err = run("train_sft.py", "--config", toml, "--out_dir", tmp_path / "x")
        assert code == 1 and err == [f"{toml}: key 'lr' {expected}"], err


def test_train_dpo_reports_a_missing_data_file_in_one_line(tmp_path, base):
    missing = tmp_path / "pairs.jsonl.gz"
    code, _, err = run("train_dpo.py", "--base", base, "--out_dir", tmp_path / "dpo", "--device", "cpu",
                       "--data", missing, "--eval_data", missing)
    assert code == 1 and err == [f"{missing}: file not found (expected gzip-compressed JSONL)"], err


def test_generate_filter_and_mt_bench_report_a_missing_input_in_one_line(tmp_path):
    missing = tmp_path / "nope.jsonl"
    code, _, err = run("generate.py", "--scheme", "orca", "--tasks", missing, "--out", tmp_path / "o.jsonl",
                       "--generator-url", "http://127.0.0.1:9", "--generator-model", "m")
    assert code == 1 and err == [f"{missing}: file not found (expected JSONL)"], err
    code, _, err = run("filter.py", "--in", missing, "--out", tmp_path / "j.jsonl", "--filtered", tmp_path / "f.jsonl",
                       "--rating-column", "gpt4_rating")
    assert code == 1 and err == [f"{missing}: file not found (expected JSONL)"], err
    code, _, err = run("evaluate.py", "mt-bench", "--answers-from", tmp_path / "a.jsonl", "--no-judge",
                       "--questions", missing, "--out-dir", tmp_path / "mt")
    assert code == 1 and err == [f"{missing}: file not found (expected JSONL)"], err
    code, _, err = run("filter.py", "--in", missing, "--out", tmp_path / "j.jsonl", "--filtered", tmp_path / "f.jsonl",
                       "--rating-column", "gpt4_rating", "--debug")
    assert code == 1 and "Traceback (most recent call last):" in err and len(err) > 3
