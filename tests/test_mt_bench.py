"""MT-Bench: FastChat's rating rule, judge prompts from judge_prompts.jsonl (references for math, reasoning and
coding), show_result's figures, and answer + judge end to end with a micro model and a judge on 127.0.0.1 in both
API dialects, killed and resumed.

The real files in ../shared/data/mt_bench serve the figures check: the 11 published model_answer files are judged
by a local server whose rating is a function of the exact prompt it receives, and every expected number (the
prompts, by plain text substitution; the scores; the means, in exact fractions) is derived here from the data
files alone. (The data has no published judgment file, hence no published MT-Bench figure to compare with.)"""
import hashlib
import json
from fractions import Fraction
from pathlib import Path

import pytest

import evaluate
import evals.mt_bench as mt
from chat_api import ChatClient
from data.hh import dialogue_prompt
from data.template import format_prompt
from evals.mt_bench_judge import judge_answers, parse_rating, read_judge_prompts, summarize
from micro_model import micro_model
from model import Tokenizer
from model.sampling import generate
from tests.http_fixtures import FakeChatServer

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mt_bench"
QUESTIONS = DATA / "question.jsonl"
PROMPTS = DATA / "judge_prompts.jsonl"
REFERENCE = DATA / "reference_answer" / "gpt-4.jsonl"
ANSWER_FIELDS = {"question_id", "answer_id", "model_id", "choices", "tstamp"}          # FastChat's model_answer
JUDGMENT_FIELDS = {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}
# FastChat's temperature_config, and the categories it grades against a reference, written out by hand
FASTCHAT_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                        "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
WITH_REFERENCE = {"math", "reasoning", "coding"}


def jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def expected_prompt(templates, question, answer_turns, turn, reference_turns=None):
    """(prompt name, system, user) by plain str.replace of each placeholder: no str.format involved."""
    ref = question["category"] in WITH_REFERENCE
    name = {(False, 1): "single-v1", (True, 1): "single-math-v1", (False, 2): "single-v1-multi-turn",
            (True, 2): "single-math-v1-multi-turn"}[(ref, turn)]
    t = templates[name]
    fill = ({"{question}": question["turns"][0], "{answer}": answer_turns[0]} if turn == 1 else
            {"{question_1}": question["turns"][0], "{question_2}": question["turns"][1],
             "{answer_1}": answer_turns[0], "{answer_2}": answer_turns[1]})
    if ref:
        fill.update({"{ref_answer_1}": reference_turns[0], "{ref_answer_2}": reference_turns[1]})
    # substitute in one left-to-right pass so that braces inside answers are never re-read as placeholders
    user, text = "", t["prompt_template"]
    while text:
        hits = [(text.find(k), k) for k in fill if text.find(k) >= 0]
        if not hits:
            user += text
            break
        at, key = min(hits)
        user, text = user + text[:at] + fill[key], text[at + len(key):]
    return name, t["system_prompt"], user


# --- the rating ------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, rating", [
    ("Rating: [[8]]", 8),                                   # the asked-for form
    ("[[8.5]]", 8.5),                                       # a decimal part is kept
    ("Rating: [8]", 8),                                     # the one-bracket fallback
    ("I cannot judge this.", -1),                           # nothing: failed
    ("[[8]] and later [[3]]", 8),                           # the first match
    ("A list [2] then the verdict [[9]]", 9),               # [[x]] is looked for first, anywhere
    ("[[8.]]", 8.0),                                        # \d+\.?\d*: a trailing point makes a float
    ("[[10]]", 10), ("[[1000]]", 1000),                     # no range check
    ("[[ 8 ]]", -1), ("[[-3]]", -1), ("[[8/10]]", -1),      # spaces, signs, fractions do not match
    ("Rating: [[seven]] [7]", 7),                           # falls back past a non-number
    ("", -1),
])
def test_rating_is_parsed_as_fastchat_parses_it(reply, rating):
    parsed = parse_rating(reply)
    assert parsed == rating and type(parsed) is type(rating)


# --- judge prompts ----------------------------------------------------------------------------------

def test_judge_prompts_come_from_the_data_file_with_references_for_math_reasoning_coding():
    templates = {r["name"]: r for r in jsonl(PROMPTS)}
    questions = {q["question_id"]: q for q in jsonl(QUESTIONS)}
    references = {r["question_id"]: r for r in jsonl(REFERENCE)}
    answer = {"choices": [{"index": 0, "turns": ["first {answer} with braces", "second answer"]}]}
    ours = read_judge_prompts(PROMPTS)
    from evals.mt_bench_judge import judge_prompt_name, user_prompt
    seen = set()
    for qid, q in questions.items():
        for turn in (1, 2):
            ref = references.get(qid) if q["category"] in WITH_REFERENCE else None
            name, system, user = expected_prompt(templates, q, answer["choices"][0]["turns"], turn,
                                                 ref and ref["choices"][0]["turns"])
            assert judge_prompt_name(q["category"], turn) == name
            assert ours[name]["system_prompt"] == system
            assert user_prompt(ours[name], q, answer, turn, ref) == user
            if ref is not None:
                assert ref["choices"][0]["turns"][turn - 1] in user    # the reference answer is shown
            seen.add(name)
    assert seen == {"single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"}
    # the wording lives in the data file only: no line of any judge prompt appears in our code
    source = "".join(Path(mt.__file__).with_name(f).read_text() for f in ("mt_bench.py", "mt_bench_judge.py"))
    lines = {line for t in templates.values() for part in (t["system_prompt"], t["prompt_template"])
             for line in part.splitlines() if len(line) > 20}
    assert lines and not [line for line in lines if line in source]


def test_bad_question_and_judgment_lines_are_named(tmp_path):
    bad = tmp_path / "question.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "category": "math", "turns": ["only one"]}) + "\n")
    with pytest.raises(ValueError, match=r"question.jsonl:1: 'turns' should be two"):
        mt.read_questions(bad)
    judged = tmp_path / "j.jsonl"
    judged.write_text(json.dumps({"model": "m", "turn": 1, "score": 8}) + "\n" +
                      json.dumps({"model": "m", "turn": 1, "score": "8"}) + "\n")
    with pytest.raises(SystemExit, match=r"j.jsonl:2: field 'score' should be a number"):
        evaluate.main(["mt-bench-show", str(judged)])


# --- show_result's figures ----------------------------------------------------------------------------

def hashed_judge(system, messages):
    """A judge whose reply is a function of the exact system + user text it receives."""
    v = hashlib.sha256((system + "\0" + messages[-1]["content"]).encode()).digest()[0]
    if v % 9 == 0:
        return "No verdict."
    if v % 9 == 1:
        return f"Score: [{v % 10 + 1}]"
    if v % 9 == 2:
        return f"Good. [[{v % 10}.5]]"
    return f"Rating: [[{v % 10 + 1}]]"


def hashed_score(system, user):
    v = hashlib.sha256((system + "\0" + user).encode()).digest()[0]
    return {0: -1, 1: v % 10 + 1, 2: Fraction(2 * (v % 10) + 1, 2)}.get(v % 9, v % 10 + 1)


def test_show_figures_on_the_real_answers_equal_an_independent_recomputation(tmp_path, capsys):
    """All 11 model_answer files, 80 questions, 2 turns: 1760 judgments, then 5 rows appended again (show_result
    counts duplicates). Expected: per model, exact means of the scores ≠ -1 per turn, overall, per category."""
    templates = {r["name"]: r for r in jsonl(PROMPTS)}
    questions = jsonl(QUESTIONS)
    references = {r["question_id"]: r for r in jsonl(REFERENCE)}
    files = sorted((DATA / "model_answer").glob("*.jsonl"))
    assert len(files) == 11
    answers = {f.name[:-len(".jsonl")]: mt.read_answers(f) for f in files}
    out = tmp_path / "gpt-4_single.jsonl"
    with FakeChatServer(hashed_judge) as server:
        client = ChatClient(server.openai_url, "gpt-4", "openai", None, max_tokens=2048, temperature=0.0,
                            backoff_factor=0.01)
        counts = judge_answers(client, questions, answers, read_judge_prompts(PROMPTS), mt.read_answers(REFERENCE),
                               out, concurrency=8, progress=False)
        client.close()
    assert counts["judged"] == 11 * 80 * 2 and counts["request failed"] == 0
    lines = open(out).read().splitlines()
    with open(out, "a") as f:                                   # duplicates, as FastChat's appends can leave
        f.write("\n".join(lines[:5]) + "\n")

    rows = []                                                   # (model, turn, category, score) from the data
    for model, by_id in answers.items():
        for q in questions:
            for turn in (1, 2):
                ref = references.get(q["question_id"])
                _, system, user = expected_prompt(templates, q, by_id[q["question_id"]]["choices"][0]["turns"],
                                                  turn, ref and ref["choices"][0]["turns"])
                rows.append((model, turn, q["category"], q["question_id"], hashed_score(system, user)))
    written = jsonl(out)
    by_key = {(r[0], r[3], r[1]): r for r in rows}
    rows += [by_key[(r["model"], r["question_id"], r["turn"])] for r in written[-5:]]
    assert all(r["score"] == by_key[(r["model"], r["question_id"], r["turn"])][4] for r in written)

    def mean(scores):
        return float(sum(scores, Fraction(0)) / len(scores)) if scores else None

    summary = summarize(out, questions)
    assert list(summary) == sorted(answers, key=lambda m: -mean([r[4] for r in rows if r[0] == m and r[4] != -1]))
    for model in answers:
        ok = [r for r in rows if r[0] == model and r[4] != -1]
        assert summary[model] == {
            "turn_1": mean([r[4] for r in ok if r[1] == 1]), "turn_2": mean([r[4] for r in ok if r[1] == 2]),
            "overall": mean([r[4] for r in ok]), "scored": len(ok),
            "failed": sum(1 for r in rows if r[0] == model and r[4] == -1),
            "categories": {c: mean([r[4] for r in ok if r[2] == c]) for c in sorted(FASTCHAT_TEMPERATURE)}}
    assert sum(f["failed"] for f in summary.values()) > 0            # the check covers failed rows too

    evaluate.main(["mt-bench-show", str(out), "--json"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["models"] == json.loads(json.dumps(summary))
    evaluate.main(["mt-bench-show", str(out), "--questions", "none"])
    text = capsys.readouterr().out
    first = next(iter(summary))
    assert f"{summary[first]['overall']:9.6f}" in text and "per category" not in text


# --- answer + judge end to end -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A random 2-layer LLaMA (hidden 64) and a 384-piece toy tokenizer, as a Hugging Face folder."""
    return micro_model(tmp_path_factory.mktemp("micro"), max_position_embeddings=1024)[0]


@pytest.fixture(scope="module")
def eight_questions(tmp_path_factory):
    """The first real question of each category."""
    firsts = {}
    for q in jsonl(QUESTIONS):
        firsts.setdefault(q["category"], q)
    path = tmp_path_factory.mktemp("q") / "question.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in firsts.values()))
    return path, list(firsts.values())


def spy_on_generate(monkeypatch):
    calls = []

    def spy(model, prompts, max_new_tokens, **kw):
        calls.append((prompts, max_new_tokens, kw["temperature"]))
        return generate(model, prompts, max_new_tokens, **kw)
    monkeypatch.setattr(mt, "generate", spy)
    return calls


def picky_judge(system, messages):
    """Rates 7, except every prompt holding the first writing question, which gets a reply with no rating."""
    return "I would rather not say." if "Hawaii" in messages[-1]["content"] else "Fine answer. Rating: [[7]]"


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_answer_and_judge_end_to_end_with_a_micro_model(api, micro, eight_questions, tmp_path, monkeypatch, capsys):
    qpath, questions = eight_questions
    calls = spy_on_generate(monkeypatch)
    monkeypatch.setenv("JUDGE_API_KEY", "sk-judge-secret-123")
    with FakeChatServer(picky_judge, api_key="sk-judge-secret-123") as server:
        url = server.openai_url if api == "openai" else server.anthropic_url
        with pytest.raises(SystemExit, match="^mt-bench: give --model"):
            evaluate.main(["mt-bench", "--judge-url", url, "--judge-model", "j"])
        evaluate.main(["mt-bench", "--model", str(micro), "--model-id", "micro", "--questions", str(qpath),
                       "--out-dir", str(tmp_path), "--max-new-tokens", "6", "--batch-size", "4",
                       "--judge-url", url, "--judge-api", api, "--judge-model", "judge-1", "--backoff", "0.01",
                       "--answers-from", str(DATA / "model_answer" / "alpaca-13b.jsonl")])
        requests = list(server.requests)
    out = capsys.readouterr().out
    assert "sk-judge-secret-123" not in out

    # answers: FastChat's fields, both turns, our template, FastChat's temperature per category
    answers = jsonl(tmp_path / "model_answer" / "micro.jsonl")
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    for a in answers:
        assert set(a) == ANSWER_FIELDS and a["model_id"] == "micro" and isinstance(a["tstamp"], float)
        assert len(a["choices"]) == 1 and a["choices"][0]["index"] == 0 and len(a["choices"][0]["turns"]) == 2
    tok = Tokenizer(micro / "tokenizer.model")
    prompted = {}                                 # prompt ids → (temperature, max_new_tokens)
    for prompts, max_new, temperature in calls:
        for ids in prompts:
            prompted[tuple(ids)] = (temperature, max_new)
    for q, a in zip(questions, answers):
        a1 = a["choices"][0]["turns"][0]
        turn_2 = dialogue_prompt([("Human", q["turns"][0]), ("Assistant", a1), ("Human", q["turns"][1])]) if a1 \
            else format_prompt(f"Human: {q['turns'][0]}\nAssistant: \nHuman: {q['turns'][1]}")
        for text in (format_prompt(q["turns"][0]), turn_2):
            assert prompted[tuple(tok.encode(text))] == (FASTCHAT_TEMPERATURE[q["category"]], 6)
    model = mt.load_model(mt.parse_args(["--model", str(micro), "--no-judge"]))[0]
    math_q, math_a = next((q, a) for q, a in zip(questions, answers) if q["category"] == "math")
    greedy = generate(model, [tok.encode(format_prompt(math_q["turns"][0]))], 6, eos_id=tok.eos_id,
                      stop_strings=mt.STOP_STRINGS, tokenizer=tok)[0].text.strip()
    assert math_a["choices"][0]["turns"][0] == greedy             # temperature 0: the greedy continuation

    # judgments: FastChat's fields, one per (question, turn), the data file's prompts, judge settings
    everything = jsonl(tmp_path / "model_judgment" / "judge-1_single.jsonl")
    judgments = [j for j in everything if j["model"] == "micro"]
    expected = sorted((q["question_id"], t) for q in questions for t in (1, 2))
    assert sorted((j["question_id"], j["turn"]) for j in judgments) == expected
    # the other model's answers, from its file, judged alongside: named by the file, as FastChat names them
    alpaca = mt.read_answers(DATA / "model_answer" / "alpaca-13b.jsonl")
    others = [j for j in everything if j["model"] != "micro"]
    assert {j["model"] for j in others} == {"alpaca-13b"}
    assert sorted((j["question_id"], j["turn"]) for j in others) == expected
    for j in others:
        q = next(q for q in questions if q["question_id"] == j["question_id"])
        ref = {r["question_id"]: r for r in jsonl(REFERENCE)}.get(q["question_id"])
        assert j["user_prompt"] == expected_prompt({r["name"]: r for r in jsonl(PROMPTS)}, q,
                                                   alpaca[q["question_id"]]["choices"][0]["turns"], j["turn"],
                                                   ref and ref["choices"][0]["turns"])[2]
    templates = {r["name"]: r for r in jsonl(PROMPTS)}
    references = {r["question_id"]: r for r in jsonl(REFERENCE)}
    by_id = {a["question_id"]: a for a in answers}
    for j in judgments:
        q = next(q for q in questions if q["question_id"] == j["question_id"])
        ref = references.get(q["question_id"])
        name, system, user = expected_prompt(templates, q, by_id[q["question_id"]]["choices"][0]["turns"],
                                             j["turn"], ref and ref["choices"][0]["turns"])
        assert set(j) == JUDGMENT_FIELDS and j["model"] == "micro" and j["judge"] == ["judge-1", name]
        assert j["user_prompt"] == user
        assert j["score"] == (-1 if q["category"] == "writing" else 7)
    assert len(requests) == 32
    for r in requests:
        body = r["body"]
        assert (body["temperature"], body["max_tokens"], body["model"]) == (0.0, 2048, "judge-1")
        system = body["system"] if api == "anthropic" else body["messages"][0]["content"]
        assert system in {t["system_prompt"] for t in templates.values()}
    assert "sk-judge-secret-123" not in json.dumps(judgments)

    # the figures: the unrated writing judgments are failed, not averaged
    summary = summarize(tmp_path / "model_judgment" / "judge-1_single.jsonl")
    for model in ("micro", "alpaca-13b"):
        assert summary[model] == {"turn_1": 7.0, "turn_2": 7.0, "overall": 7.0, "scored": 14, "failed": 2}
    assert "micro" in out and "7.000000" in out


def test_resume_skips_finished_answers_and_judgments_and_redoes_failed_requests(micro, eight_questions, tmp_path,
                                                                                monkeypatch, capsys):
    qpath, questions = eight_questions
    answers = tmp_path / "model_answer" / "micro.jsonl"
    judgments = tmp_path / "model_judgment" / "judge-1_single.jsonl"
    argv = ["mt-bench", "--model", str(micro), "--model-id", "micro", "--questions", str(qpath),
            "--out-dir", str(tmp_path), "--max-new-tokens", "4", "--judge-model", "judge-1", "--max-retries", "0",
            "--backoff", "0.01", "--concurrency", "2"]
    with FakeChatServer(picky_judge) as server:
        argv += ["--judge-url", server.openai_url]
        evaluate.main(argv + ["--no-judge", "--first-n", "3"])
        # a kill in the middle of writing the 4th record: 3 whole lines and a torn one
        whole = answers.read_bytes()
        answers.write_bytes(whole + b'{"question_id": 111, "answer_id": "to')
        calls = spy_on_generate(monkeypatch)
        server.inject(("status", 500, None), ("status", 500, None))    # two judge requests fail: not written
        with pytest.raises(SystemExit, match="2 judgments not made"):
            evaluate.main(argv)
        answered = {tuple(ids) for prompts, _, _ in calls for ids in prompts}
        assert len(answered) == 2 * 5                                    # turns 1 and 2 of the 5 missing only
        assert answers.read_bytes().startswith(whole)                    # what was written stays as it was
        assert [a["question_id"] for a in jsonl(answers)] == [q["question_id"] for q in questions]
        assert len(jsonl(judgments)) == 14 and len(server.requests) == 16
        calls.clear()
        evaluate.main(argv)                                              # nothing to answer, 2 to judge
        assert calls == [] and len(server.requests) == 18
    final = jsonl(judgments)
    assert len(final) == 16 and len({(j["question_id"], j["turn"]) for j in final}) == 16
    with FakeChatServer(picky_judge) as server:                          # another judge, same file: refused
        with pytest.raises(SystemExit, match=r"judge-1_single.jsonl:1: judged by \['judge-1'"):
            evaluate.main(argv[:-2] + ["--judge-url", server.openai_url, "--judge-model", "judge-2",
                                       "--judgments", str(judgments)])
    capsys.readouterr()


def test_show_means_drop_failed_rows_and_keep_duplicates_by_hand(tmp_path):
    """a: turn 1 rated 8, 9, 8 (the 8 twice: a duplicate row) and -1; turn 2 rated 7 and 7.5.
        turn 1 = 25/3, turn 2 = 14.5/2 = 7.25, overall = 39.5/5 = 7.9; 5 scored, 1 failed.
    b: only failed rows: no means, 0 scored, 2 failed, listed last."""
    rows = [("a", 81, 1, 8), ("a", 82, 1, 9), ("a", 83, 1, -1), ("a", 81, 1, 8), ("a", 81, 2, 7),
            ("a", 82, 2, 7.5), ("b", 81, 1, -1), ("b", 81, 2, -1.0)]
    path = tmp_path / "judgment.jsonl"
    path.write_text("".join(json.dumps({"question_id": q, "model": m, "judge": ["j", "single-v1"], "user_prompt": "",
                                        "judgment": "", "score": s, "turn": t, "tstamp": 0.0}) + "\n"
                            for m, q, t, s in rows))
    summary = summarize(path)
    assert list(summary) == ["a", "b"]
    assert summary["a"] == {"turn_1": 25 / 3, "turn_2": 7.25, "overall": 7.9, "scored": 5, "failed": 1}
    assert summary["b"] == {"turn_1": None, "turn_2": None, "overall": None, "scored": 0, "failed": 2}
