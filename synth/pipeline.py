"""`make data`: the three schemes, then the judge's filter, into the files train_sft.py's stages read.

    python -m synth.pipeline [--out runs/data] [--seeds dolly.jsonl --topics topics.txt --tasks flan.jsonl]

    1. inputs     without --seeds/--topics/--tasks: the toy world's (toy/llm.py) in OUT/toy/
    2. endpoints  GENERATOR_URL / GENERATOR_MODEL / GENERATOR_API / GENERATOR_API_KEY and the same JUDGE_*
                  (chat_api.py reads them); a role with neither URL nor MODEL set gets the toy stand-in, a
                  real HTTP server on 127.0.0.1 started here and stopped at the end
    3. generate   python generate.py --scheme lamini | evol | orca      → OUT/{lamini,evol,orca}.jsonl
    4. filter     python filter.py, once per scheme                      → OUT/{scheme}.judged.jsonl and
                                                                           OUT/{scheme}.filtered.jsonl
    5. report     with the toy teacher (and any judge): the filter's precision and recall against the answers it
                  made wrong on purpose (its side file OUT/toy_teacher.wrong.jsonl) → OUT/filter_report.jsonl
generate.py and filter.py run unchanged, as child processes, with their own progress bars. Each step appends
and resumes (synth/records.py), so a failed or killed `make data` is finished by running it again, and a
finished one costs a few seconds. OUT/sources.json names the generator, judge and inputs the files came from;
a run with different ones stops rather than mix two sources in one file.

Precision and recall of the filter (positive = a deliberately wrong answer; rejected = rating < threshold or
no rating), over the judged records:
    precision = |rejected ∩ wrong| / |rejected|        recall = |rejected ∩ wrong| / |wrong|

Toy-world choices, each a flag of generate.py set here only for the toy inputs:
    --dedup-threshold 1.0     toy instructions of one template differ in one or two operand tokens, so
                              Self-Instruct's ROUGE-L 0.7 keeps ~900 of 8000 (1.0: ~5100); exact copies still go
    --min-response-words 1    toy answers are one to five words ("12", "t a c")
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from config import run_cli
from files import lock_folder, read_jsonl, write_jsonl_atomic, write_text_atomic
from synth import orca
from toy.llm import answer_key, write_inputs

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = ("lamini", "evol", "orca")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/data", help="folder for every file written")
    p.add_argument("--seeds", help="databricks-dolly-15k JSONL for lamini and evol; default: the toy world's")
    p.add_argument("--topics", help="topic list for lamini; default: the toy world's")
    p.add_argument("--tasks", help="Flan-style JSONL for orca; default: the toy world's")
    p.add_argument("--lamini-requests", type=int, default=1200, help="lamini instruction requests (generate --n)")
    p.add_argument("--per-request", type=int, default=10, help="lamini instructions asked for per request")
    p.add_argument("--evol-seeds", type=int, default=1200, help="evol seed chains (generate --n)")
    p.add_argument("--rounds", type=int, default=4, help="evol rounds")
    p.add_argument("--orca-tasks", type=int, default=4000, help="orca tasks (generate --n)")
    p.add_argument("--threshold", type=float, default=7.0, help="filter.py: keep ratings ≥ this")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight, per script")
    p.add_argument("--seed", type=int, default=0, help="generate.py's sampling seed, and the toy servers'")
    p.add_argument("--wrong-fraction", type=float, default=0.25,
                   help="toy teacher: share of its answers made wrong on purpose")
    args = p.parse_args(argv)
    given = [args.seeds is not None, args.topics is not None, args.tasks is not None]
    if any(given) and not all(given):
        p.error("give --seeds, --topics and --tasks together, or none of them for the toy world's")
    return args


def configured(role: str) -> bool:
    return bool(os.environ.get(f"{role}_URL") or os.environ.get(f"{role}_MODEL"))


@contextmanager
def toy_server(role: str, argv: list[str]):
    """Start `python -m toy.llm serve ROLE …` and yield its URL; closing its stdin stops it."""
    child = subprocess.Popen([sys.executable, "-m", "toy.llm", "serve", role, *argv], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        if " listening on " not in line:
            raise SystemExit(f"toy {role}: did not start (exit status {child.wait()})")
        print(line.strip(), flush=True)
        yield line.split(" listening on ")[1].strip()
    finally:
        child.stdin.close()
        child.wait(timeout=30)


def describe(role: str, env: dict) -> str:
    """The endpoint in words, for sources.json: no key, no user:password part of a URL."""
    model, url = env.get(f"{role}_MODEL"), env.get(f"{role}_URL")
    if not url:
        return f"{model} at the vendor's URL ({role}_API={env.get(f'{role}_API', 'openai')})"
    u = urlsplit(url)
    return f"{model} at {u.scheme}://{u.hostname}{f':{u.port}' if u.port else ''}{u.path}"


def check_sources(out: Path, sources: dict):
    """Refuse to resume files made by other endpoints or inputs; record them while no records exist (so a
    first run that failed at once, say on a misspelt model, can be re-run with the right one)."""
    path = out / "sources.json"
    made = any((out / name).exists() for name in ("lamini.instructions.jsonl", *(f"{s}.jsonl" for s in SCHEMES)))
    if path.exists() and made:
        before = json.loads(path.read_text())
        changed = [k for k in sources if before.get(k) != sources[k]]
        if changed:
            raise SystemExit(f"{path}: {out} holds data from another {', '.join(changed)} ({before}); "
                             f"choose another --out or delete {out}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(sources, indent=2) + "\n")


def step(name: str, argv: list[str], env: dict):
    started = time.perf_counter()
    print(f"\n=== {name}: {' '.join(argv)}", flush=True)
    status = subprocess.run([sys.executable, "-u", str(ROOT / argv[0]), *argv[1:]], env=env).returncode
    if status != 0:
        raise SystemExit(f"{name} stopped with exit status {status}; run `make data` again to finish it")
    print(f"=== {name}: done in {time.perf_counter() - started:.1f}s", flush=True)


def sent(record: dict) -> tuple[str, str]:
    """(system, user message) of the request that wrote this record's response (generate.py's wording)."""
    if record["scheme"] == "orca":
        return record["system"], orca.task_prompt(record["instruction"], record["targets"])
    return "", record["instruction"]


def filter_report(out: Path, threshold: float, wrong_log: Path) -> dict:
    """Precision and recall of the filter against the teacher's deliberately wrong answers, per scheme."""
    wrong = {r["id"] for _, r in read_jsonl(wrong_log)[0]} if wrong_log.exists() else set()
    report = {}
    for scheme in (*SCHEMES, "all"):
        counts = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
        for s in SCHEMES if scheme == "all" else (scheme,):
            for _, r in read_jsonl(out / f"{s}.judged.jsonl")[0]:
                bad = answer_key(*sent(r)) in wrong
                rejected = r["judge_rating"] is None or r["judge_rating"] < threshold
                counts[("t" if rejected == bad else "f") + ("p" if rejected else "n")] += 1
        tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
        report[scheme] = {**counts, "records": sum(counts.values()), "wrong": tp + fn,
                          "precision": tp / (tp + fp) if tp + fp else None,
                          "recall": tp / (tp + fn) if tp + fn else None}
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    with lock_folder(args.out):                      # one `make data` per folder; a second stops here (files.py)
        return make_data(args)


def make_data(args) -> int:
    out, started = Path(args.out), time.perf_counter()
    env = dict(os.environ)
    toy = {role: not configured(role) for role in ("GENERATOR", "JUDGE")}
    toy_inputs = args.seeds is None
    wrong_log = out / "toy_teacher.wrong.jsonl"
    stand_in = "toy/llm.py"
    check_sources(out, {
        "generator": f"toy-teacher ({stand_in}, wrong_fraction {args.wrong_fraction}, seed {args.seed})"
        if toy["GENERATOR"] else describe("GENERATOR", env),
        "judge": f"toy-judge ({stand_in})" if toy["JUDGE"] else describe("JUDGE", env),
        "inputs": f"toy world ({stand_in}, seed {args.seed})" if toy_inputs else
        {"seeds": args.seeds, "topics": args.topics, "tasks": args.tasks}})

    # --- 1. inputs
    if toy_inputs:
        inputs = write_inputs(out / "toy", args.evol_seeds, args.orca_tasks, args.seed)
        print(f"inputs: the toy world's, in {out / 'toy'}")
    else:
        inputs = {"seeds": args.seeds, "topics": args.topics, "tasks": args.tasks}
    toy_flags = ["--dedup-threshold", "1.0"] if toy_inputs else []
    common = ["--concurrency", str(args.concurrency), "--seed", str(args.seed)]

    with ExitStack() as stack:
        # --- 2. endpoints: the toy stand-ins for roles the environment does not name
        for role, server_args in (("GENERATOR", ["teacher", "--wrong-fraction", str(args.wrong_fraction),
                                                  "--wrong-log", str(wrong_log.resolve())]), ("JUDGE", ["judge"])):
            if toy[role]:
                url = stack.enter_context(toy_server(server_args[0], server_args[1:] + ["--seed", str(args.seed)]))
                env.update({f"{role}_URL": url, f"{role}_MODEL": f"toy-{server_args[0]}", f"{role}_API": "openai"})
                env.pop(f"{role}_API_KEY", None)  # the toy servers need no key: none is sent to them
            else:
                print(f"{role.lower()}: {describe(role, env)}")

        # --- 3. generate
        gen = ["generate.py", *common]
        step("lamini", [*gen, "--scheme", "lamini", "--seeds", inputs["seeds"], "--topics", inputs["topics"],
                        "--n", str(args.lamini_requests), "--per-request", str(args.per_request), *toy_flags,
                        "--out", str(out / "lamini.jsonl")], env)
        step("evol", [*gen, "--scheme", "evol", "--seeds", inputs["seeds"], "--n", str(args.evol_seeds),
                      "--rounds", str(args.rounds), "--out", str(out / "evol.jsonl"),
                      *(["--min-response-words", "1"] if toy_inputs else [])], env)
        step("orca", [*gen, "--scheme", "orca", "--tasks", inputs["tasks"], "--n", str(args.orca_tasks),
                      "--out", str(out / "orca.jsonl")], env)

        # --- 4. filter
        for scheme in SCHEMES:
            step(f"filter {scheme}", ["filter.py", "--in", str(out / f"{scheme}.jsonl"),
                                      "--out", str(out / f"{scheme}.judged.jsonl"),
                                      "--filtered", str(out / f"{scheme}.filtered.jsonl"),
                                      "--threshold", str(args.threshold),
                                      "--concurrency", str(args.concurrency)], env)

    # --- 5. report
    kept = {s: len(read_jsonl(out / f"{s}.filtered.jsonl")[0]) for s in SCHEMES}
    print(f"\nmake data: {time.perf_counter() - started:.0f}s; kept " +
          ", ".join(f"{s} {n} ({out / f'{s}.filtered.jsonl'})" for s, n in kept.items()))
    if toy["GENERATOR"]:
        report = filter_report(out, args.threshold, wrong_log)
        for scheme, r in report.items():
            p, rc = (f"{v:.4f}" if v is not None else "n/a" for v in (r["precision"], r["recall"]))
            print(f"filter vs the toy teacher's wrong answers: {scheme:6s} records={r['records']} "
                  f"wrong={r['wrong']} ({r['wrong'] / max(r['records'], 1):.3f}) precision={p} recall={rc}")
        write_jsonl_atomic(out / "filter_report.jsonl", [{"scheme": s, **r} for s, r in report.items()])
    return 0


if __name__ == "__main__":
    run_cli(main)
