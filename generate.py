"""Synthetic instruction data from a generator LLM: --scheme lamini | evol | orca.

    python generate.py --scheme lamini --seeds dolly.jsonl --topics topics.txt --n 200 --out runs/data/lamini.jsonl
    python generate.py --scheme evol --seeds dolly.jsonl --rounds 4 --out runs/data/evol.jsonl
    python generate.py --scheme orca --tasks flan.jsonl --out runs/data/orca.jsonl

The generator is any OpenAI-compatible server (vLLM, TGI, llama.cpp, SGLang, OpenAI) or Anthropic's API, named
by --generator-url/-model/-api or GENERATOR_URL, GENERATOR_MODEL, GENERATOR_API, GENERATOR_API_KEY (chat_api.py).

Each pass runs its jobs `--concurrency` at a time and appends every finished record to its file at once
(synth/records.py). Job ids come from the flags and the input files, never from timing, so re-running the same
command skips what is done: a killed run resumes and ends with each id exactly once. When every job is done,
the files are rewritten in id order (atomically): appended as answers arrived, their order would differ from
run to run, and so would the training that reads them. Files written:
    lamini  OUT.instructions.jsonl (one line per instruction request), then OUT (one line per example)
    evol    OUT (surviving evolutions) and OUT.eliminated.jsonl (eliminated ones, with the reason)
    orca    OUT
The fields are listed in synth/SCHEMA.md. Exit status 1 when jobs failed: run the same command again.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

from chat_api import ChatAPIError, add_endpoint_args, client_from_args, completed_jobs
from config import run_cli
from files import lock_folder, read_jsonl, write_jsonl_atomic
from synth import evol_instruct, lamini, orca
from synth.records import AppendLog, read_lines


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scheme", required=True, choices=["lamini", "evol", "orca"])
    p.add_argument("--out", required=True, help="output JSONL; re-running with the same --out resumes")
    p.add_argument("--seeds", help="lamini, evol: seed instructions in databricks-dolly-15k's JSONL format "
                   "(instruction, context, response, category; lamini reads only instruction)")
    p.add_argument("--topics", help="lamini: topic list, one per line, for topic-guided requests")
    p.add_argument("--tasks", help="orca: Flan-style JSONL (inputs, targets, task_name, template_type)")
    p.add_argument("--n", type=int, help="lamini: instruction requests (required); evol: seed chains; orca: tasks. "
                   "evol and orca take all rows when unset, else a seeded sample of n")
    p.add_argument("--seed", type=int, default=0, help="seeds every sampling choice; same seed, same jobs")
    p.add_argument("--examples", type=int, default=3, help="lamini: seed instructions shown per request (LaMini: 3)")
    p.add_argument("--per-request", type=int, default=10, help="lamini: instructions asked for per request")
    p.add_argument("--topic-fraction", type=float, default=0.5, help="lamini: share of topic-guided requests")
    p.add_argument("--dedup-threshold", type=float, default=0.7,
                   help="lamini: drop an instruction whose ROUGE-L F1 with a kept one is ≥ this (Self-Instruct: 0.7)")
    p.add_argument("--rounds", type=int, default=4, help="evol: evolution rounds (WizardLM ran 4)")
    p.add_argument("--min-response-words", type=int, default=3, help="evol: shorter answers are eliminated")
    p.add_argument("--skip-bad", action="store_true", help="count and skip malformed input lines instead of stopping")
    p.add_argument("--max-failures", type=int, default=100,
                   help="stop a pass after this many failed jobs: the endpoint is probably down")
    add_endpoint_args(p, "generator", temperature=0.7)
    args = p.parse_args(argv)
    needs = {"lamini": ["seeds", "n"], "evol": ["seeds"], "orca": ["tasks"]}[args.scheme]
    missing = [f"--{name}" for name in needs if getattr(args, name) is None]
    if missing:
        p.error(f"--scheme {args.scheme} needs {' and '.join(missing)}")
    if args.n is not None and args.n < 1 or not 0 <= args.topic_fraction <= 1 or args.rounds < 1:
        p.error("expected --n ≥ 1, 0 ≤ --topic-fraction ≤ 1, --rounds ≥ 1")
    return args


def read_input(path, fields, args) -> list[tuple[int, dict]]:
    rows, bad = read_jsonl(path, fields, skip_bad=args.skip_bad)
    print(f"input: {path}: {len(rows)} records" + (f", {bad} malformed lines skipped" if bad else ""))
    return rows


def sample(rows: list, n: int | None, seed: int, what: str) -> list:
    """A seeded sample of n rows (all when n is None), in a fixed order; a larger n extends a smaller one."""
    order = list(rows)
    random.Random(f"{seed}:{what}").shuffle(order)
    return order if n is None else order[:n]


def run_pass(name, jobs, work, out: AppendLog, args, rejected: AppendLog | None = None) -> Counter:
    """work(job) → record for every job whose id is not yet in `out` (or `rejected`), args.concurrency at a
    time; each record is appended as it arrives. A record carrying a truthy "eliminated" goes to `rejected`."""
    done = out.ids | (rejected.ids if rejected else set())
    todo = [job for job in jobs if job["id"] not in done]
    counts = Counter(already_done=len(jobs) - len(todo))
    # a ValueError is a reply we cannot use (lamini.parse_numbered_list): that job failed, the others go on
    for job, record in completed_jobs(work, todo, args.concurrency, counts, args.max_failures, name=name, unit="job",
                                      endpoint="generator", noun="jobs", failures=(ChatAPIError, ValueError)):
        if record.get("eliminated"):
            rejected.write(record)
            counts[f"eliminated:{record['eliminated']}"] += 1
        else:
            record.pop("eliminated", None)
            out.write(record)
            counts["written"] += 1
    print(f"{name}: " + " ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return counts


def run_lamini(args, client) -> int:
    seeds = [row["instruction"] for _, row in read_input(args.seeds, {"instruction": str}, args)]
    topics = read_lines(args.topics) if args.topics else []
    jobs = lamini.instruction_jobs(seeds, topics, args.n, args.examples, args.per_request, args.topic_fraction,
                                   args.seed)

    # 1. instructions: one request per job, one line per request holding its list
    def ask_for_instructions(job):
        reply = client.chat([{"role": "user", "content": lamini.instruction_prompt(job, args.per_request)}])
        return {**job, "instructions": lamini.parse_numbered_list(reply, args.per_request), "generator": client.model}

    with AppendLog(Path(args.out).with_suffix(".instructions.jsonl")) as log:
        counts = run_pass("lamini/instructions", jobs, ask_for_instructions, log, args)
        asked = sorted(log.records, key=lambda r: r["id"])
    if counts["failed"]:
        print(f"lamini: {counts['failed']} instruction requests failed; run again to finish them before responses")
        return 1

    # 2. near-duplicate removal, in id order so the result does not depend on completion order
    candidates = [(f"{r['id']}-{k:02d}", text, r) for r in asked for k, text in enumerate(r["instructions"])]
    shown = sorted({example for r in asked for example in r["examples"]})
    keep = lamini.remove_near_duplicates([text for _, text, _ in candidates], shown, args.dedup_threshold)
    print(f"lamini: {len(candidates)} instructions, {len(candidates) - len(keep)} near-duplicates removed "
          f"(ROUGE-L ≥ {args.dedup_threshold}), {len(keep)} kept")
    response_jobs = [{"id": candidates[i][0], "instruction": candidates[i][1], "source": candidates[i][2]["source"],
                      "topics": candidates[i][2]["topics"]} for i in keep]

    # 3. responses: the instruction alone, as the user message
    def answer(job):
        response = client.chat([{"role": "user", "content": job["instruction"]}])
        return {"id": job["id"], "scheme": "lamini", "instruction": job["instruction"], "input": "",
                "response": response, "system": "", "source": job["source"], "topics": job["topics"],
                "generator": client.model}

    with AppendLog(args.out) as out:
        counts = run_pass("lamini/responses", response_jobs, answer, out, args)
    return 1 if counts["failed"] else 0


def run_evol(args, client) -> int:
    fields = {"instruction": str, "context": str, "category": str}
    seeds = sample(read_input(args.seeds, fields, args), args.n, args.seed, "evol")
    chains = {f"evol-{line:06d}": row for line, row in seeds}
    failed = blocked = 0
    with AppendLog(args.out) as out, AppendLog(Path(args.out).with_suffix(".eliminated.jsonl")) as rejected:
        for epoch in range(1, args.rounds + 1):
            # The pool: each chain's newest surviving instruction from earlier rounds (the seed at first);
            # an eliminated evolution leaves its parent in the pool.
            newest = {}
            for r in sorted(out.records, key=lambda r: r["epoch"]):
                if r["epoch"] < epoch:
                    newest[r["chain"]] = r
            finished, jobs = out.ids | rejected.ids, []
            for chain, seed in chains.items():
                if epoch > 1 and f"{chain}-e{epoch - 1}" not in finished:
                    blocked += 1  # last round's job for this chain failed: it cannot evolve further yet
                    continue
                parent = newest.get(chain)
                seed_prompt = seed["instruction"] + (f"\n\n{seed['context']}" if seed["context"].strip() else "")
                jobs.append({"id": f"{chain}-e{epoch}", "chain": chain, "epoch": epoch,
                             "parent_id": parent["id"] if parent else chain,
                             "parent": parent["instruction"] if parent else seed_prompt,
                             "category": seed["category"]})

            def evolve(job):
                strategy, operation = evol_instruct.pick_operation(random.Random(f"{args.seed}:{job['id']}"))
                prompt = evol_instruct.evolve_prompt(job["parent"], operation)
                instruction = client.chat([{"role": "user", "content": prompt}]).strip()
                record = {"id": job["id"], "scheme": "evol", "instruction": instruction, "input": "", "response": "",
                          "system": "", "category": job["category"], "evolution_strategy": strategy,
                          "in_depth_evolving_operation": operation, "epoch": job["epoch"], "chain": job["chain"],
                          "parent_id": job["parent_id"], "generator": client.model}
                record["eliminated"] = evol_instruct.eliminate_instruction(instruction, job["parent"])
                if record["eliminated"] is None:
                    record["response"] = client.chat([{"role": "user", "content": instruction}])
                    record["eliminated"] = evol_instruct.eliminate_response(record["response"],
                                                                            args.min_response_words)
                return record

            failed += run_pass(f"evol/epoch{epoch}", jobs, evolve, out, args, rejected)["failed"]
    if failed or blocked:
        print(f"evol: {failed} jobs failed, {blocked} waited on a failed earlier round; run again to finish them")
    return 1 if failed or blocked else 0


def run_orca(args, client) -> int:
    tasks = sample(read_input(args.tasks, orca.FLAN_FIELDS, args), args.n, args.seed, "orca")
    jobs = [{**task, "id": f"orca-{line:06d}"} for line, task in tasks]

    def explain(job):
        name, system = orca.pick_system_message(random.Random(f"{args.seed}:{job['id']}"))
        response = client.chat([{"role": "user", "content": orca.task_prompt(job["inputs"], job["targets"])}],
                               system=system)
        return {"id": job["id"], "scheme": "orca", "instruction": job["inputs"], "input": "", "response": response,
                "system": system, "system_message_id": name, "targets": job["targets"],
                "task_name": job["task_name"], "template_type": job["template_type"],
                "task_source": job.get("task_source", ""), "generator": client.model}

    with AppendLog(args.out) as out:
        counts = run_pass("orca", jobs, explain, out, args)
    return 1 if counts["failed"] else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    with lock_folder(out.parent, output=out.name):   # one run per --out; a second stops here (files.py)
        client = client_from_args(args, "generator")  # takes the key out of args
        print(f"generate: {json.dumps(vars(args))}")
        print(repr(client))
        try:
            if args.scheme == "lamini":
                status = run_lamini(args, client)
            elif args.scheme == "evol":
                status = run_evol(args, client)
            else:
                status = run_orca(args, client)
        finally:
            print(client.summary())
            client.close()
        if status == 0:                               # every job done: the files in id order from now on
            for path in (out, out.with_suffix(".instructions.jsonl"), out.with_suffix(".eliminated.jsonl")):
                if path.exists():
                    sort_by_id(path)
    return status


def sort_by_id(path: Path):
    """Rewrite a finished output file in id order (atomically, only if it is not in that order already).
    Records are appended as their requests finish, in no fixed order; ids come from the jobs, so id order
    makes the file, and what is trained on it, the same from run to run."""
    records = [record for _, record in read_jsonl(path)[0]]
    ordered = sorted(records, key=lambda r: r["id"])
    if ordered != records:
        write_jsonl_atomic(path, ordered)


if __name__ == "__main__":
    run_cli(main)
