"""data/sft.py: SFT examples from generate.py's JSONL and the SurgeGlobal column layouts; tokenisation.

Fixtures are tiny JSONL files written here; the tokenizer is a small SentencePiece model trained on the fly
(model/tokenizer.py's train_tokenizer) on the template and made-up text. Expected prompts are the template
written out by hand, so a change in data/template.py's layout shows up here too.
"""

import gzip
import json
import re

import pytest

from data.sft import DataStats, Example, keep_tail, sft_examples, tokenize_example, tokenize_examples
from data.template import DEFAULT_SYSTEM, RESPONSE_MARKER
from model.tokenizer import Tokenizer, train_tokenizer

WORDS = "name three rivers the nile flows north through egypt and sudan into the sea a bezoar is a mass".split()


def expected_prompt(instruction, system=DEFAULT_SYSTEM):
    return f"### System:\n{system}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def write_jsonl(path, records, gz=False):
    with (gzip.open if gz else open)(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    lines = [DEFAULT_SYSTEM, expected_prompt("x")] + [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    return Tokenizer(train_tokenizer(lines, tmp_path_factory.mktemp("tok") / "tiny", 300))


GENERATED = [
    {"id": "lamini-0", "scheme": "lamini", "instruction": "Name three rivers.", "input": "", "response": " Nile. ",
     "system": "", "topic": "geography", "judge_rating": 5, "judge_reason": "fine"},
    {"id": "evol-0", "scheme": "evol", "instruction": "Sum the numbers.", "input": "2, 3",
     "response": "5", "system": None, "in_depth": "deepening"},
    {"id": "orca-0", "scheme": "orca", "instruction": "Is the sky green?", "input": "  ",
     "response": "No.", "system": "You are a teacher. Explain step by step."},
]


# --- reading ---

@pytest.mark.parametrize("gz", [False, True])
def test_generated_records_map_into_the_template_with_input_and_system(tmp_path, gz):
    path = write_jsonl(tmp_path / ("gen.jsonl.gz" if gz else "gen.jsonl"), GENERATED, gz)
    examples, stats = sft_examples(path)
    assert examples == [
        Example(expected_prompt("Name three rivers."), "Nile.", "lamini-0", "lamini"),
        Example(expected_prompt("Sum the numbers.\n\n2, 3"), "5", "evol-0", "evol"),
        Example(expected_prompt("Is the sky green?", "You are a teacher. Explain step by step."), "No.", "orca-0",
                "orca")]
    assert (stats["read"], stats["used"]) == (3, 3)


def test_released_surgeglobal_columns_are_detected_and_mapped(tmp_path):
    lamini = write_jsonl(tmp_path / "lamini.jsonl", [
        {"instruction": "Name a river.", "source": "dolly", "response": "The Nile.", "gpt4_rating": 4}])
    evol = write_jsonl(tmp_path / "evol.jsonl", [
        {"instruction": "Name two rivers.", "response": "Nile, Amazon.", "category": "open_qa",
         "evolution_strategy": "in-depth", "in-depth-evolving_operation": "deepening", "epoch": 1}])
    orca = write_jsonl(tmp_path / "orca.jsonl", [
        {"original_index": 7, "inputs": "Is water wet?", "targets": "yes", "task_source": "flan",
         "task_name": "boolq", "template_type": "zs_opt", "system_message": "Answer like a teacher.",
         "explained_targets": "Yes, because …"},
        {"original_index": 8, "inputs": "Is ice hot?", "targets": "no", "task_source": "flan", "task_name": "boolq",
         "template_type": "zs_opt", "system_message": "", "explained_targets": "No."}])
    examples, stats = sft_examples([lamini, evol, orca])
    assert [(e.prompt, e.response, e.source) for e in examples] == [
        (expected_prompt("Name a river."), "The Nile.", "lamini"),
        (expected_prompt("Name two rivers."), "Nile, Amazon.", "evol_instruct"),
        (expected_prompt("Is water wet?", "Answer like a teacher."), "Yes, because …", "orca"),
        (expected_prompt("Is ice hot?"), "No.", "orca")]                  # empty system → the default
    assert [e.id for e in examples] == [f"{lamini}:1", f"{evol}:1", f"{orca}:1", f"{orca}:2"]
    assert stats["read"] == stats["used"] == 4
    with pytest.raises(ValueError, match=re.escape(f"{lamini}:1: field 'inputs' is missing, expected a string")):
        sft_examples(lamini, format="orca")
    with pytest.raises(ValueError, match="format='parquet'"):
        sft_examples(lamini, format="parquet")


def test_a_malformed_line_names_file_and_line_unless_skip_bad_counts_it(tmp_path):
    path = write_jsonl(tmp_path / "gen.jsonl", [GENERATED[0], "{not json", GENERATED[1] | {"response": 5}, "[1, 2]",
                                                GENERATED[2]])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not valid JSON")):
        sft_examples(path)
    other = write_jsonl(tmp_path / "g2.jsonl", [GENERATED[0], GENERATED[0], GENERATED[1] | {"response": 5}])
    with pytest.raises(ValueError, match=re.escape(f"{other}:3: field 'response' is int, expected a string")):
        sft_examples(other)
    examples, stats = sft_examples(path, skip_bad=True)
    assert [e.id for e in examples] == ["lamini-0", "orca-0"]
    assert stats["read"] == 5 and stats["bad line"] == 3
    assert stats.where["bad line"] == [f"{path}:{i}" for i in (2, 3, 4)]
    with pytest.raises(ValueError, match="cannot tell the data format"):
        sft_examples(write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}]))
    with pytest.raises(ValueError, match="file not found"):
        sft_examples(tmp_path / "missing.jsonl")


def test_empty_responses_and_instructions_are_rejected_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "gen.jsonl", [GENERATED[0] | {"response": " \n "}, GENERATED[1],
                                                GENERATED[2] | {"instruction": ""}, "", GENERATED[0] | {"id": "x"}])
    examples, stats = sft_examples(path, first_n=3)
    assert [e.id for e in examples] == ["evol-0"]
    assert str(stats) == (f"gen.jsonl: read 3, empty response 1 (first at {path}:1), used 1, "
                          f"empty instruction 1 (first at {path}:3)")


# --- tokenising ---

def test_labels_mask_the_prompt_and_keep_the_response_with_eos(tok):
    ex = Example(expected_prompt("Name three rivers."), "the nile flows north", "0", "generated")
    row = tokenize_example(tok, ex, max_len=512)
    prompt_ids, response_ids = tok.encode(ex.prompt), tok.encode(ex.response, bos=False)
    assert row["input_ids"] == prompt_ids + response_ids + [tok.eos_id]
    assert row["input_ids"][0] == tok.bos_id and row["input_ids"].count(tok.bos_id) == 1
    assert row["labels"] == [-100] * len(prompt_ids) + response_ids + [tok.eos_id]
    assert tok.decode(row["labels"][len(prompt_ids):]) == ex.response


def test_a_too_long_prompt_is_cut_from_the_left_keeping_bos_and_the_whole_response(tok):
    ex = Example(expected_prompt(" ".join(WORDS * 8)), "a bezoar is a mass", "long", "generated")
    full_prompt, response = tok.encode(ex.prompt), tok.encode(ex.response, bos=False, eos=True)
    max_len = len(tok.encode(expected_prompt("Hi"))) + len(response)
    assert len(full_prompt) + len(response) > max_len
    stats = DataStats()
    row = tokenize_example(tok, ex, max_len, min_prompt_len=16, stats=stats)
    kept = max_len - len(response)
    assert row["input_ids"] == [tok.bos_id] + full_prompt[-(kept - 1):] + response
    assert row["labels"] == [-100] * kept + response
    assert tok.decode(row["input_ids"][:kept]).endswith(RESPONSE_MARKER)
    assert (stats["truncated prompt"], stats["truncated response"]) == (1, 0)
    assert keep_tail([1, 5, 6, 7, 8], 3) == [1, 7, 8]


def test_a_response_too_long_alone_is_cut_on_the_right_after_min_prompt_len(tok):
    long_response = " ".join(WORDS * 10)
    response = tok.encode(long_response, bos=False, eos=True)
    short, long = Example(expected_prompt("Hi"), long_response, "s", "generated"), \
        Example(expected_prompt(" ".join(WORDS * 4)), long_response, "l", "generated")
    P = len(tok.encode(short.prompt))
    # (example, max_len, min_prompt_len): a long prompt is cut to min_prompt_len; a shorter one is kept whole
    for ex, max_len, min_prompt_len in [(long, P + 40, P), (short, P + 20, P + 10)]:
        prompt = tok.encode(ex.prompt)
        assert len(response) > max_len
        stats = DataStats()
        row = tokenize_example(tok, ex, max_len, min_prompt_len=min_prompt_len, stats=stats)
        kept = min(len(prompt), min_prompt_len)                     # the prompt keeps this many tokens
        assert row["input_ids"] == keep_tail(prompt, kept) + response[:max_len - kept]
        assert row["labels"] == [-100] * kept + response[:max_len - kept]
        assert tok.eos_id not in row["input_ids"]                   # the cut response has no EOS
        assert stats["truncated response"] == 1 and stats["truncated prompt"] == (kept < len(prompt))
    with pytest.raises(ValueError, match="min_prompt_len < max_len"):
        tokenize_example(tok, short, 16, min_prompt_len=16)


def test_tokenize_examples_reports_every_truncation(tok):
    short = Example(expected_prompt("Hi"), "the nile", "a", "generated")
    long = Example(expected_prompt(" ".join(WORDS * 8)), "a mass", "b", "generated")
    max_len = len(tok.encode(short.prompt + short.response)) + 8
    rows, stats = tokenize_examples(tok, [short, long, short], max_len=max_len, min_prompt_len=16)
    assert rows[0] == rows[2] == tokenize_example(tok, short, max_len) and len(rows[1]["input_ids"]) == max_len
    assert str(stats) == "tokenize: tokenized 3, truncated prompt 1 (first at b)"


def test_a_cut_off_gzip_file_is_an_error_naming_the_file(tmp_path):
    whole = write_jsonl(tmp_path / "gen.jsonl.gz", GENERATED * 200, gz=True).read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=re.escape(f"{cut}:") + r"\d+: cannot read"):
        sft_examples(cut)


def test_filter_output_for_released_rows_reads_as_the_generated_schema(tmp_path):
    # filter.py keeps a released row's own columns next to the schema's: `scheme` decides the format
    row = {"original_index": 7, "inputs": "Is water wet?", "explained_targets": "Yes.", "system_message": "",
           "id": "orca-000001", "scheme": "orca", "instruction": "Is water wet?", "input": "", "response": "Yes.",
           "system": "", "judge_rating": 9}
    examples, _ = sft_examples(write_jsonl(tmp_path / "filtered.jsonl", [row]))
    assert examples == [Example(expected_prompt("Is water wet?"), "Yes.", "orca-000001", "orca")]
