"""data/hh.py: HH-RLHF transcripts split, parsed and mapped into the template; SFT examples and DPO pairs.

The real test splits in ../shared/data/hh-rlhf serve the checks on real data (8552 records, read in ~1 s).
The per-subset count of records whose two sides differ before their last "\\n\\nAssistant:" (5, 9, 0, 3)
is the one documented in ../shared/data/README.md §1; every other expectation is derived here.
Hand-made fixtures (gzip JSONL in tmp_path) cover the rare cases one by one.
"""

import gzip
import json
import os
import re
from pathlib import Path

import pytest

from data.hh import (ASSISTANT, HH_SUBSETS, HUMAN, dialogue_prompt, hh_example, hh_files, hh_pairs,
                     hh_sft_examples, parse_turns, split_transcript)
from data.template import DEFAULT_SYSTEM, RESPONSE_MARKER

HH_ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-rlhf"
DOCUMENTED_MISMATCHES = {"harmless-base": 5, "helpful-base": 9, "helpful-online": 0,
                         "helpful-rejection-sampled": 3}


def expected_prompt(instruction):
    """The template written out by hand (the model cards' layout), independent of data/template.py's code."""
    return f"### System:\n{DEFAULT_SYSTEM}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def write_gz(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def real_records(subset):
    with gzip.open(hh_files(HH_ROOT, "test", [subset])[0], "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --- real data ---

def test_the_real_test_files_hold_8552_records_in_hf_subset_order():
    paths = hh_files(HH_ROOT, "test")
    assert [Path(p).parent.name for p in paths] == list(HH_SUBSETS)
    assert HH_SUBSETS == ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
    assert sum(len(real_records(s)) for s in HH_SUBSETS) == 8552


def test_prompt_plus_response_is_the_transcript_and_normal_pairs_share_the_prompt():
    normal = 0
    for subset in HH_SUBSETS:
        for record in real_records(subset):
            splits = [split_transcript(record[side]) for side in ("chosen", "rejected")]
            for (prompt, response), side in zip(splits, ("chosen", "rejected")):
                assert prompt + response == record[side]
                assert prompt.endswith(ASSISTANT) and ASSISTANT not in response
            if splits[0][0] == splits[1][0]:
                normal += 1
                # the shared prompt is exactly the longest common prefix, cut back to the last Assistant marker
                common = os.path.commonprefix([record["chosen"], record["rejected"]])
                assert splits[0][0] == common[:common.rfind(ASSISTANT) + len(ASSISTANT)]
    assert normal == 8552 - sum(DOCUMENTED_MISMATCHES.values())


def test_prompt_mismatches_are_5_9_0_3_by_subset_and_17_in_all():
    total = 0
    for subset in HH_SUBSETS:
        pairs, stats = hh_pairs(hh_files(HH_ROOT, "test", [subset]))
        assert stats["prompt mismatch"] == DOCUMENTED_MISMATCHES[subset], str(stats)
        total += stats["prompt mismatch"]
    _, stats = hh_pairs(hh_files(HH_ROOT, "test"))
    assert stats["prompt mismatch"] == total == 17
    assert "prompt mismatch 17 (first at " in str(stats) and "harmless-base/test.jsonl.gz:" in str(stats)


def test_every_real_record_is_either_used_or_counted_under_one_reason():
    for reader in (hh_pairs, hh_sft_examples):
        items, stats = reader(hh_files(HH_ROOT, "test"))
        skipped = sum(n for key, n in stats.counts.items() if key not in ("read", "used"))
        assert stats["read"] == 8552 and stats["used"] == len(items) and stats["used"] + skipped == 8552
        assert stats["bad line"] == 0


def test_real_pairs_have_the_sft_prompt_and_clean_distinct_responses():
    pairs, pair_stats = hh_pairs(hh_files(HH_ROOT, "test", ["helpful-base"]))
    examples, _ = hh_sft_examples(hh_files(HH_ROOT, "test", ["helpful-base"]))
    sft_prompt = {ex.id: ex.prompt for ex in examples}
    records = real_records("helpful-base")
    for pair in pairs:
        assert pair.prompt.startswith(expected_prompt("")[:20]) and pair.prompt.endswith(RESPONSE_MARKER)
        assert pair.prompt == sft_prompt[pair.id]             # one mapping for both stages
        assert pair.chosen and pair.rejected and pair.chosen != pair.rejected
        assert pair.chosen == pair.chosen.strip() and HUMAN not in pair.chosen + pair.rejected
        line = int(pair.id.rsplit(":", 1)[1])
        assert records[line - 1]["chosen"].endswith(pair.chosen)   # no blank lines: line n is record n
        assert pair.source == "hh-rlhf/helpful-base"
    assert pair_stats["identical responses"] == sum(
        split_transcript(r["chosen"])[1].strip() == split_transcript(r["rejected"])[1].strip()
        and split_transcript(r["chosen"])[0] == split_transcript(r["rejected"])[0]
        and split_transcript(r["chosen"])[1].strip() != "" for r in records)


# --- the template mapping ---

def test_a_single_turn_becomes_a_plain_instruction():
    prompt, response = hh_example("\n\nHuman: What is a bezoar?\n\nAssistant:  A mass in the stomach. ")
    assert prompt == expected_prompt("What is a bezoar?")
    assert response == "A mass in the stomach."


def test_history_is_listed_by_role_with_the_question_to_answer_last():
    transcript = ("\n\nHuman: What is a bezoar?\n\nAssistant: A mass in the stomach.\n\nIt can be hair."
                  "\n\nHuman:  Is it dangerous? \n\nAssistant: It can be.")
    prompt, response = hh_example(transcript)
    assert prompt == expected_prompt("Human: What is a bezoar?\nAssistant: A mass in the stomach.\n\nIt can be "
                                     "hair.\nHuman: Is it dangerous?")
    assert response == "It can be."
    assert dialogue_prompt(parse_turns(split_transcript(transcript)[0])[:-1]) == prompt


def test_parse_turns_rejects_malformed_dialogues_with_the_reason():
    assert parse_turns("\n\nHuman: a\n\nAssistant: b") == [("Human", "a"), ("Assistant", "b")]
    assert parse_turns("\n\nHuman: a\n\nAssistant:") == [("Human", "a"), ("Assistant", "")]
    for text, reason in [("Human: a\n\nAssistant: b", "does not start"),
                         ("\n\nAssistant: a\n\nHuman: b", "does not start"),
                         ("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c", "turn 3 is Assistant, expected Human"),
                         ("\n\nHuman: a\n\nHuman: b", "turn 2 is Human, expected Assistant"),
                         ("\n\nHuman:  \n\nAssistant: b", "turn 1 (Human) is empty")]:
        with pytest.raises(ValueError, match=re.escape(reason)):
            parse_turns(text)
    with pytest.raises(ValueError, match="odd number"):
        dialogue_prompt([("Human", "a"), ("Assistant", "b")])


# --- fixtures: SFT side ---

def test_sft_reader_counts_malformed_and_empty_transcripts_with_file_and_line(tmp_path):
    good = "\n\nHuman: Hi\n\nAssistant: Hello."
    path = write_gz(tmp_path / "harmless-base" / "train.jsonl.gz", [
        {"chosen": good, "rejected": good},
        {"chosen": "Human: no marker\n\nAssistant: x", "rejected": good},                  # 2 malformed
        {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nAssistant: c", "rejected": good},       # 3 malformed
        {"chosen": "\n\nHuman: a\n\nAssistant: \n\nHuman: c\n\nAssistant: d", "rejected": good},  # 4 malformed
        {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: made up", "rejected": good},     # 5 malformed
        {"chosen": "\n\nHuman: a\n\nAssistant:   ", "rejected": good},                      # 6 empty
        "",                                                                                  # blank: not a record
        {"chosen": good, "rejected": "\n\nHuman: Hi\n\nAssistant: Bye."},
    ])
    examples, stats = hh_sft_examples(path)
    assert [ex.id for ex in examples] == [f"{path}:1", f"{path}:8"]
    assert examples[0].prompt == expected_prompt("Hi") and examples[0].response == "Hello."
    assert examples[0].source == "hh-rlhf/harmless-base"
    assert (stats["read"], stats["used"], stats["malformed"], stats["empty response"]) == (7, 2, 4, 1)
    assert stats.where["malformed"] == [f"{path}:2", f"{path}:3", f"{path}:4"]   # the first three kept
    assert str(stats) == (f"hh-rlhf sft: read 7, used 2, malformed 4 (first at {path}:2, {path}:3, {path}:4), "
                          f"empty response 1 (first at {path}:6)")


def test_a_broken_line_names_file_and_line_unless_skip_bad_counts_it(tmp_path):
    good = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: No."}
    path = write_gz(tmp_path / "helpful-base" / "test.jsonl.gz", [good, '{"chosen": "cut', {"chosen": "x"}, good])
    for reader in (hh_sft_examples, hh_pairs):
        with pytest.raises(ValueError, match=re.escape(f"{path}:2: not valid JSON")):
            reader(path)
        items, stats = reader(path, skip_bad=True)
        assert len(items) == 2 and stats["bad line"] == 2 and stats.where["bad line"] == [f"{path}:2", f"{path}:3"]
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: field 'rejected' is missing, expected a string")):
        hh_pairs(write_gz(path, [good, good, {"chosen": "x"}]))


def test_first_n_counts_records_across_subsets_in_order(tmp_path):
    for subset in HH_SUBSETS:
        write_gz(tmp_path / subset / "train.jsonl.gz", [
            {"chosen": f"\n\nHuman: {subset} {i}\n\nAssistant: yes",
             "rejected": f"\n\nHuman: {subset} {i}\n\nAssistant: no"}
            for i in range(2)])
    paths = hh_files(tmp_path)
    examples, stats = hh_sft_examples(paths, first_n=5)
    assert [ex.prompt for ex in examples] == [expected_prompt(f"{s} {i}") for s in HH_SUBSETS[:2] for i in range(2)] + \
        [expected_prompt("helpful-online 0")]
    assert stats["read"] == 5
    pairs, stats = hh_pairs(paths, first_n=7)
    assert len(pairs) == 7 and pairs[-1].source == "hh-rlhf/helpful-rejection-sampled"
    with pytest.raises(ValueError, match="helpful-online/test.jsonl.gz: HH-RLHF file not found"):
        hh_files(tmp_path, "test", ["helpful-online"])


# --- fixtures: DPO pairs ---

def test_identical_empty_mismatched_and_malformed_pairs_are_counted_and_skipped(tmp_path):
    p = "\n\nHuman: Name a river.\n\nAssistant: The Nile.\n\nHuman: Another?\n\nAssistant:"
    path = write_gz(tmp_path / "helpful-online" / "test.jsonl.gz", [
        {"chosen": p + " The Amazon.", "rejected": p + " No."},                            # 1 used
        {"chosen": p + " The Amazon.", "rejected": p + "  The Amazon. "},                  # 2 identical
        {"chosen": p + " The Amazon.", "rejected": p},                                     # 3 empty
        {"chosen": p + "  ", "rejected": p + " No."},                                      # 4 empty
        {"chosen": p + " The Amazon.", "rejected": "\n\nHuman: Name a river.\n\nAssistant: The Nile.\n\n"
                                                   "Humans: Another?\n\nAssistant: No."},    # 5 mismatch
        {"chosen": p + " Amazon.\n\nHuman: thanks", "rejected": p + " No."},               # 6 malformed
        {"chosen": p + " The Amazon.", "rejected": p + " The Amazon!"},                    # 7 used
    ])
    pairs, stats = hh_pairs(path)
    instruction = "Human: Name a river.\nAssistant: The Nile.\nHuman: Another?"
    assert [(x.prompt, x.chosen, x.rejected, x.id) for x in pairs] == [
        (expected_prompt(instruction), "The Amazon.", "No.", f"{path}:1"),
        (expected_prompt(instruction), "The Amazon.", "The Amazon!", f"{path}:7")]
    assert {k: stats[k] for k in ("read", "used", "identical responses", "empty response", "prompt mismatch",
                                  "malformed")} == {"read": 7, "used": 2, "identical responses": 1,
                                                    "empty response": 2, "prompt mismatch": 1, "malformed": 1}
    assert stats.where["prompt mismatch"] == [f"{path}:5"] and stats.where["identical responses"] == [f"{path}:2"]
