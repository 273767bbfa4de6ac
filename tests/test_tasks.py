"""evals/tasks.py: every reader on the real copies in ../shared/data (record counts and label balances as
../shared/data/README.md states them), few-shot draws identical to lm-eval's own ContextSampler, the
Open LLM Leaderboard preset, the toy tasks, and one-line errors naming file and line for bad input."""
import json

import pytest
from lm_eval.api.samplers import ContextSampler

from evals import tasks as T
from toy import world

DATA = T.default_data_dir()


@pytest.fixture(scope="module")
def real():
    names = ["arc_challenge", "arc_easy", "hellaswag", "truthfulqa_mc1", "truthfulqa_mc2", "boolq", "piqa",
             "openbookqa", "gsm8k", "mmlu"]
    return {t.name: t for t in T.load_tasks(names, DATA)}


@pytest.mark.parametrize("name,n_docs,n_pool", [
    ("arc_challenge", 1172, 299), ("arc_easy", 2376, 570), ("hellaswag", 10042, 10042),
    ("truthfulqa_mc1", 817, 0), ("truthfulqa_mc2", 817, 0), ("boolq", 3270, 3270), ("piqa", 1838, 1838),
    ("openbookqa", 500, 500), ("gsm8k", 1319, 7473)])
def test_readers_give_the_record_counts_of_the_data_readme(real, name, n_docs, n_pool):
    assert (len(real[name].docs), len(real[name].fewshot_docs)) == (n_docs, n_pool)


def test_labels_and_choices_are_read_as_the_files_define_them(real):
    assert sum(d.gold for d in real["boolq"].docs) == 2033 and real["boolq"].docs[0].choices == ["no", "yes"]
    assert sum(d.gold for d in real["piqa"].docs) == 928
    assert {len(d.choices) for d in real["hellaswag"].docs} == {4}
    # ARC items labelled 1-4 instead of A-E (22 in Challenge-Test): answerKey maps to the right index
    numeric = [json.loads(line) for line in open(DATA / "arc/ARC-Challenge/ARC-Challenge-Test.jsonl")]
    numeric = [(i, r) for i, r in enumerate(numeric) if r["question"]["choices"][0]["label"] == "1"]
    assert len(numeric) == 22
    for i, r in numeric:
        d = real["arc_challenge"].docs[i]
        assert d.choices[d.gold] == next(c["text"] for c in r["question"]["choices"] if c["label"] == r["answerKey"])
    assert all(d.answer.rsplit("\n", 1)[-1].startswith("#### ") for d in real["gsm8k"].docs)
    mc1, mc2 = real["truthfulqa_mc1"].docs, real["truthfulqa_mc2"].docs
    assert all(d.gold == 0 for d in mc1) and all(d.labels[0] == 1 and 0 in d.labels for d in mc2)


def test_queries_follow_the_harness_formats(real):
    d = real["arc_easy"].docs[0]
    assert d.query.startswith("Question: ") and d.query.endswith("\nAnswer:")
    m = real["mmlu_high_school_chemistry"]
    assert m.description == "The following are multiple choice questions (with answers) about high school chemistry.\n\n"
    assert m.docs[0].query.count("\nA. ") == 1 and m.docs[0].query.endswith("\nD. " + m.docs[0].query.split("\nD. ")[1])
    assert m.docs[0].query.endswith("\nAnswer:") and m.docs[0].choices == ["A", "B", "C", "D"]
    assert real["boolq"].docs[0].query.endswith("?\nAnswer:") and "\nQuestion: " in real["boolq"].docs[0].query
    assert not real["openbookqa"].docs[0].query.startswith("Question:")       # the harness uses the bare stem
    assert real["truthfulqa_mc2"].docs[0].query.endswith(f"\n\nQ: {json.load(open(DATA / 'truthfulqa/data/mc_task.json'))[0]['question']}\nA:")


def test_mmlu_is_57_subjects_with_5_dev_examples_each(real):
    subjects = [t for name, t in real.items() if name.startswith("mmlu_")]
    assert len(subjects) == 57 and sum(len(t.docs) for t in subjects) == 14042
    assert all(len(t.fewshot_docs) == 5 and t.group == "mmlu" and t.sampler == "first_n" for t in subjects)


def test_openbookqa_dev_tsv_choices_are_split_into_four(real):
    pool = real["openbookqa"].fewshot_docs
    assert all(len(d.choices) == 4 and all(c and "(B)" not in c for c in d.choices) for d in pool)


@pytest.mark.parametrize("name,k", [("arc_easy", 25), ("piqa", 3), ("gsm8k", 5)])
def test_fewshot_draws_equal_lm_eval_context_sampler(real, name, k):
    """One Random(1234) over the documents in order; from the evaluated split (PIQA here) the harness
    draws k + 1 and drops the document itself."""
    task = real[name]
    docs = task.docs[:30]
    sampler = ContextSampler(list(task.fewshot_docs), rnd=1234)
    expect = [sampler.sample(k, eval_doc=d if task.fewshot_is_eval else None) for d in docs]
    got = T.draw_shots(task, docs, k)
    assert got == expect
    if task.fewshot_is_eval:
        assert all(d not in shots for d, shots in zip(docs, got))


def test_mmlu_shots_are_the_first_k_dev_rows_and_too_many_is_an_error(real):
    task = real["mmlu_astronomy"]
    assert T.draw_shots(task, task.docs[:3], 5) == [task.fewshot_docs[:5]] * 3
    with pytest.raises(ValueError, match=r"mmlu_astronomy: 6 few-shot examples asked, the pool .* has 5"):
        T.draw_shots(task, task.docs[:1], 6)
    with pytest.raises(ValueError, match="truthfulqa_mc2: no few-shot pool"):
        T.draw_shots(real["truthfulqa_mc2"], real["truthfulqa_mc2"].docs[:1], 1)


def test_context_joins_description_shots_and_query_as_the_harness_does(real):
    task = real["mmlu_astronomy"]
    shots = task.fewshot_docs[:2]
    ctx = T.build_context(task, task.docs[0], shots)
    expect = (task.description + "".join(f"{s.query} {s.choices[s.gold]}\n\n" for s in shots) + task.docs[0].query)
    assert ctx == expect


def test_open_llm_v1_preset_has_the_leaderboard_settings():
    assert T.PRESETS["open_llm_v1"] == {
        "arc_challenge": (25, "acc_norm,none"), "hellaswag": (10, "acc_norm,none"), "mmlu": (5, "acc,none"),
        "truthfulqa_mc2": (0, "acc,none"), "winogrande": (5, "acc,none"), "gsm8k": (5, "exact_match,strict-match")}


def test_truthfulqa_primer_comes_from_a_file_else_lm_eval_and_is_recorded(tmp_path):
    text, source = T.truthfulqa_primer(DATA)
    assert source.endswith("truthfulqa_mc1.yaml") and text.count("Q: ") == 6 and text.count("\nA: ") == 6
    (tmp_path / "truthfulqa").mkdir()
    (tmp_path / "truthfulqa" / "qa_primer.txt").write_text("Q: Is this ours?\nA: Yes.\n")
    assert T.truthfulqa_primer(tmp_path) == ("Q: Is this ours?\nA: Yes.", str(tmp_path / "truthfulqa" / "qa_primer.txt"))


def test_data_dir_defaults_to_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("BEZOAR_DATA", str(tmp_path))
    assert T.default_data_dir() == tmp_path
    with pytest.raises(ValueError, match=r"arc/ARC-Easy/ARC-Easy-Test\.jsonl: file not found .*BEZOAR_DATA"):
        T.load_tasks(["arc_easy"])


def test_winogrande_reads_the_release_format_and_says_where_it_looked(tmp_path):
    with pytest.raises(ValueError, match=r"winogrande/dev\.jsonl: file not found"):
        T.load_tasks(["winogrande"], tmp_path)
    (tmp_path / "winogrande").mkdir()
    (tmp_path / "winogrande" / "dev.jsonl").write_text(
        json.dumps({"sentence": "The jar broke the box because the _ was hard.", "option1": "jar",
                    "option2": "box", "answer": "1"}) + "\n")
    (task,) = T.load_tasks(["winogrande"], tmp_path)
    d = task.docs[0]
    assert (d.query, d.choices, d.gold, d.answer) == ("The jar broke the box because the ", ["jar", "box"], 0, "was hard.")
    assert T.build_context(task, d, []) == ["The jar broke the box because the jar", "The jar broke the box because the box"]
    assert T.fewshot_example(task, d) == "The jar broke the box because the jar was hard."


@pytest.mark.parametrize("path,content,message", [
    ("arc/ARC-Easy/ARC-Easy-Test.jsonl", '{"id": 1}\n', r"ARC-Easy-Test\.jsonl:1: missing field 'question'"),
    ("arc/ARC-Easy/ARC-Easy-Test.jsonl", '\n{not json\n', r"ARC-Easy-Test\.jsonl:2: not valid JSON"),
    ("arc/ARC-Easy/ARC-Easy-Test.jsonl", json.dumps({"question": {"stem": "s", "choices": [{"text": "a", "label": "A"}]},
                                                      "answerKey": "B"}), r":1: answerKey 'B' is not one of the labels \['A'\]"),
    ("boolq/val.jsonl", json.dumps({"question": "q", "passage": "p", "label": "maybe"}), r"val\.jsonl:1: label 'maybe'"),
    ("gsm8k/test.jsonl", json.dumps({"question": "q"}), r"test\.jsonl:1: missing field 'answer'"),
])
def test_bad_rows_are_one_line_errors_naming_file_and_line(tmp_path, path, content, message):
    target = tmp_path / path
    target.parent.mkdir(parents=True)
    target.write_text(content)
    (tmp_path / "arc/ARC-Easy").mkdir(parents=True, exist_ok=True)
    (tmp_path / "arc/ARC-Easy/ARC-Easy-Dev.jsonl").touch()
    (tmp_path / "gsm8k").mkdir(exist_ok=True)
    (tmp_path / "gsm8k/train.jsonl").touch()
    name = {"arc": "arc_easy", "boolq": "boolq", "gsm8k": "gsm8k"}[path.split("/")[0]]
    with pytest.raises(ValueError, match=message):
        T.load_tasks([name], tmp_path)


def test_mmlu_with_a_wrong_header_and_unknown_names_are_errors(tmp_path):
    (tmp_path / "mmlu/test").mkdir(parents=True)
    (tmp_path / "mmlu/dev").mkdir(parents=True)
    (tmp_path / "mmlu/test/anatomy_test.csv").write_text("q,a,b,c,d,ans\n")
    (tmp_path / "mmlu/dev/anatomy_dev.csv").write_text("")
    with pytest.raises(ValueError, match=r"anatomy_test\.csv:1: header .* expected question,choice0"):
        T.load_tasks(["mmlu_anatomy"], tmp_path)
    with pytest.raises(ValueError, match="unknown MMLU subject 'astrology'"):
        T.load_tasks(["mmlu_astrology"], tmp_path)
    with pytest.raises(ValueError, match="unknown task 'arc'; expected one of"):
        T.load_tasks(["arc"], tmp_path)


def test_toy_tasks_put_the_gold_answer_among_distinct_wrong_ones():
    mc, gen = T.toy_mc(50, 0), T.toy_gen(50, 0)
    for d in mc.docs:
        assert d.choices[d.gold] == world.reference_response(d.item) and len(set(d.choices)) == len(d.choices) >= 2
        assert all(world.extract_answer(c) != d.item.answer for i, c in enumerate(d.choices) if i != d.gold)
        assert world.split_of(d.item.family, d.item.operands) == "heldout"
        assert d.query == world.task_prompt(d.item) and d.query.endswith("### Response:\n")
    assert [d.item for d in mc.docs] == [d.item for d in gen.docs] == world.heldout_tasks(50, 0)
    assert len({d.gold for d in mc.docs}) > 1                                  # the gold's position varies
    d = gen.docs[0]
    assert gen.score_generation(d, world.reference_response(d.item, "step_by_step")) == {"exact_match,none": 1.0}
    assert gen.score_generation(d, world.make_wrong(d.item, __import__("random").Random(0))) == {"exact_match,none": 0.0}
