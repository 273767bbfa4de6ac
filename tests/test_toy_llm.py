"""The toy teacher and judge (toy/llm.py) as real HTTP servers on 127.0.0.1, answering the prompts
generate.py and filter.py send, and `make data`'s driver (synth/pipeline.py) end to end on a small n."""

import json
import math
import random
import urllib.request

import pytest

import filter as filter_script  # the module, not the builtin
import generate
from chat_api import ChatClient
from files import read_jsonl
from synth import evol_instruct, lamini, orca, pipeline
from toy import llm as toy_llm, world


def ask(server, text, system=""):
    client = ChatClient(server.url, "toy", timeout=10, max_retries=0)
    try:
        return client.chat([{"role": "user", "content": text}], system=system)
    finally:
        client.close()


def train_tasks(n, seed, **kw):
    rng = random.Random(seed)
    return [world.sample_task(rng, "train", **kw) for _ in range(n)]


def task_text(t):
    return f"{t.instruction}\n\n{t.input}" if t.input else t.instruction


# --- the HTTP surface --------------------------------------------------------------------------------

def test_servers_speak_chat_completions_and_reject_malformed_requests():
    with toy_llm.ToyServer(toy_llm.judge, "toy-judge") as server:
        with urllib.request.urlopen(server.url + "/models", timeout=5) as reply:
            assert json.load(reply)["data"][0]["id"] == "toy-judge"
        for path, body, status in (("/chat/completions", b"not json", 400),
                                   ("/chat/completions", b'{"model": "m", "messages": []}', 400),
                                   ("/completions", b"{}", 404)):
            request = urllib.request.Request(server.url + path, data=body, method="POST")
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(request, timeout=5)
            assert err.value.code == status and "message" in json.load(err.value)["error"]
        assert ask(server, "hello").startswith("Rating: 1\n")  # not a judge prompt: still the judge's form


# --- the teacher -------------------------------------------------------------------------------------

def test_teacher_writes_lamini_instructions_of_the_families_shown_all_from_the_train_split():
    seeds = train_tasks(3, "examples", input_form=False)
    with toy_llm.ToyServer(toy_llm.Teacher(wrong_fraction=0), "toy-teacher") as server:
        for job in ({"source": "example_guided", "examples": [t.instruction for t in seeds], "topics": []},
                    {"source": "topic_guided", "examples": [t.instruction for t in seeds],
                     "topics": [toy_llm.TOPICS["sort_digits"], toy_llm.TOPICS["reverse"]]}):
            items = lamini.parse_numbered_list(ask(server, lamini.instruction_prompt(job, 12)), 100)
            tasks = [world.parse_instruction(item) for item in items]
            families = {t.family for t in seeds} if not job["topics"] else {"sort_digits", "reverse"}
            assert len(items) == 12 and all(t is not None and t.family in families and not t.input for t in tasks)
            assert all(world.split_of(t.family, t.operands) == "train" for t in tasks)
            for item, t in zip(items, tasks):  # each answers exactly as a fresh request
                assert world.check(t, ask(server, item))


@pytest.mark.parametrize("operation", [*evol_instruct.IN_DEPTH, None])
def test_teacher_evolves_with_the_operation_the_prompt_names_and_passes_the_eliminator(operation):
    teacher, moved = toy_llm.Teacher(wrong_fraction=0), 0
    for parent in train_tasks(30, f"evol-{operation}", input_form=False):
        text = task_text(parent)
        evolved = teacher("", [{"role": "user", "content": evol_instruct.evolve_prompt(text, operation)}])
        child = world.parse_instruction(evolved)
        assert evol_instruct.eliminate_instruction(evolved, text) is None, (text, evolved)
        if operation is None:  # in_breadth: a task of the sibling family, same split
            assert child.family == world.FAMILIES[parent.family].sibling
            assert world.split_of(child.family, child.operands) == "train"
        else:  # in_depth: the same task, reworded
            assert (child.family, child.operands) == (parent.family, parent.operands)
        moved += bool(child.input)
        response = teacher("", [{"role": "user", "content": evolved}])
        assert world.check(child, response)
        assert response.startswith("Step 1: ") == ("Show your reasoning" in evolved or "Check the result" in evolved)
    # complicate_input moves the operands into an input, unless that adds too few words (then another
    # in-depth rewording is used; "Write the letters in the input in capital letters." adds 2)
    assert moved >= 20 if operation == "complicate_input" else moved == 0


def test_teacher_explains_orca_tasks_in_the_style_each_system_message_asks_for():
    teacher = toy_llm.Teacher(wrong_fraction=0)
    t = train_tasks(1, "orca", family="reverse", input_form=True)[0]
    for name, system in orca.SYSTEM_MESSAGES:
        response = teacher(system, [{"role": "user", "content": orca.task_prompt(task_text(t), t.answer)}])
        assert world.check(t, response), name
        if name == "none":
            assert response == world.reference_response(t)      # the default response: restated fact, answer line
        elif name == "brief":
            assert response == f"Answer: {t.answer}"
        else:
            assert len(response.splitlines()) >= 3 and response.endswith(f"Answer: {t.answer}")
    assert teacher("", [{"role": "user", "content": "Name three rivers."}]) == toy_llm.NOT_TOY


def test_teacher_is_wrong_on_the_stated_fraction_logs_exactly_those_and_repeats_itself(tmp_path):
    """3000 distinct prompts, p = 0.25: the count of wrong answers lies within 4σ of n·p = 750,
    σ = √(n·p·(1 − p)) ≈ 23.7. The wrong log holds exactly the answers world.check finds wrong."""
    prompts = list(dict.fromkeys(task_text(t) for t in train_tasks(6000, "fraction")))[:3000]
    teacher = toy_llm.Teacher(wrong_fraction=0.25)
    replies = [teacher("", [{"role": "user", "content": p}]) for p in prompts]
    wrong = [not world.check(world.parse_instruction(p), r) for p, r in zip(prompts, replies)]
    n = len(prompts)
    assert n == 3000 and abs(sum(wrong) - 0.25 * n) <= 4 * math.sqrt(n * 0.25 * 0.75)

    log = tmp_path / "wrong.jsonl"
    for _ in range(2):  # the same replies from a fresh teacher, and nothing logged twice
        logging = toy_llm.Teacher(wrong_fraction=0.25, wrong_log=log)
        assert [logging("", [{"role": "user", "content": p}]) for p in prompts[:300]] == replies[:300]
        logging.log.close()
    assert sorted(r["id"] for _, r in read_jsonl(log)[0]) == \
        sorted(toy_llm.answer_key("", p) for p, w in zip(prompts[:300], wrong) if w)
    for fraction, expected in ((0.0, 0), (1.0, 200)):
        t = toy_llm.Teacher(wrong_fraction=fraction)
        assert sum(not world.check(world.parse_instruction(p), t("", [{"role": "user", "content": p}]))
                   for p in prompts[:200]) == expected


# --- the judge ---------------------------------------------------------------------------------------

def test_judge_rates_right_answers_high_and_wrong_ones_low_in_filters_prompt():
    rng = random.Random(0)
    with toy_llm.ToyServer(toy_llm.judge, "toy-judge") as server:
        for i, t in enumerate(train_tasks(40, "judge")):
            style = rng.choice([None, *world.ORCA_SYSTEM_MESSAGES])
            right = world.reference_response(t, style)
            wrong = right[:len(right) - len(t.answer)] + world.make_wrong(t, rng)
            # the Orca form (input inside the instruction, a reference) and the generated form (separate input)
            record = {"system": "", "instruction": t.instruction, "input": t.input} if i % 2 else \
                {"system": "Be brief.", "instruction": task_text(t), "input": "", "targets": t.answer}
            for response, band in ((right, (8, 10)), (wrong, (1, 3))):
                reply = ask(server, filter_script.judge_prompt({**record, "response": response}))
                rating, reason = filter_script.parse_judgement(reply)
                assert band[0] <= rating <= band[1], (t, response, reply)
        not_toy = {"system": "", "instruction": "Name three rivers.", "input": "", "response": "Nile"}
        assert filter_script.parse_judgement(ask(server, filter_script.judge_prompt(not_toy)))[0] == 1


# --- the driver --------------------------------------------------------------------------------------

def test_make_data_end_to_end_on_a_small_n_filters_out_exactly_the_wrong_answers(tmp_path, capfd, monkeypatch):
    for role in ("GENERATOR", "JUDGE"):
        for name in ("URL", "MODEL", "API", "API_KEY"):
            monkeypatch.delenv(f"{role}_{name}", raising=False)
    out = tmp_path / "data"
    argv = ["--out", str(out), "--lamini-requests", "6", "--evol-seeds", "10", "--rounds", "2", "--orca-tasks", "20"]
    assert pipeline.main(argv) == 0
    first = capfd.readouterr().out  # the child processes write to the file descriptors
    files = {p.name: p.read_bytes() for p in out.glob("*.jsonl")}

    wrong = {r["id"] for _, r in read_jsonl(out / "toy_teacher.wrong.jsonl")[0]}
    for scheme in pipeline.SCHEMES:
        judged = [r for _, r in read_jsonl(out / f"{scheme}.judged.jsonl")[0]]
        kept = [r["id"] for _, r in read_jsonl(out / f"{scheme}.filtered.jsonl")[0]]
        generated = [r["id"] for _, r in read_jsonl(out / f"{scheme}.jsonl")[0]]
        assert sorted(r["id"] for r in judged) == sorted(generated) and len(judged) > 0
        for r in judged:
            assert {"id", "scheme", "instruction", "input", "response", "system", "judge_rating"} <= set(r)
            task = world.parse_instruction(r["instruction"])
            correct = world.check(task, r["response"])  # recomputed: the teacher's log agrees with the checker
            assert correct == (toy_llm.answer_key(*pipeline.sent(r)) not in wrong)
            assert (r["id"] in kept) == correct
    report = {r["scheme"]: r for _, r in read_jsonl(out / "filter_report.jsonl")[0]}
    assert report["all"]["precision"] == report["all"]["recall"] == 1.0 and report["all"]["wrong"] > 0
    assert "precision=1.0000 recall=1.0000" in first

    assert pipeline.main(argv) == 0  # finished: a re-run changes nothing
    assert {p.name: p.read_bytes() for p in out.glob("*.jsonl")} == files
    assert "lamini/instructions: already_done=6\n" in capfd.readouterr().out

    monkeypatch.setenv("GENERATOR_URL", "http://127.0.0.1:9/v1")  # another generator: refused, not mixed in
    monkeypatch.setenv("GENERATOR_MODEL", "some-llm")
    with pytest.raises(SystemExit, match="sources.json: .* holds data from another generator"):
        pipeline.main(argv)


def test_sources_are_recorded_until_records_exist_then_another_source_is_refused(tmp_path):
    toy_source, other = {"generator": "toy-teacher", "judge": "toy-judge"}, {"generator": "x at http://h/v1"}
    pipeline.check_sources(tmp_path, other)            # a first run that made nothing (say, a misspelt model)
    pipeline.check_sources(tmp_path, toy_source)       # may be re-run with another source
    assert json.loads((tmp_path / "sources.json").read_text()) == toy_source
    (tmp_path / "lamini.instructions.jsonl").write_text("")
    pipeline.check_sources(tmp_path, toy_source)
    with pytest.raises(SystemExit, match="holds data from another generator"):
        pipeline.check_sources(tmp_path, {**toy_source, **other})


def test_generate_and_filter_run_unchanged_against_the_toy_servers_in_process(tmp_path):
    """The same scripts, called as functions with endpoint flags instead of the driver's environment."""
    inputs = toy_llm.write_inputs(tmp_path / "toy", n_seeds=20, n_tasks=10)
    with toy_llm.ToyServer(toy_llm.Teacher(), "toy-teacher") as teacher, \
            toy_llm.ToyServer(toy_llm.judge, "toy-judge") as judge:
        assert generate.main(["--scheme", "orca", "--tasks", inputs["tasks"], "--out", str(tmp_path / "o.jsonl"),
                              "--generator-url", teacher.url, "--generator-model", "toy-teacher"]) == 0
        assert filter_script.main(["--in", str(tmp_path / "o.jsonl"), "--out", str(tmp_path / "j.jsonl"),
                                   "--filtered", str(tmp_path / "f.jsonl"), "--judge-url", judge.url,
                                   "--judge-model", "toy-judge"]) == 0
    kept = [r for _, r in read_jsonl(tmp_path / "f.jsonl")[0]]
    assert kept and all(world.check(world.parse_instruction(r["instruction"]), r["response"]) for r in kept)
