"""Rate generated examples with a judge LLM; keep those rated at or above a threshold.

    python filter.py --in runs/data/lamini.jsonl runs/data/orca.jsonl --out runs/data/judged.jsonl \
        --filtered runs/data/filtered.jsonl --threshold 7
    python filter.py --in orca-evaluated-falcon-gpt4-v2.jsonl --rating-column gpt4_rating --threshold 8 \
        --out runs/data/orca-judged.jsonl --filtered runs/data/orca-filtered.jsonl

Judge mode. Every record goes to the judge with synth/prompts/judge.txt: the criteria (instruction following,
correctness, agreement with the reference answer where the record has one, completeness, clarity, safety) and
the answer form "Rating: 1-10 / Reason: …". The judge is any OpenAI-compatible server or Anthropic's API, named
by --judge-url/-model/-api or JUDGE_URL, JUDGE_MODEL, JUDGE_API, JUDGE_API_KEY (chat_api.py). The rating is read
leniently (parse_judgement); a reply without one is asked again with a reminder of the form, --parse-retries
times, then recorded as unparsable. Each judged record is appended to --out at once with
    judge_rating (number or null), judge_status ("rated" | "unparsable"), judge_reason, judge_model;
a re-run skips the ids already there. A record whose request failed is not written: it is counted, and judged
on the next run.

Released mode (--rating-column). The SurgeGlobal datasets (LaMini, EvolInstruct, Orca; exported to JSONL) carry
their judges' columns already (gpt4_rating, gpt4_reason, …): rows are mapped onto our schema and rated from the
named column, with no requests.

Both modes then rewrite --filtered whole, atomically: the judged records rated ≥ --threshold, in input order.
Nothing is dropped silently: counts per scheme and reason (kept, below_threshold, unparsable, not_judged).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

from chat_api import add_endpoint_args, client_from_args, completed_jobs
from config import run_cli
from files import check_fields, lock_folder, read_jsonl, write_jsonl_atomic
from synth.records import RECORD_FIELDS, AppendLog

PROMPTS = Path(__file__).with_name("synth") / "prompts"
JUDGE_PROMPT = (PROMPTS / "judge.txt").read_text(encoding="utf-8")
RETRY_PROMPT = (PROMPTS / "judge_retry.txt").read_text(encoding="utf-8")
THRESHOLD = 7.0   # keep ratings ≥ this (--threshold's default; also the embedded default's on-policy pairs)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--in", dest="inputs", nargs="+", required=True, help="generated JSONL files (synth/SCHEMA.md)")
    p.add_argument("--out", required=True, help="every judged record; re-running with the same --out resumes")
    p.add_argument("--filtered", required=True, help="the records rated ≥ --threshold")
    p.add_argument("--threshold", type=float, default=THRESHOLD,
                   help="keep ratings ≥ this; ours is 1–10, the paper's scale and cut-off are not published")
    p.add_argument("--parse-retries", type=int, default=2, help="re-asks when the judge's reply has no rating")
    p.add_argument("--rating-column", help="released mode: rate SurgeGlobal rows from this column, e.g. gpt4_rating")
    p.add_argument("--skip-bad", action="store_true", help="count and skip malformed input lines instead of stopping")
    p.add_argument("--max-failures", type=int, default=100,
                   help="stop after this many failed requests: the judge is probably down")
    add_endpoint_args(p, "judge", temperature=0.0)
    return p.parse_args(argv)


# --- reading a judge's reply ------------------------------------------------------------------------

_NUMBER = r"(\d+(?:\.\d+)?)"
_RATING_PATTERNS = [
    re.compile(rf"^\s*{_NUMBER}\s*$"),  # the whole reply is a number
    re.compile(rf"\brating\b\W{{0,6}}{_NUMBER}", re.I),  # Rating: 8 | **Rating:** 8 | "rating": 8
    re.compile(rf"\[\[{_NUMBER}\]\]"),  # [[8]], MT-Bench's form
    re.compile(rf"\bscore\b\W{{0,6}}{_NUMBER}", re.I),  # Score: 8
    re.compile(rf"{_NUMBER}\s*(?:/|out of)\s*10\b", re.I),  # 8/10, 8 out of 10
]
_REASON = re.compile(r"\breason\b\W{0,6}(.+)", re.I | re.S)


def parse_judgement(text: str, low: float = 1, high: float | None = 10) -> tuple[float | None, str]:
    """(rating, reason) from a judge's reply; rating None when none is found or it lies outside [low, high].

    Tried in order: a JSON object with "rating" or "score" (and "reason"), then the patterns above, first
    match wins. The reason is what follows "Reason:", else the whole reply, cut to 500 characters."""
    rating, reason = None, None
    for match in re.finditer(r"\{[^{}]*\}", text):
        try:
            obj = json.loads(match.group(0))
        except ValueError:
            continue
        value = obj.get("rating", obj.get("score"))
        if isinstance(value, (int, float)) or (isinstance(value, str) and re.fullmatch(_NUMBER, value.strip())):
            rating, reason = float(value), obj.get("reason")
            break
    if rating is None:
        for pattern in _RATING_PATTERNS:
            match = pattern.search(text)
            if match:
                rating = float(match.group(1))
                break
    if rating is not None and (rating < low or (high is not None and rating > high)):
        rating = None
    if not isinstance(reason, str):
        match = _REASON.search(text)
        reason = match.group(1) if match else text
    return rating, reason.strip()[:500]


def judge_prompt(record: dict) -> str:
    return JUDGE_PROMPT.format(system=record["system"] or "(none)", instruction=record["instruction"],
                               input=record["input"] or "(none)", reference=record.get("targets") or "(none)",
                               response=record["response"])


# --- released SurgeGlobal rows ----------------------------------------------------------------------

def released_record(row: dict, rating_column: str, where: str, default_id: str) -> dict:
    """A SurgeGlobal row mapped onto our schema, rated from its own column. Columns (dataset cards):
    LaMini: instruction, source, response; EvolInstruct: instruction, response, category, evolution_strategy,
    in-depth-evolving_operation, epoch; Orca: inputs, targets, task_source, task_name, template_type,
    system_message, explained_targets. Each also has {judge}_status, {judge}_rating, {judge}_reason."""
    if "explained_targets" in row:
        record = {"scheme": "orca", "instruction": row.get("inputs"), "response": row["explained_targets"],
                  "system": row.get("system_message") or "", "targets": row.get("targets")}
    elif "evolution_strategy" in row:
        record = {"scheme": "evol", "instruction": row.get("instruction"), "response": row.get("response"),
                  "system": "", "in_depth_evolving_operation": row.get("in-depth-evolving_operation")}
    elif "instruction" in row and "response" in row:
        record = {"scheme": "lamini", "instruction": row["instruction"], "response": row["response"], "system": ""}
    else:
        raise ValueError(f"{where}: not a LaMini, EvolInstruct or Orca row (columns {sorted(row)})")
    record = {**row, "id": str(row.get("id", default_id)), "input": "", **record}
    check_fields(record, RECORD_FIELDS, where)
    if rating_column not in row:
        raise ValueError(f"{where}: no column {rating_column!r} (columns {sorted(row)})")
    judge = rating_column.removesuffix("_rating")
    rating, _ = parse_judgement(str(row[rating_column] or ""), low=0, high=None)
    record.update(judge_rating=rating, judge_status="rated" if rating is not None else "unparsable",
                  judge_reason=str(row.get(f"{judge}_reason") or ""), judge_model=judge)
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    with lock_folder(out.parent, output=out.name):   # one run per --out; a second stops here (files.py)
        return judge_and_filter(args)


def judge_and_filter(args) -> int:
    released = args.rating_column is not None

    # --- inputs -----------------------------------------------------------------------------------
    records, seen = [], {}
    for path in args.inputs:
        rows, bad = read_jsonl(path, None if released else RECORD_FIELDS, skip_bad=args.skip_bad)
        for line, row in rows:
            where = f"{path}:{line}"
            if released:
                try:
                    row = released_record(row, args.rating_column, where, f"{Path(path).stem}-{line:06d}")
                except ValueError:
                    if not args.skip_bad:
                        raise
                    bad += 1
                    continue
            if row["id"] in seen:
                raise ValueError(f"{where}: duplicate id {row['id']!r} (first at {seen[row['id']]})")
            seen[row["id"]] = where
            records.append(row)
        print(f"input: {path}: {len(rows)} records" + (f", {bad} malformed lines skipped" if bad else ""))

    # --- judging ----------------------------------------------------------------------------------
    client = None
    if released:
        judged = {r["id"]: r for r in records}
        write_jsonl_atomic(args.out, records)
    else:
        client = client_from_args(args, "judge")  # takes the key out of args
        print(f"filter: {json.dumps(vars(args))}")
        print(repr(client))

        def judge(record):
            messages = [{"role": "user", "content": judge_prompt(record)}]
            for _ in range(args.parse_retries + 1):
                reply = client.chat(messages)
                rating, reason = parse_judgement(reply)
                if rating is not None:
                    return {"judge_rating": rating, "judge_status": "rated", "judge_reason": reason,
                            "judge_model": client.model}
                messages = messages + [{"role": "assistant", "content": reply or "(empty reply)"},
                                       {"role": "user", "content": RETRY_PROMPT}]
            return {"judge_rating": None, "judge_status": "unparsable", "judge_reason": reply[:500],
                    "judge_model": client.model}

        try:
            with AppendLog(args.out) as log:
                todo = [r for r in records if r["id"] not in log.ids]
                print(f"filter: {len(records) - len(todo)} already judged in {args.out}, {len(todo)} to judge")
                for record, judgement in completed_jobs(judge, todo, args.concurrency, Counter(), args.max_failures,
                                                        name="judge", unit="rec", endpoint="judge"):
                    log.write({**record, **judgement})
                judged = {r["id"]: r for r in log.records}
        finally:
            print(client.summary())
            client.close()

    # --- threshold, filtered file, counts ---------------------------------------------------------
    kept, counts = [], {}
    for record in records:
        r = judged.get(record["id"])
        if r is None:
            reason = "not_judged"
        elif r["judge_rating"] is None:
            reason = "unparsable"
        elif r["judge_rating"] >= args.threshold:
            reason = "kept"
            kept.append(r)
        else:
            reason = "below_threshold"
        counts.setdefault(record["scheme"], Counter())[reason] += 1
    write_jsonl_atomic(args.filtered, kept)
    total = Counter()
    for scheme, c in sorted(counts.items()):
        total.update(c)
        print(f"filter: scheme={scheme} records={sum(c.values())} " + _counts(c))
    print(f"filter: all records={sum(total.values())} {_counts(total)} threshold={args.threshold} "
          f"filtered={args.filtered}")
    if total["not_judged"]:
        print(f"filter: {total['not_judged']} records not judged (request failed); run again to judge them")
    return 1 if total["not_judged"] else 0


def _counts(c: Counter) -> str:
    return " ".join(f"{k}={c[k]}" for k in ("kept", "below_threshold", "unparsable", "not_judged"))


if __name__ == "__main__":
    run_cli(main)
