"""Does the judge's filter help? SFT on filtered versus unfiltered toy-teacher data, scored on held-out toy tasks.

    make base data && python bench/filter_effect.py [--stages 3] [--eval-tasks 500]

Two runs of train_sft.py from runs/base with configs/tiny.toml's settings and its first --stages stages; the
configs differ only in the stages' data paths (checked here):
    filtered     runs/data/{lamini,orca,evol}.filtered.jsonl   what `make data` keeps (judge rating ≥ 7)
    unfiltered   runs/data/{lamini,orca,evol}.jsonl            everything generated, ~25% answered wrong on purpose
Same batch, learning rate and seed, and the same number of steps: each stage stops both runs after the filtered
run's steps (its epochs over the filtered file; the unfiltered file is larger), so both see as many examples. Both are scored on the same --eval-tasks held-out toy tasks (train_sft.py's
eval_toy, greedy); the standard error of an exact match p over n tasks is √(p(1 − p)/n).
The two runs are child processes side by side, --threads torch threads each (runs/filter-effect/{filtered,
unfiltered}, replaced on every bench run); each measures its own peak RSS (bench/machine.py). Writes
bench/out/filter_effect.json.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.machine import describe  # noqa: E402
from config import config_to_dict, dump_config, load_config  # noqa: E402
from train_sft import SFTConfig  # noqa: E402

FILES = {"lamini": "lamini", "orca": "orca", "evol_instruct": "evol"}  # stage scheme → make data's file stem
CHILD = ("import json, runpy, sys; sys.argv = ['train_sft.py', '--config', sys.argv[1]]; "
         "runpy.run_path('train_sft.py', run_name='__main__'); "
         "from bench.machine import peak_rss_bytes; print(json.dumps({'peak_rss_bytes': peak_rss_bytes()}))")


def configs(stages: int, eval_tasks: int, data: Path, out: Path) -> dict:
    """{"filtered": SFTConfig, "unfiltered": SFTConfig} from configs/tiny.toml, its first `stages` stages."""
    tiny = load_config(SFTConfig, ["--config", str(ROOT / "configs" / "tiny.toml")])
    if not 1 <= stages <= 3 or any(s.scheme not in FILES for s in tiny.stages[:stages]):
        raise SystemExit(f"--stages must pick among the instruction stages {list(FILES)}, got {stages}")
    made, steps = {}, []
    for kind, suffix in (("filtered", ".filtered.jsonl"), ("unfiltered", ".jsonl")):
        chosen = [replace(s, data=[str(data / (FILES[s.scheme] + suffix))]) for s in tiny.stages[:stages]]
        missing = [p for s in chosen for p in s.data if not Path(p).exists()]
        if missing:
            raise SystemExit(f"{missing[0]}: not found; run `make data` first")
        if not steps:       # the filtered run's steps a stage: epochs × ⌈records / batch⌉, capped by max_steps
            for s in chosen:
                with open(s.data[0]) as f:
                    n = -(-sum(1 for line in f if line.strip()) // tiny.batch_size) * s.epochs
                steps.append(min(n, s.max_steps or n))
        chosen = [replace(s, max_steps=k) for s, k in zip(chosen, steps)]
        made[kind] = replace(tiny, stages=chosen, out_dir=str(out / kind), eval_toy=eval_tasks, resume=False)
    a, b = (config_to_dict(c) for c in made.values())
    for stage_a, stage_b in zip(a["stages"], b["stages"]):
        stage_a.pop("data"), stage_b.pop("data")
    a.pop("out_dir"), b.pop("out_dir")
    assert a == b, "the two configs must differ only in data paths and out_dir"
    return made


def start(cfg: SFTConfig, threads: int) -> subprocess.Popen:
    """train_sft.py on cfg in a child process with `threads` torch threads; a fresh out_dir."""
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    os.makedirs(cfg.out_dir)
    path = os.path.join(cfg.out_dir, "bench_config.toml")
    dump_config(cfg, path)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, "-u", "-c", CHILD, path], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            text=True)


def finish(kind: str, cfg: SFTConfig, child: subprocess.Popen, started: float) -> dict:
    """Stream the child's lines prefixed with its kind; then its wall time, peak RSS and exact matches."""
    last = ""
    for line in child.stdout:
        print(f"[{kind}] {line}", end="", flush=True)
        last = line
    if child.wait() != 0:
        raise SystemExit(f"{kind}: train_sft.py --config {cfg.out_dir}/bench_config.toml: exit status "
                         f"{child.returncode}")
    with open(os.path.join(cfg.out_dir, "eval_toy.json")) as f:
        scores = json.load(f)
    return {"seconds": time.perf_counter() - started, **json.loads(last),
            "exact_match": {key: v["exact_match"] for key, v in scores.items()}}


def summarise(results: dict, names: list, n: int) -> tuple:
    """Print each run's exact match after every stage; return the last stage's (filtered, unfiltered, SE)."""
    print(f"held-out toy exact match, {n} tasks (± standard error √(p(1 − p)/n)):")
    print(f"  {'':10s} " + " ".join(f"{name:>15s}" for name in ["base", *names]) + "   seconds  peak RSS")
    for kind, r in results.items():
        ems = [r["exact_match"][name] for name in ["base", *names]]
        print(f"  {kind:10s} " + " ".join(f"{em:7.3f} ± {math.sqrt(em * (1 - em) / n):.3f}" for em in ems) +
              f"  {r['seconds']:8.0f}  {r['peak_rss_bytes'] / 2**20:4.0f} MiB")
    f, u = (results[kind]["exact_match"][names[-1]] for kind in ("filtered", "unfiltered"))
    se = math.sqrt(f * (1 - f) / n + u * (1 - u) / n)
    print(f"after {names[-1]}: filtered − unfiltered = {f - u:+.3f} (± {se:.3f}, independent samples): "
          f"{'filtered wins' if f > u else 'filtered does NOT win'}")
    return f, u, se


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=int, default=3, help="the first N instruction stages of configs/tiny.toml")
    p.add_argument("--eval-tasks", type=int, default=500, help="held-out toy tasks scored after each stage")
    p.add_argument("--data", default="runs/data", help="make data's folder")
    p.add_argument("--out", default="runs/filter-effect", help="the two runs' folders go here")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (the two run side by side)")
    args = p.parse_args(argv)
    machine = describe()
    print(machine, flush=True)
    base = ROOT / "runs" / "base" / "model.safetensors"
    if not base.exists():
        raise SystemExit(f"{base}: not found; run `make base` first")
    made = configs(args.stages, args.eval_tasks, ROOT / args.data, ROOT / args.out)
    # Both runs at once, one thread each: on 2 cores that halves the wall time, and one torch thread per
    # process avoids the threads waiting on each other when the cores are shared (measured: 8× slower steps).
    started = time.perf_counter()
    children = {kind: start(cfg, args.threads) for kind, cfg in made.items()}
    with ThreadPoolExecutor(len(children)) as pool:
        futures = {kind: pool.submit(finish, kind, made[kind], child, started) for kind, child in children.items()}
        results = {kind: future.result() for kind, future in futures.items()}

    n, names = args.eval_tasks, [s.name for s in made["filtered"].stages]
    print(f"\n{machine}")
    f, u, se = summarise(results, names, n)
    out = ROOT / "bench" / "out" / "filter_effect.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "stages": names,
                               "eval_tasks": n, "runs": results, "difference": f - u, "standard_error": se},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
