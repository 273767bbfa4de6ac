"""`make eval`: the recipe's checkpoints side by side, with their training curves.

    python evaluate.py report [--sft-run runs/tiny] [--dpo-run runs/tiny-dpo] [--out runs/eval]

The checkpoints, in recipe order: the base the SFT run started from (its config.toml's `base`), each SFT
stage's merged model (<sft-run>/<stage>/merged, LaMini → Orca → Evol-Instruct → HH-RLHF), and the DPO model
(<dpo-run>/merged). Each one is scored on
    toy exact match   greedy answers to held-out toy tasks, checked by toy/world.py (train_sft.py's measure)
    harness tasks     log-likelihood tasks through evals/harness.py, scored as lm-eval does; default toy_mc
                      (held-out toy tasks, the gold answer against plausible wrong ones: what the model
                      knows) and toy_format_mc (the gold response against the same fact in pretraining's
                      prose: whether it answers as instructed)
    MT-Bench          when a judge endpoint is set (JUDGE_URL or JUDGE_MODEL, …; see chat_api.py): our
                      answers to MT-Bench's questions graded by the judge (evals/mt_bench.py), the overall
                      mean (1-10) per checkpoint; skipped, and said so, without a judge
DPO against the SFT model it starts from (the last stage): the paired difference of their toy exact match on
the same tasks, with its standard error (toy/eval.py paired_difference), in results.json's "dpo_vs_sft".
Writes <out>/results.json (every figure), <out>/results.md (the table, also printed) and <out>/report.png:
the training curves (base pretraining loss, SFT loss per stage, DPO loss and reward accuracy) and the scores
per checkpoint.
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")                                   # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from config import load_config  # noqa: E402
from evals import harness, mt_bench  # noqa: E402
from evals.mt_bench_judge import summarize  # noqa: E402
from files import atomic_write, read_jsonl, write_text_atomic  # noqa: E402
from model import Tokenizer  # noqa: E402
from model.loading import load_pretrained  # noqa: E402
from toy.eval import heldout_checks, paired_difference  # noqa: E402
from train_sft import SFTConfig  # noqa: E402
from training import resolve_device  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(prog="evaluate.py report", description=__doc__.split("\n\n")[0])
    p.add_argument("--sft-run", default="runs/tiny", help="train_sft.py's out_dir (holds config.toml)")
    p.add_argument("--dpo-run", default="runs/tiny-dpo", help="train_dpo.py's out_dir (merged/, metrics.jsonl)")
    p.add_argument("--out", default="runs/eval", help="folder for results.json, results.md, report.png")
    p.add_argument("--toy-tasks", type=int, default=500, help="held-out toy tasks per checkpoint (0 = none)")
    p.add_argument("--tasks", default="toy_mc,toy_format_mc", help="harness tasks, comma-separated ('' = none)")
    p.add_argument("--limit", type=int, default=None, help="at most this many documents per harness task")
    p.add_argument("--mt-bench-max-new-tokens", type=int, default=256, help="MT-Bench answer budget per turn")
    p.add_argument("--dtype", default="float32", help="compute dtype for scoring (float32, bfloat16)")
    p.add_argument("--device", default=None, help="cpu, cuda, …; none = cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="seeds the held-out toy tasks (as train_sft.py's seed)")
    return p.parse_args(argv)


def checkpoints(sft_run, dpo_run):
    """[(name, folder)] in recipe order, from the SFT run's saved config; missing ones end the report."""
    saved = os.path.join(sft_run, "config.toml")
    if not os.path.exists(saved):
        raise SystemExit(f"{saved}: not found; run train_sft.py first (make sft), or pass --sft-run")
    cfg = load_config(SFTConfig, ["--config", saved])
    found = [("base", cfg.base)] + [(s.name, os.path.join(sft_run, s.name, "merged")) for s in cfg.stages]
    found.append(("dpo", os.path.join(dpo_run, "merged")))
    missing = [folder for _, folder in found if not os.path.isdir(folder)]
    if missing:
        raise SystemExit(f"evaluate.py report: {len(missing)} of {len(found)} checkpoints missing: "
                         f"{', '.join(missing)}; run make sft dpo first")
    for _, folder in found:                             # checked before any is scored: fail in seconds
        for file in ("config.json", "tokenizer.model"):
            if not os.path.isfile(os.path.join(folder, file)):
                raise SystemExit(f"{os.path.join(folder, file)}: not found (expected a Hugging Face checkpoint "
                                 "folder with config.json, the weights and tokenizer.model)")
    return found, cfg


def read_metrics(path):
    """The records of a metrics.jsonl file ([] when it is missing)."""
    if not os.path.exists(path):
        return []
    return [record for _, record in read_jsonl(path)[0]]


def plot(out_png, curves, table, names):
    """Training curves (one panel per phase) and the scores per checkpoint (one line per score)."""
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    base, sft, dpo = curves
    ax = axes[0]
    rows = [r for r in base if "loss" in r]
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(title="base pretraining", xlabel="step", ylabel="loss")
    ax = axes[1]
    offset = 0
    sft = [r for r in sft if "loss" in r and "stage" in r]
    for stage in dict.fromkeys(r["stage"] for r in sft):
        rows = [r for r in sft if r["stage"] == stage]
        ax.plot([offset + r["step"] for r in rows], [r["loss"] for r in rows], label=stage)
        offset += rows[-1]["step"]
    ax.set(title="SFT stages (QLoRA)", xlabel="step (stages in order)", ylabel="loss")
    ax.legend(fontsize=8)
    ax = axes[2]
    for key in ("loss", "rewards/accuracies", "eval/rewards/accuracies"):   # train and held-out records
        rows = [r for r in dpo if key in r]
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key, marker="." if "eval" in key else None)
    ax.set(title="DPO", xlabel="step")
    ax.legend(fontsize=8)
    ax = axes[3]
    for score in [s for s in table[names[0]] if "mt-bench" not in s]:     # fractions in [0, 1]
        ax.plot(range(len(names)), [table[n].get(score, float("nan")) for n in names], marker="o", label=score)
    ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
    ax.set(title="scores per checkpoint", ylim=(0, 1.05))
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def markdown(table, names):
    scores = list(table[names[0]])
    lines = ["| checkpoint | " + " | ".join(scores) + " |", "|---" * (len(scores) + 1) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{table[n][s]:.4f}" if isinstance(table[n][s], float)
                                             else str(table[n][s]) for s in scores) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    found, cfg = checkpoints(args.sft_run, args.dpo_run)
    device = resolve_device(args.device, "--device")
    tasks = [t for t in args.tasks.split(",") if t]
    judge = bool(os.environ.get("JUDGE_URL") or os.environ.get("JUDGE_MODEL"))
    os.makedirs(args.out, exist_ok=True)

    table, details = {}, {}
    for name, folder in found:
        tok = Tokenizer(os.path.join(folder, "tokenizer.model"))
        model = load_pretrained(folder, dtype=args.dtype, device=device)
        row, detail = {}, {"checkpoint": folder}
        if args.toy_tasks:
            detail["toy_right"] = [int(r) for r in heldout_checks(model, tok, args.toy_tasks, args.seed, 64)]
            row["toy exact_match"] = sum(detail["toy_right"]) / args.toy_tasks
        if tasks:
            results = harness.evaluate(model, tok, tasks, limit=args.limit)
            detail["harness"] = results
            for task, metrics in results["results"].items():
                for key in ("acc,none", "acc_norm,none"):
                    if key in metrics:
                        row[f"{task} {key.split(',')[0]}"] = metrics[key]
        del model
        if judge:                                       # answers, then the judge (endpoint from the environment)
            judgments = os.path.join(args.out, "mt_bench", "judgments.jsonl")
            mt_bench.main(["--model", folder, "--model-id", name, "--dtype", args.dtype, "--device", device,
                           "--out-dir", os.path.join(args.out, "mt_bench"), "--judgments", judgments,
                           "--max-new-tokens", str(args.mt_bench_max_new_tokens)])
            summary = summarize(judgments)[name]
            detail["mt_bench"] = summary
            row["mt-bench (1-10)"] = summary["overall"]
        table[name], details[name] = row, detail
        print(f"{name}: " + ", ".join(f"{k}={v:.4f}" for k, v in row.items()), flush=True)

    names = [n for n, _ in found]
    md = markdown(table, names)
    results = {"table": table}
    if args.toy_tasks:                                  # the SFT model is the last stage, right before dpo
        d = paired_difference(details[names[-2]]["toy_right"], details["dpo"]["toy_right"])
        results["dpo_vs_sft"] = {"sft": names[-2], **d}
        md += (f"\n\nDPO − {names[-2]} (toy exact match, paired over {d['tasks']} tasks): {d['difference']:+.4f} ± "
               f"{d['se']:.4f} (SE), {d['z']:.1f} SE; {d['better']} tasks gained, {d['worse']} lost.")
    if not judge:
        md += "\n\nMT-Bench: not run (no judge endpoint: set JUDGE_URL / JUDGE_MODEL / JUDGE_API_KEY, see README)."
    print(md)
    curves = (read_metrics(os.path.join(cfg.base, "metrics.jsonl")),
              read_metrics(os.path.join(args.sft_run, "metrics.jsonl")),
              read_metrics(os.path.join(args.dpo_run, "metrics.jsonl")))
    png = os.path.join(args.out, "report.png")
    plot(png, curves, table, names)
    write_text_atomic(os.path.join(args.out, "results.json"), json.dumps({**results, "details": details}, indent=2))
    write_text_atomic(os.path.join(args.out, "results.md"), md + "\n")
    print(f"wrote {args.out}/results.json, results.md, report.png")
