"""The embedded default over seeds: each checkpoint's scores per seed, their mean and spread, the goals.

    python bench/embedded_seeds.py runs/eval runs/seed1/eval runs/seed2/eval     (results.json folders; from the
                                                                                 folder the reports ran in)

Goals (issue: margins, not luck), checked in every seed: base toy exact match < 0.10; the SFT model's (the
last stage) ≥ 0.80; DPO above the SFT model by at least 2 standard errors of the paired difference; the DPO run's
last held-out reward accuracy (its metrics.jsonl, beside the merged checkpoint the report scored) ≥ 0.9; and,
where the report has toy_format_mc, base ≤ 0.6 and the SFT model ≥ 0.9 there.
"""
import json
import os
import statistics
import sys


def heldout_reward_accuracy(dpo_checkpoint):
    """The last "eval/rewards/accuracies" in the DPO run's metrics.jsonl (<run>/merged → <run>/metrics.jsonl)."""
    path = os.path.join(os.path.dirname(os.path.normpath(dpo_checkpoint)), "metrics.jsonl")
    values = [r["eval/rewards/accuracies"] for r in map(json.loads, open(path)) if "eval/rewards/accuracies" in r]
    return values[-1]


def main(folders):
    runs = {f: json.load(open(f"{f}/results.json")) for f in folders}
    first = next(iter(runs.values()))
    names, scores = list(first["table"]), list(first["table"]["base"])
    print("| checkpoint | " + " | ".join(f"{s} (mean ± sd)" for s in scores) + " |")
    print("|---" * (len(scores) + 1) + "|")
    for n in names:
        cells = []
        for s in scores:
            v = [r["table"][n][s] for r in runs.values()]
            cells.append(f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}")
        print(f"| {n} | " + " | ".join(cells) + " |")
    ok = True
    for f, r in runs.items():
        t, d = r["table"], r["dpo_vs_sft"]
        reward_acc = heldout_reward_accuracy(r["details"]["dpo"]["checkpoint"])
        goals = {"base < 0.10": t["base"]["toy exact_match"] < 0.10,
                 "SFT ≥ 0.80": t[d["sft"]]["toy exact_match"] >= 0.80,
                 "DPO − SFT ≥ 2 SE": d["difference"] >= 2 * d["se"],
                 f"held-out reward acc {reward_acc:.3f} ≥ 0.9": reward_acc >= 0.9}
        if "toy_format_mc acc" in t["base"]:
            goals["toy_format_mc base ≤ 0.6, SFT ≥ 0.9"] = (t["base"]["toy_format_mc acc"] <= 0.6
                                                           and t[d["sft"]]["toy_format_mc acc"] >= 0.9)
        ok &= all(goals.values())
        print(f"{f}: " + ", ".join(f"{n:.3f}" for n in (t[x]["toy exact_match"] for x in names)) +
              f"; dpo − {d['sft']} {d['difference']:+.3f} ± {d['se']:.3f} ({d['z']:.1f} SE, +{d['better']} −{d['worse']}); "
              + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in goals.items()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
