"""filter.py against a scripted judge behind a real HTTP server on 127.0.0.1, and on rows laid out like the
released SurgeGlobal datasets."""

import json
import re

import pytest

import filter as filter_script  # the module, not the builtin
from files import read_jsonl
from tests.http_fixtures import FakeChatServer

RETRY_OPENING = filter_script.RETRY_PROMPT.splitlines()[0]


def judge_teacher(system, messages):
    """Rates by a word planted in the response; answers in a different form for each word."""
    response = messages[0]["content"].split("[Response]\n", 1)[1].split("\n\nReply in exactly", 1)[0]
    reasked = len(messages) > 1
    if "GOOD" in response:
        return "Rating: 9\nReason: correct and clear."
    if "BAD" in response:
        return "Rating: 3\nReason: the answer is wrong."
    if "EDGE" in response:
        return "**Rating:** 7/10\n**Reason:** acceptable, a little thin."
    if "JSON" in response:
        return 'Here is my verdict: {"rating": 8, "reason": "fine"}'
    if "FLAKY" in response and reasked:
        return "Rating: 6\nReason: adequate."
    return "I think this response is quite nice overall."  # no rating at all


def record(i, scheme, word, **extra):
    return {"id": f"{scheme}-{i}", "scheme": scheme, "instruction": f"Task {i}", "input": "", "system": "",
            "response": f"Response {i} {word}", **extra}


RECORDS = [record(1, "lamini", "GOOD"), record(2, "lamini", "BAD"), record(3, "lamini", "EDGE"),
           record(4, "evol", "JSON", epoch=1), record(5, "evol", "GARBAGE", epoch=1), record(6, "evol", "FLAKY"),
           record(7, "orca", "GOOD", targets="(B) Paris", system="Think step by step."),
           record(8, "orca", "BAD", targets="no")]
EXPECTED = {"lamini-1": 9, "lamini-2": 3, "lamini-3": 7, "evol-4": 8, "evol-5": None, "evol-6": 6, "orca-7": 9,
            "orca-8": 3}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(server, tmp_path, *argv, api="openai"):
    url = server.openai_url if api == "openai" else server.anthropic_url
    return filter_script.main(["--out", str(tmp_path / "judged.jsonl"), "--filtered", str(tmp_path / "kept.jsonl"),
                               "--judge-url", url, "--judge-model", "judge", "--judge-api", api, "--backoff", "0.01",
                               *map(str, argv)])


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_every_record_is_written_judged_and_those_at_or_above_threshold_are_kept(tmp_path, capsys, api):
    inputs = [write_jsonl(tmp_path / "a.jsonl", RECORDS[:4]), write_jsonl(tmp_path / "b.jsonl", RECORDS[4:])]
    with FakeChatServer(judge_teacher) as server:
        assert run(server, tmp_path, "--in", *inputs, "--threshold", 7, api=api) == 0
        first_prompts = [r["body"]["messages"][0]["content"] for r in server.requests]
    judged = {r["id"]: r for _, r in read_jsonl(tmp_path / "judged.jsonl")[0]}
    assert {i: r["judge_rating"] for i, r in judged.items()} == EXPECTED
    assert all(r["judge_model"] == "judge" and r["judge_reason"] for r in judged.values())
    assert judged["lamini-3"]["judge_reason"] == "acceptable, a little thin."
    assert judged["evol-5"]["judge_status"] == "unparsable" and judged["orca-7"]["judge_status"] == "rated"
    assert all(judged[r["id"]][k] == v for r in RECORDS for k, v in r.items())  # the record itself is kept whole

    kept = [r["id"] for _, r in read_jsonl(tmp_path / "kept.jsonl")[0]]
    assert kept == [r["id"] for r in RECORDS if (EXPECTED[r["id"]] or 0) >= 7]  # 7 is kept; input order

    # the judge saw the reference answer and system message of the orca record
    orca_prompt = next(p for p in first_prompts if "Response 7 GOOD" in p)
    assert "[Reference answer]\n(B) Paris" in orca_prompt and "[System message]\nThink step by step." in orca_prompt
    out = capsys.readouterr().out
    assert "filter: scheme=lamini records=3 kept=2 below_threshold=1 unparsable=0 not_judged=0" in out
    assert "filter: scheme=evol records=3 kept=1 below_threshold=1 unparsable=1 not_judged=0" in out
    assert "filter: scheme=orca records=2 kept=1 below_threshold=1 unparsable=0 not_judged=0" in out
    assert "judge: 11 requests, 0 retries, 0 failed" in out  # 8 records + 2 re-asks for evol-5 + 1 for evol-6


def test_answers_without_a_rating_are_reasked_with_a_reminder_then_counted(tmp_path):
    inputs = write_jsonl(tmp_path / "in.jsonl", [RECORDS[4], RECORDS[5]])
    with FakeChatServer(judge_teacher) as server:
        assert run(server, tmp_path, "--in", inputs, "--parse-retries", 2) == 0
        by_record = {}
        for r in server.requests:
            by_record.setdefault(r["body"]["messages"][0]["content"].split("[Response]\n")[1][:10], []).append(r)
    garbage, flaky = by_record["Response 5"], by_record["Response 6"]
    assert len(garbage) == 3 and len(flaky) == 2  # 1 + 2 re-asks; 1 + the re-ask that worked
    reask = garbage[1]["body"]["messages"]
    assert [m["role"] for m in reask] == ["user", "assistant", "user"]
    assert reask[1]["content"] == "I think this response is quite nice overall."
    assert reask[2]["content"].startswith(RETRY_OPENING)


def test_failed_requests_are_not_written_then_judged_on_the_next_run(tmp_path, capsys):
    inputs = write_jsonl(tmp_path / "in.jsonl", [RECORDS[0], RECORDS[1], RECORDS[3], RECORDS[6], RECORDS[7]])
    with FakeChatServer(judge_teacher) as server:
        server.inject(("status", 503, None), ("status", 503, None))
        assert run(server, tmp_path, "--in", inputs, "--max-retries", 0, "--concurrency", 1) == 1
        assert "not_judged=2" in capsys.readouterr().out
        assert len(read_jsonl(tmp_path / "judged.jsonl")[0]) == 3
        before = len(server.requests)
        assert run(server, tmp_path, "--in", inputs) == 0
        assert len(server.requests) - before == 2  # only the two missing ones
    assert "3 already judged" in capsys.readouterr().out
    ids = [r["id"] for _, r in read_jsonl(tmp_path / "judged.jsonl")[0]]
    assert sorted(ids) == sorted(r["id"] for r in (RECORDS[0], RECORDS[1], RECORDS[3], RECORDS[6], RECORDS[7]))


@pytest.mark.parametrize("text, rating", [
    ("Rating: 8\nReason: good", 8), ("rating = 6.5", 6.5), ("**Rating:** 9/10", 9), ("Score: 4", 4),
    ("[[7]]", 7), ("I would give it 5 out of 10.", 5), ("7", 7), ('{"rating": "8", "reason": "ok"}', 8),
    ("Looks fine to me.", None), ("Rating: 15", None), ("Rating: 0", None), ("", None)])
def test_judge_replies_are_read_in_their_common_forms(text, rating):
    assert filter_script.parse_judgement(text)[0] == rating


def test_reason_follows_its_label_or_is_the_whole_reply():
    assert filter_script.parse_judgement("Rating: 8\nReason:  Clear and right. ")[1] == "Clear and right."
    assert filter_script.parse_judgement('{"rating": 3, "reason": "wrong year"}')[1] == "wrong year"
    assert filter_script.parse_judgement("8 out of 10, nicely done")[1] == "8 out of 10, nicely done"
    assert filter_script.parse_judgement("A reasonable answer. Rating: 6")[1] == "A reasonable answer. Rating: 6"


def test_released_surgeglobal_rows_are_filtered_by_their_own_rating_column(tmp_path, capsys):
    judges = lambda g, l: {"gpt4_status": "success", "gpt4_rating": g, "gpt4_reason": f"gpt4 says {g}",  # noqa
                           "llama2_status": "success", "llama2_rating": l, "llama2_reason": "-"}
    lamini_rows = [{"instruction": "Name a fruit", "source": "generated", "response": "Apple", **judges("9", "2")},
                   {"instruction": "Name a city", "source": "generated", "response": "Blue", **judges("3", "9")}]
    orca_rows = [{"original_index": 5, "inputs": "Is the sky blue?", "targets": "yes", "task_source": "Flan2021",
                  "task_name": "qa", "template_type": "zs_opt", "system_message": "Answer briefly.",
                  "explained_targets": "Yes, it is.", "dataset_source": "flan", **judges("8.5", "")},
                 {"original_index": 6, "inputs": "2+2?", "targets": "4", "task_source": "Flan2021", "task_name": "m",
                  "template_type": "zs_noopt", "system_message": "", "explained_targets": "5",
                  "dataset_source": "flan", **judges("", "")}]
    evol_rows = [{"instruction": "Plan a trip", "response": "Day 1 ...", "category": "brainstorming",
                  "evolution_strategy": "in-depth", "in-depth-evolving_operation": "deepening", "epoch": 2,
                  **judges("Rating: 7", "1")}]
    inputs = [write_jsonl(tmp_path / name, rows) for name, rows in
              (("lamini.jsonl", lamini_rows), ("orca.jsonl", orca_rows), ("evol.jsonl", evol_rows))]
    argv = ["--in", *map(str, inputs), "--rating-column", "gpt4_rating", "--threshold", "7",
            "--out", str(tmp_path / "judged.jsonl"), "--filtered", str(tmp_path / "kept.jsonl")]
    assert filter_script.main(argv) == 0  # no endpoint given: released mode sends no request
    judged = {r["id"]: r for _, r in read_jsonl(tmp_path / "judged.jsonl")[0]}
    assert {i: r["judge_rating"] for i, r in judged.items()} == {
        "lamini-000001": 9, "lamini-000002": 3, "orca-000001": 8.5, "orca-000002": None, "evol-000001": 7}
    orca_row = judged["orca-000001"]
    assert (orca_row["scheme"], orca_row["instruction"], orca_row["response"], orca_row["system"],
            orca_row["input"], orca_row["targets"]) == ("orca", "Is the sky blue?", "Yes, it is.", "Answer briefly.",
                                                        "", "yes")
    assert orca_row["judge_reason"] == "gpt4 says 8.5" and orca_row["judge_model"] == "gpt4"
    assert judged["evol-000001"]["in_depth_evolving_operation"] == "deepening"
    kept = [r["id"] for _, r in read_jsonl(tmp_path / "kept.jsonl")[0]]
    assert kept == ["lamini-000001", "orca-000001", "evol-000001"]
    assert "filter: scheme=orca records=2 kept=1 below_threshold=0 unparsable=1 not_judged=0" in \
        capsys.readouterr().out


def test_bad_input_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [RECORDS[0], {k: v for k, v in RECORDS[1].items() if k != "system"}])
    with FakeChatServer(judge_teacher) as server:
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:2: missing field 'system'"):
            run(server, tmp_path, "--in", path)
        write_jsonl(path, [RECORDS[0], RECORDS[1], RECORDS[0]])
        with pytest.raises(ValueError, match=rf"in.jsonl:3: duplicate id 'lamini-1' \(first at .*in.jsonl:1\)"):
            run(server, tmp_path, "--in", path)
        path.write_text(json.dumps(RECORDS[0]) + "\n[1, 2\n")
        assert run(server, tmp_path, "--in", path, "--skip-bad") == 0
    assert len(read_jsonl(tmp_path / "judged.jsonl")[0]) == 1
