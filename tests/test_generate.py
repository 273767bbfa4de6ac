"""generate.py and synth/ against a scripted teacher behind a real HTTP server on 127.0.0.1.

The teachers below answer each scheme's prompts deterministically (a reply depends only on the prompt), so two
runs of the same command give the same records, which is what the resume tests compare."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import pytest

import generate
from files import read_jsonl
from synth import evol_instruct, lamini, orca
from synth.records import AppendLog
from tests.http_fixtures import FakeChatServer

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-generator-SECRET-41d2"
# 200 made-up words: random 10-word instructions drawn from them share almost nothing, so only the
# near-duplicates a teacher makes on purpose score ROUGE-L ≥ 0.7.
VOCAB = [a + b for a in ("ka", "lo", "mi", "nu", "pe", "ro", "su", "ti", "vo", "ze")
         for b in ("ba", "de", "fi", "go", "hu", "ja", "ke", "lu", "mo", "ne", "pi", "qu", "ra", "so", "tu", "vi",
                   "wa", "xo", "ya", "zu")]


def run(server, *argv):
    return generate.main([*map(str, argv), "--generator-url", server.openai_url, "--generator-model", "teacher",
                          "--backoff", "0.01", "--timeout", "5"])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- LaMini ---------------------------------------------------------------------------------------

def lamini_teacher(system, messages):
    """Per instruction request: two fresh instructions, a near-duplicate of the first (one word changed:
    ROUGE-L 0.9) and a verbatim copy of the first example shown. Else: answer the instruction."""
    prompt = messages[-1]["content"]
    if "numbered list" in prompt:
        rng = random.Random(prompt)
        a, b = (" ".join(rng.choice(VOCAB) for _ in range(10)) for _ in range(2))
        near = a.split()
        near[3] = "changed"
        shown = re.search(r"^- (.*)$", prompt, re.M).group(1)
        return f"Here are some:\n1. {a}\n2. {b}\n3. {' '.join(near)}\n4. {shown}\n"
    return f"Answer: {prompt}"


SEEDS = [{"instruction": f"Tell me about the {w} festival", "context": "", "response": "...", "category": "open_qa"}
         for w in VOCAB[:20]]


def test_lamini_generates_instructions_removes_near_duplicates_then_answers(tmp_path):
    seeds = write_jsonl(tmp_path / "dolly.jsonl", SEEDS)
    topics = tmp_path / "topics.txt"
    topics.write_text("astronomy\n\ncooking\nsailing\nchess\n")
    out = tmp_path / "lamini.jsonl"
    n = 8
    with FakeChatServer(lamini_teacher) as server:
        assert run(server, "--scheme", "lamini", "--seeds", seeds, "--topics", topics, "--n", n, "--out", out,
                   "--per-request", 4, "--concurrency", 3) == 0
        prompts = [r["body"]["messages"][-1]["content"] for r in server.requests]
    requests = [r for _, r in read_jsonl(tmp_path / "lamini.instructions.jsonl")[0]]
    records = [r for _, r in read_jsonl(out)[0]]

    assert len(requests) == n and all(len(r["instructions"]) == 4 for r in requests)
    assert {r["source"] for r in requests} == {"example_guided", "topic_guided"}
    for r in requests:  # topic-guided requests named their topics; every request showed 3 seed examples
        prompt = next(p for p in prompts if all(e in p for e in r["examples"]))
        assert len(r["examples"]) == 3 and all(t in prompt for t in r["topics"])
        assert (r["source"] == "topic_guided") == bool(r["topics"])
    # of each request's 4, the near-duplicate and the copied seed are gone: 2 kept per request
    fresh = {text for r in requests for text in r["instructions"][:2]}
    assert len(records) == 2 * n and {r["instruction"] for r in records} == fresh
    for r in records:
        assert r["scheme"] == "lamini" and r["input"] == "" and r["system"] == ""
        assert r["response"] == f"Answer: {r['instruction']}"
        assert re.fullmatch(r"lamini-\d{6}-0[01]", r["id"])


def test_numbered_lists_are_parsed_with_continuations_and_limits():
    text = 'Sure!\n1. First one\n   continues here\n2) "Second"\n- third\n* fourth\n5.\n6. sixth'
    assert lamini.parse_numbered_list(text, 10) == ["First one continues here", "Second", "third", "fourth",
                                                    "sixth"]
    assert lamini.parse_numbered_list(text, 2) == ["First one continues here", "Second"]
    with pytest.raises(ValueError, match="no list items"):
        lamini.parse_numbered_list("I cannot do that.", 5)


@lru_cache(maxsize=None)
def _lcs_by_definition(a: tuple, b: tuple) -> int:
    """LCS by its recursive definition, an oracle independent of the row-by-row programme."""
    if not a or not b:
        return 0
    if a[0] == b[0]:
        return 1 + _lcs_by_definition(a[1:], b[1:])
    return max(_lcs_by_definition(a[1:], b), _lcs_by_definition(a, b[1:]))


def test_rouge_l_is_twice_the_lcs_over_the_total_length():
    """"the cat sat on the mat" / "the cat lay on a mat": LCS = the cat on mat = 4, F1 = 2·4/(6+6) = 2/3."""
    assert lamini.rouge_l(lamini.tokens("The cat sat on the mat."), lamini.tokens("the cat lay on a mat")) == \
        pytest.approx(2 / 3)
    rng = random.Random(0)
    for _ in range(200):
        a = tuple(rng.choice("abcd") for _ in range(rng.randint(0, 9)))
        b = tuple(rng.choice("abcd") for _ in range(rng.randint(0, 9)))
        assert lamini.lcs_length(list(a), list(b)) == _lcs_by_definition(a, b)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7, 0.85, 1.0])
def test_near_duplicate_removal_equals_the_all_pairs_rule(threshold):
    """The prefix index and the overlap bound only skip work: the result equals comparing every pair by
    ROUGE-L, at every threshold (1.0: exact token copies only)."""
    rng = random.Random(1)
    words = "red green blue cyan pink gold grey teal".split()
    candidates = [" ".join(rng.choice(words[:rng.randint(2, 8)]) for _ in range(rng.randint(0, 8)))
                  for _ in range(300)]
    shown = candidates[:5:2]
    kept = []
    for i, text in enumerate(candidates):
        others = shown + [candidates[j] for j in kept]
        if all(lamini.rouge_l(lamini.tokens(text), lamini.tokens(o)) < threshold for o in others):
            kept.append(i)
    assert lamini.remove_near_duplicates(candidates, shown, threshold) == kept
    assert 0 < len(kept) < len(candidates)  # the case exercises both outcomes
    assert lamini.remove_near_duplicates(candidates, shown, 1.01) == list(range(len(candidates)))


# --- Evol-Instruct --------------------------------------------------------------------------------

BREADTH_OPENING = evol_instruct.IN_BREADTH_PROMPT.splitlines()[0]


def evol_teacher(system, messages):
    """Evolving: append "[operation]" (read back from the prompt) and 4 new words; seeds carrying a marker
    misbehave on purpose. Answering: a long answer, unless a marker asks for a bad one."""
    prompt = messages[-1]["content"]
    if prompt.rstrip().endswith("#New Instruction#:"):
        original = prompt.split("#Original Instruction#:\n")[1].rsplit("\n\n#New Instruction#:", 1)[0]
        if prompt.startswith(BREADTH_OPENING):
            op = "in_breadth"
        else:
            op = next(name for name, method in evol_instruct.METHODS.items() if method in prompt)
        if "COPYME" in original:
            return f"#New Instruction#: {original} with extra words added"
        if "SAMEME" in original:
            return original
        rng = random.Random(prompt)
        return f"{original} [{op}] " + " ".join(rng.choice(VOCAB) for _ in range(4))
    if "SORRYME" in prompt:
        return "I'm sorry, but I cannot help with that request."
    if "DOTSME" in prompt:
        return "... !!! the ... ?"
    if "TERSEME" in prompt:
        return "Fine then."
    return "A thorough answer, step by step: " + prompt


EVOL_SEEDS = [
    {"instruction": "Explain why the sky looks blue", "context": "", "response": "-", "category": "open_qa"},
    {"instruction": "Summarise the passage", "context": "Rivers carry rain water down to the sea.",
     "response": "-", "category": "summarization"},
    *({"instruction": f"Describe a {marker} harbour town", "context": "", "response": "-", "category": "creative"}
      for marker in ("COPYME", "SAMEME", "SORRYME", "DOTSME", "TERSEME")),
]


def test_evol_records_strategy_operation_epoch_and_returns_eliminated_ones_to_the_pool(tmp_path):
    seeds = write_jsonl(tmp_path / "dolly.jsonl", EVOL_SEEDS)
    out = tmp_path / "evol.jsonl"
    with FakeChatServer(evol_teacher) as server:
        assert run(server, "--scheme", "evol", "--seeds", seeds, "--rounds", 3, "--out", out) == 0
        prompts = [r["body"]["messages"][-1]["content"] for r in server.requests]
    records = {r["id"]: r for _, r in read_jsonl(out)[0]}
    eliminated = {r["id"]: r for _, r in read_jsonl(tmp_path / "evol.eliminated.jsonl")[0]}

    good = ["evol-000001", "evol-000002"]  # chain id = line number in the seed file
    assert set(records) == {f"{c}-e{e}" for c in good for e in (1, 2, 3)}
    for chain in good:
        for epoch in (1, 2, 3):
            r = records[f"{chain}-e{epoch}"]
            assert r["scheme"] == "evol" and r["epoch"] == epoch and r["chain"] == chain
            assert r["parent_id"] == (chain if epoch == 1 else f"{chain}-e{epoch - 1}")
            parent = records[r["parent_id"]]["instruction"] if epoch > 1 else None
            assert parent is None or r["instruction"].startswith(parent)  # it evolved its parent
            # the operation recorded is the one whose prompt was sent (the teacher tags it)
            tag = re.findall(r"\[(\w+)\]", r["instruction"])[-1]
            assert r["evolution_strategy"] == ("in_breadth" if tag == "in_breadth" else "in_depth")
            assert r["in_depth_evolving_operation"] == (None if tag == "in_breadth" else tag)
            assert r["response"] == "A thorough answer, step by step: " + r["instruction"]
    assert any("Rivers carry rain water down to the sea." in p for p in prompts)  # the seed's context is used

    reasons = {3: "copied_prompt_wording", 4: "no_information_gain", 5: "apology", 6: "punctuation_only",
               7: "too_short"}
    assert set(eliminated) == {f"evol-{line:06d}-e{e}" for line in reasons for e in (1, 2, 3)}
    for line, reason in reasons.items():
        for epoch in (1, 2, 3):
            r = eliminated[f"evol-{line:06d}-e{epoch}"]
            # eliminated every round, so the seed itself stays in the pool as the parent
            assert r["eliminated"] == reason and r["parent_id"] == f"evol-{line:06d}"


def test_evol_run_in_rounds_resumes_to_the_same_records_as_one_run(tmp_path):
    seeds = write_jsonl(tmp_path / "dolly.jsonl", EVOL_SEEDS)
    with FakeChatServer(evol_teacher) as server:
        assert run(server, "--scheme", "evol", "--seeds", seeds, "--rounds", 1, "--out", tmp_path / "a.jsonl") == 0
        assert run(server, "--scheme", "evol", "--seeds", seeds, "--rounds", 3, "--out", tmp_path / "a.jsonl") == 0
        assert run(server, "--scheme", "evol", "--seeds", seeds, "--rounds", 3, "--out", tmp_path / "b.jsonl") == 0
    for suffix in (".jsonl", ".eliminated.jsonl"):
        a = (tmp_path / f"a{suffix}").read_text().splitlines()
        b = (tmp_path / f"b{suffix}").read_text().splitlines()
        assert sorted(a) == sorted(b) and len(a) == len(set(a))


def test_eliminator_names_each_failure_and_passes_a_good_evolution():
    parent = "List three uses of copper"
    assert evol_instruct.eliminate_instruction("Rewrite of the #original instruction#: list uses", parent) == \
        "copied_prompt_wording"
    assert evol_instruct.eliminate_instruction("List three uses of copper, please", parent) == "no_information_gain"
    assert evol_instruct.eliminate_instruction("List three uses of copper in medieval shipbuilding", parent) is None
    assert evol_instruct.eliminate_response("", 3) == "punctuation_only"
    assert evol_instruct.eliminate_response("?! ... it is the", 3) == "punctuation_only"
    assert evol_instruct.eliminate_response("Sorry, as an AI I cannot answer.", 3) == "apology"
    long_apology = "Sorry for the delay. " + "Copper conducts heat well. " * 20  # ≥ 80 words: kept
    assert evol_instruct.eliminate_response(long_apology, 3) is None
    assert evol_instruct.eliminate_response("Wires, pipes.", 3) == "too_short"
    assert evol_instruct.eliminate_response("Wires, pipes and coins.", 3) is None


def test_prompt_labels_the_eliminator_looks_for_are_the_ones_the_prompts_use():
    for prompt in (evol_instruct.IN_DEPTH_PROMPT, evol_instruct.IN_BREADTH_PROMPT):
        assert "#Original Instruction#" in prompt and "#New Instruction#" in prompt
        assert all(marker.strip("#") in prompt.lower() for marker in evol_instruct.COPY_MARKERS)


def test_operations_are_drawn_uniformly():
    """600 draws over 6 operations: each count is Binomial(600, 1/6), mean 100, σ ≈ 9.1; allow ±5σ."""
    rng = random.Random(0)
    draws = [evol_instruct.pick_operation(rng) for _ in range(600)]
    counts = {op: sum(d[1] == op or (op == "in_breadth" and d[0] == "in_breadth") for d in draws)
              for op in evol_instruct.OPERATIONS}
    assert all(55 <= c <= 145 for c in counts.values()), counts


# --- Orca -----------------------------------------------------------------------------------------

def orca_teacher(system, messages):
    prompt = messages[-1]["content"]
    target = re.search(r"the correct final answer to this task is: (.*)\n", prompt).group(1)
    return f"First I read the task. Then I check each option. So the answer is {target}."


TASKS = [{"inputs": f"Question {i}: is {w} a word? Options: yes, no", "targets": "yes" if i % 2 else "no",
          "task_name": f"task{i % 3}", "template_type": "zs_opt", "task_source": "Flan2021"}
         for i, w in enumerate(VOCAB[:24])]


def test_orca_pairs_each_task_with_a_sampled_system_message_and_the_gold_target(tmp_path):
    tasks = write_jsonl(tmp_path / "flan.jsonl", TASKS)
    out = tmp_path / "orca.jsonl"
    with FakeChatServer(orca_teacher) as server:
        assert run(server, "--scheme", "orca", "--tasks", tasks, "--out", out, "--n", 20) == 0
        sent = {r["body"]["messages"][-1]["content"]: r["body"]["messages"] for r in server.requests}
    records = [r for _, r in read_jsonl(out)[0]]
    assert len(records) == 20
    by_name = dict(orca.SYSTEM_MESSAGES)
    for r in records:
        task = TASKS[int(r["id"].removeprefix("orca-")) - 1]
        assert r["instruction"] == task["inputs"] and r["targets"] == task["targets"]
        assert (r["task_name"], r["template_type"], r["task_source"]) == (task["task_name"], "zs_opt", "Flan2021")
        assert r["system"] == by_name[r["system_message_id"]]
        messages = sent[orca.task_prompt(task["inputs"], task["targets"])]  # the gold target went to the teacher
        assert messages[:-1] == ([{"role": "system", "content": r["system"]}] if r["system"] else [])
        assert r["response"].endswith(f"So the answer is {task['targets']}.")
    assert len({r["system_message_id"] for r in records}) > 5  # sampled per task, not one for all


def test_a_finished_run_leaves_its_file_in_id_order_whatever_order_the_answers_came_in(tmp_path):
    """A teacher that answers some tasks late (their requests finish last): the records are appended as
    they arrive, then the finished file is rewritten in id order, the same bytes as a run whose answers
    came in order."""
    import time

    def slow_on_even(system, messages):
        if int(re.search(r"Question (\d+):", messages[-1]["content"]).group(1)) % 2 == 0:
            time.sleep(0.05)
        return orca_teacher(system, messages)

    tasks = write_jsonl(tmp_path / "flan.jsonl", TASKS)
    files = []
    for name, teacher, concurrency in (("scrambled", slow_on_even, 8), ("in_order", orca_teacher, 1)):
        out = tmp_path / f"{name}.jsonl"
        with FakeChatServer(teacher) as server:
            assert run(server, "--scheme", "orca", "--tasks", tasks, "--out", out, "--n", 12,
                       "--concurrency", concurrency) == 0
        files.append(out.read_bytes())
    ids = [json.loads(line)["id"] for line in files[0].decode().splitlines()]
    assert len(ids) == 12 and ids == sorted(ids)
    assert files[0] == files[1]


# --- resume, bad input, failures, keys ------------------------------------------------------------

def test_killed_mid_run_resume_loses_nothing_and_duplicates_nothing(tmp_path):
    """Kill a real generate.py process mid-run (SIGKILL), add the torn line a kill mid-write leaves, resume:
    every line written before the kill is in the final file unchanged, and the finished file (in id order)
    is an uninterrupted run's, byte for byte."""
    tasks = write_jsonl(tmp_path / "flan.jsonl", TASKS)
    killed, whole = tmp_path / "killed.jsonl", tmp_path / "whole.jsonl"
    with FakeChatServer(orca_teacher, delay=0.1) as server:  # slow enough that the kill lands mid-run
        argv = ["--scheme", "orca", "--tasks", tasks, "--concurrency", 2]
        process = subprocess.Popen(
            [sys.executable, "generate.py", *map(str, argv), "--out", str(killed), "--generator-url",
             server.openai_url, "--generator-model", "teacher"], cwd=ROOT, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.poll() is None:
            if killed.exists() and killed.read_text().count("\n") >= 6:
                break
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        before = killed.read_text()
        before = before[:before.rfind("\n") + 1]  # whole lines only (a kill inside a write could tear one)
        assert 6 <= before.count("\n") < len(TASKS), "the kill should land mid-run"
        with open(killed, "a") as f:
            f.write('{"id": "orca-000099", "scheme": "or')  # the torn last line of a kill mid-write
        server.delay = 0
        assert run(server, *argv, "--out", killed) == 0
        assert run(server, *argv, "--out", whole) == 0
    after = killed.read_text()
    assert set(before.splitlines()) <= set(after.splitlines())
    lines = after.splitlines()
    assert len(lines) == len(set(json.loads(line)["id"] for line in lines)) == len(TASKS)
    assert after == whole.read_text()


def test_append_log_cuts_a_torn_last_line_and_rejects_damage_elsewhere(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "respo')
    with AppendLog(path) as log:
        assert (log.ids, log.torn) == ({"a", "b"}, 1)
        log.write({"id": "c", "response": "whole"})
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n{"id": "c", "response": "whole"}\n'
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:2: not valid JSON"):
        AppendLog(path)
    path.write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(ValueError, match=r":2: duplicate id 'a'"):
        AppendLog(path)


def test_malformed_input_line_names_file_and_line_unless_skip_bad(tmp_path, capsys):
    tasks = tmp_path / "flan.jsonl"
    tasks.write_text(json.dumps(TASKS[0]) + "\n{oops\n" + json.dumps({**TASKS[1], "targets": 3}) + "\n")
    with FakeChatServer(orca_teacher) as server:
        with pytest.raises(ValueError, match=rf"{re.escape(str(tasks))}:2: not valid JSON"):
            run(server, "--scheme", "orca", "--tasks", tasks, "--out", tmp_path / "o.jsonl")
        tasks.write_text(json.dumps(TASKS[0]) + "\n" + json.dumps({**TASKS[1], "targets": 3}) + "\n")
        with pytest.raises(ValueError, match=r"flan.jsonl:2: field 'targets' should be str, got int"):
            run(server, "--scheme", "orca", "--tasks", tasks, "--out", tmp_path / "o.jsonl")
        tasks.write_text(json.dumps(TASKS[0]) + "\n{oops\n" + json.dumps({**TASKS[1], "targets": 3}) + "\n")
        assert run(server, "--scheme", "orca", "--tasks", tasks, "--out", tmp_path / "o.jsonl", "--skip-bad") == 0
    assert "1 records, 2 malformed lines skipped" in capsys.readouterr().out
    assert len(read_jsonl(tmp_path / "o.jsonl")[0]) == 1


def test_failed_requests_are_counted_then_done_by_the_next_run(tmp_path, capsys):
    tasks = write_jsonl(tmp_path / "flan.jsonl", TASKS[:10])
    out = tmp_path / "orca.jsonl"
    with FakeChatServer(orca_teacher) as server:
        server.inject(*[("status", 500, None)] * 3)
        assert run(server, "--scheme", "orca", "--tasks", tasks, "--out", out, "--max-retries", 0) == 1
        assert "failed=3 written=7" in capsys.readouterr().out
        assert run(server, "--scheme", "orca", "--tasks", tasks, "--out", out, "--max-retries", 0) == 0
        assert "already_done=7 written=3" in capsys.readouterr().out
    assert len(read_jsonl(out)[0]) == 10


def test_wrong_key_stops_the_run_at_once(tmp_path):
    tasks = write_jsonl(tmp_path / "flan.jsonl", TASKS)
    with FakeChatServer(orca_teacher, api_key="the-right-key") as server:
        with pytest.raises(SystemExit, match="HTTP 401"):
            run(server, "--scheme", "orca", "--tasks", tasks, "--out", tmp_path / "o.jsonl", "--concurrency", 1)
        assert len(server.requests) <= 2


def test_api_key_is_sent_but_never_printed_or_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GENERATOR_API_KEY", KEY)
    seeds = write_jsonl(tmp_path / "dolly.jsonl", EVOL_SEEDS)
    with FakeChatServer(evol_teacher, api_key=KEY) as server:
        assert run(server, "--scheme", "evol", "--seeds", seeds, "--rounds", 1, "--out", tmp_path / "e.jsonl") == 0
    printed = capsys.readouterr()
    assert "key=set" in printed.out
    written = "".join(p.read_text() for p in tmp_path.iterdir())
    assert KEY not in printed.out + printed.err + written
    assert os.environ["GENERATOR_API_KEY"] == KEY  # used from the environment, left there
