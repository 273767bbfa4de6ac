"""MT-Bench's judge: single-answer grading by an LLM (Zheng et al. 2023, §3.1 "single answer grading"), and the
figures FastChat's show_result.py reports from the judgments.

Which judge prompt (all read from judge_prompts.jsonl; no prompt text lives in the code):
    category              turn 1             turn 2 (the whole conversation is shown, turn 2 is graded)
    math, reasoning,      single-math-v1     single-math-v1-multi-turn      with the reference answers
    coding                                                                   {ref_answer_1}, {ref_answer_2}
    any other             single-v1          single-v1-multi-turn
The prompt's system_prompt goes as the system message, its prompt_template, filled in, as the one user message:
turn 1 fills {question}, {answer}; turn 2 fills {question_1}, {answer_1}, {question_2}, {answer_2}. The judge
samples at temperature 0 with up to 2048 new tokens (FastChat's settings for its OpenAI judges).

The rating (FastChat's rule): the first "[[x]]" in the reply, else the first "[x]", x being digits with an
optional decimal part (\\d+\\.?\\d*); "8" → 8, "8.5" → 8.5, "8." → 8.0; no match → -1. No range check.

One judgment per (question, model, turn), appended to the judgment file as soon as it arrives:
    {question_id, model, judge: [judge model, prompt name], user_prompt, judgment, score, turn, tstamp}
A reply without a rating is a judgment with score -1: written, and counted as failed by the figures. A request
that fails (after chat_api's retries) is not a judgment: nothing is written, it is counted, and the next run asks
again. A re-run skips the (question, model, turn) triples already in the file.

The figures (show_result.py's display_result_single): every row of the file, duplicates included; rows with
score -1 dropped; then per model the mean score of its turn-1 rows, of its turn-2 rows, and of all its rows
("overall"). We also count the rows dropped ("failed") and, given question.jsonl, average per category (both
turns), as the MT-Bench paper's category plots do.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter

from chat_api import completed_jobs
from files import read_jsonl
from synth.records import AppendLog

NEED_REF_CATS = ("math", "reasoning", "coding")           # FastChat's categories graded against a reference
JUDGE_PROMPT_NAMES = {(False, 1): "single-v1", (True, 1): "single-math-v1",
                      (False, 2): "single-v1-multi-turn", (True, 2): "single-math-v1-multi-turn"}
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
JUDGMENT_KEY = {"question_id": int, "model": str, "turn": int}  # one judgment per triple (resume)


# --- prompts and ratings --------------------------------------------------------------------------

def read_judge_prompts(path) -> dict:
    """{name: record} from judge_prompts.jsonl; the four single-grading prompts must be there, as strings,
    type "single", output format "[[rating]]"."""
    rows, _ = read_jsonl(path, {"name": str})
    prompts = {record["name"]: (number, record) for number, record in rows}
    for name in JUDGE_PROMPT_NAMES.values():
        if name not in prompts:
            raise ValueError(f"{path}: no judge prompt named {name!r} (found {sorted(prompts)})")
        number, record = prompts[name]
        for field in ("system_prompt", "prompt_template"):
            if not isinstance(record.get(field), str):
                raise ValueError(f"{path}:{number}: {name}: field {field!r} should be a string")
        if record.get("type") != "single" or record.get("output_format") != "[[rating]]":
            raise ValueError(f"{path}:{number}: {name}: expected type 'single' and output_format '[[rating]]', "
                             f"got {record.get('type')!r} and {record.get('output_format')!r}")
    return {name: record for name, (_, record) in prompts.items()}


def judge_prompt_name(category: str, turn: int) -> str:
    return JUDGE_PROMPT_NAMES[(category in NEED_REF_CATS, turn)]


def user_prompt(template: dict, question: dict, answer: dict, turn: int, reference: dict | None = None) -> str:
    """The judge's user message: template["prompt_template"] with this question's, answer's (and reference's)
    turns filled in. question: a question.jsonl record; answer, reference: model_answer records."""
    said = answer["choices"][0]["turns"]
    fields = ({"question": question["turns"][0], "answer": said[0]} if turn == 1 else
              {"question_1": question["turns"][0], "question_2": question["turns"][1],
               "answer_1": said[0], "answer_2": said[1]})
    if reference is not None:
        ref = reference["choices"][0]["turns"]
        fields.update(ref_answer_1=ref[0], ref_answer_2=ref[1])
    try:
        return template["prompt_template"].format(**fields)
    except (KeyError, IndexError) as err:
        raise ValueError(f"judge prompt {template['name']!r}: placeholder {err} is not one we fill "
                         f"({', '.join(sorted(fields))})") from None


def parse_rating(judgment: str):
    """The judge's rating: first [[x]], else first [x]; int or float as written; -1 when there is none."""
    match = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    if not match:
        return -1
    number = match.group(1)
    return float(number) if "." in number else int(number)


# --- judging --------------------------------------------------------------------------------------

def judge_answers(client, questions: list, answers: dict, judge_prompts: dict, references: dict, out_path, *,
                  concurrency: int = 8, max_failures: int = 100, progress: bool = True) -> Counter:
    """Judge turns 1 and 2 of every question for every model, appending to out_path (resumable).

    answers: {model: {question_id: model_answer record}}; references: {question_id: record} for the math,
    reasoning and coding questions; client: a chat_api.ChatClient. Returns counts: judged, unparsable (written
    with score -1), request failed (not written), already judged, no answer (questions a model did not answer)."""
    counts = Counter()
    for q in questions:
        if q["category"] in NEED_REF_CATS and q["question_id"] not in references:
            raise ValueError(f"question {q['question_id']} ({q['category']}) needs a reference answer; "
                             f"the reference file has none")
    with AppendLog(out_path, key=JUDGMENT_KEY) as log:
        for number, record in enumerate(log.records, start=1):
            if not (isinstance(record.get("judge"), list) and record["judge"][:1] == [client.model]):
                raise SystemExit(f"{out_path}:{number}: judged by {record.get('judge')!r}, this run's judge is "
                                 f"{client.model!r}; give this judge its own judgment file")
        jobs = []
        for model, by_id in answers.items():
            for q in questions:
                if q["question_id"] not in by_id:
                    counts["no answer"] += 2
                    continue
                for turn in (1, 2):
                    if (q["question_id"], model, turn) in log.ids:
                        counts["already judged"] += 1
                        continue
                    # the prompts are built here, before any request, so a bad template stops the run at once
                    name = judge_prompt_name(q["category"], turn)
                    reference = references[q["question_id"]] if q["category"] in NEED_REF_CATS else None
                    prompt = user_prompt(judge_prompts[name], q, by_id[q["question_id"]], turn, reference)
                    jobs.append((q, model, turn, name, prompt))

        def judge(job):
            q, model, turn, name, prompt = job
            judgment = client.chat([{"role": "user", "content": prompt}],
                                   system=judge_prompts[name]["system_prompt"])
            return {"question_id": q["question_id"], "model": model, "judge": [client.model, name],
                    "user_prompt": prompt, "judgment": judgment, "score": parse_rating(judgment), "turn": turn,
                    "tstamp": time.time()}

        def describe(job):
            q, model, turn, _, _ = job
            return f"question {q['question_id']} turn {turn} of {model}"

        for _, record in completed_jobs(judge, jobs, concurrency, counts, max_failures, name="judge", unit="judgment",
                                        endpoint="judge", failed="request failed", describe=describe,
                                        progress=progress):
            log.write(record)
            counts["judged"] += 1
            counts["unparsable"] += record["score"] == -1
    return counts


# --- show_result's figures ------------------------------------------------------------------------

def _mean(scores: list):
    return math.fsum(scores) / len(scores) if scores else None


def summarize(judgment_path, questions: list | None = None) -> dict:
    """FastChat show_result's single-mode figures for each model in a model_judgment file:
        {model: {turn_1, turn_2, overall: mean score or None, scored, failed: row counts,
                 categories: {category: mean over both turns} (with questions; ids not in them: "unknown")}}
    Models in order of overall mean, best first, as show_result sorts its "Average" table."""
    rows, _ = read_jsonl(judgment_path, {"model": str, "turn": int})
    category = {q["question_id"]: q["category"] for q in questions or []}
    scores = {}                           # model → [(turn, category, score)], failed rows excluded
    failed = Counter()
    for number, record in rows:
        score = record.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"{judgment_path}:{number}: field 'score' should be a number, got {score!r}")
        model = record["model"]
        scores.setdefault(model, [])
        if score == -1:
            failed[model] += 1
            continue
        scores[model].append((record["turn"], category.get(record.get("question_id"), "unknown"), score))
    result = {}
    for model, rated in scores.items():
        figures = {"turn_1": _mean([s for t, _, s in rated if t == 1]),
                   "turn_2": _mean([s for t, _, s in rated if t == 2]),
                   "overall": _mean([s for _, _, s in rated]),
                   "scored": len(rated), "failed": failed[model]}
        if questions is not None:
            figures["categories"] = {c: _mean([s for _, cat, s in rated if cat == c])
                                     for c in sorted({cat for _, cat, _ in rated})}
        result[model] = figures
    order = sorted(result, key=lambda m: -math.inf if result[m]["overall"] is None else result[m]["overall"],
                   reverse=True)
    return {model: result[model] for model in order}


def format_summary(summary: dict) -> str:
    """The figures as a plain table (means to 6 decimals, as pandas prints them)."""
    width = max([len("model")] + [len(m) for m in summary])
    show = lambda x: f"{'-':>9}" if x is None else f"{x:9.6f}"  # noqa: E731
    lines = [f"{'model':<{width}}  {'turn 1':>9}  {'turn 2':>9}  {'overall':>9}  {'scored':>6}  {'failed':>6}"]
    for model, f in summary.items():
        lines.append(f"{model:<{width}}  {show(f['turn_1'])}  {show(f['turn_2'])}  {show(f['overall'])}  "
                     f"{f['scored']:>6}  {f['failed']:>6}")
    categories = sorted({c for f in summary.values() for c in f.get("categories", {})})
    if categories:
        lines += ["", "per category, both turns:",
                  f"{'model':<{width}}  " + "  ".join(f"{c[:10]:>10}" for c in categories)]
        for model, f in summary.items():
            cells = [f["categories"].get(c) for c in categories]
            lines.append(f"{model:<{width}}  " + "  ".join(f"{'-':>10}" if x is None else f"{x:10.4f}"
                                                           for x in cells))
    return "\n".join(lines)
