"""What each CPU speed path (cpu/) buys: user-visible times with every path on, with every path off, and with
one path off at a time (BEZOAR_C_KERNELS=-name), in one run on one machine.

A path stays only where it buys at least 10% of one of these times (bench/README.md):
  sft   bench/bench_sft_step.py's step (QLoRA, NF4, LoRA r 64 on all linear layers, checkpointing), ours only
  dpo   bench/bench_dpo.py's packed step, ours only
  base  the embedded default's base pretraining (python -m toy.base), its steady tokens/s turned into s/step
in one dtype (--dtype: the faster one on this machine; the run prints both matmul rates). "buys" is
(time without the path − time with every path on) / time without it: the share of the time the path saves.
Cases alternate within each round, so a slow spell of a shared machine spreads over all of them; each time is
the median over rounds of the workload's own median step time.

    python bench/bench_fast_paths.py [--rounds 2] [--dtype fp32] [--paths loss,rms_norm,...] [--workloads sft,dpo,base]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.machine import describe                                       # noqa: E402

PATHS = ["loss", "rms_norm", "rotary", "swiglu", "attention", "nf4", "lora"]


def run(cmd, switch, timeout=1800):
    env = dict(os.environ, BEZOAR_C_KERNELS=switch)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} with BEZOAR_C_KERNELS={switch} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def step_seconds(workload, switch, dtype, tmp):
    """The workload's median step time in seconds under this switch."""
    py = sys.executable
    if workload == "sft":
        out = run([py, "bench/bench_sft_step.py", "--no-peer", "--no-3b", "--ckpt", "8", "--rounds", "1",
                   "--steps", "3", "--dtypes", dtype], switch)
        line = next(l for l in out.splitlines() if l.startswith(f"{dtype}  ours"))
        return float(line.split()[3])
    if workload == "dpo":
        out = run([py, "bench/bench_dpo.py", "--sides", "ours", "--rounds", "1", "--steps", "2", "--dtypes", dtype],
                  switch)
        times = re.search(r"round 1 ours\s+\S+: step s ([\d. ]+)\(", out).group(1).split()
        return statistics.median(float(t) for t in times)
    if workload == "base":
        out_dir = tempfile.mkdtemp(dir=tmp)
        dtype_name = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        run([py, "-m", "toy.base", "--steps", "40", "--log_every", "10", "--dtype", dtype_name,
             "--out_dir", os.path.join(out_dir, "base")], switch)
        rows = [json.loads(l) for l in open(os.path.join(out_dir, "base", "metrics.jsonl"))]
        tokens_per_step = None
        with open(os.path.join(out_dir, "base", "train_config.toml")) as f:
            cfg = dict(re.findall(r"^(\w+) = (\S+)", f.read(), flags=re.M))
        tokens_per_step = int(cfg["batch_size"]) * int(cfg["seq_len"])
        return statistics.median(tokens_per_step / r["tok/s"] for r in rows[1:])   # the first interval warms up
    raise ValueError(workload)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--workloads", default="sft,dpo,base")
    args = p.parse_args()
    paths, workloads = args.paths.split(","), args.workloads.split(",")
    print(describe())
    cases = {"all on": "1", "all off": "0", **{f"-{name}": f"-{name}" for name in paths}}
    times = {(w, c): [] for w in workloads for c in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for w in workloads:
                for case, switch in cases.items():
                    t = step_seconds(w, switch, args.dtype, tmp)
                    times[w, case].append(t)
                    print(f"  round {r + 1} {w:4s} {case:10s} {t:8.3f} s/step", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{args.dtype}, median s/step over {args.rounds} rounds; buys = (without − all on) / without")
    print("| case | " + " | ".join(f"{w} s/step | {w} buys" for w in workloads) + " |")
    print("|---|" + "---|---|" * len(workloads))
    for case in cases:
        cells = []
        for w in workloads:
            on, t = med[w, "all on"], med[w, case]
            cells += [f"{t:.3f}", "" if case == "all on" else f"{(t - on) / t:+.1%}"]
        print(f"| {case} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
