"""The embedded default's exact match: held-out toy tasks answered greedily, checked by toy/world.py.

train_sft.py scores the base and each stage's merged model with it (eval_toy > 0), train_dpo.py the SFT start
and the merged DPO model; the figures go to stdout and <out_dir>/eval_toy.json. evaluate.py report prints the
same measure for every checkpoint of the recipe.
"""
import json
import os

from files import write_text_atomic
from toy import world


def heldout_checks(model, tok, n_tasks, seed, max_new_tokens, batch=256):
    """[bool] for n_tasks held-out toy tasks (world.heldout_tasks): answered exactly? Greedy decoding of the
    templated prompt until EOS."""
    import torch                                        # here: the toy servers import toy/ without torch
    from model.sampling import generate

    def answer(prompts):
        out = []
        for i in range(0, len(prompts), batch):
            ids = [tok.encode(p) for p in prompts[i:i + batch]]
            out += [c.text for c in generate(model, ids, max_new_tokens, eos_id=tok.eos_id, tokenizer=tok)]
        return out
    with torch.no_grad():
        return world.checks(answer, world.heldout_tasks(n_tasks, seed))


def heldout_exact_match(model, tok, n_tasks, seed, max_new_tokens, batch=256):
    """Fraction of n_tasks held-out toy tasks answered exactly (heldout_checks)."""
    right = heldout_checks(model, tok, n_tasks, seed, max_new_tokens, batch)
    return sum(right) / len(right)


def paired_difference(before, after):
    """after − before on the same tasks: {"difference", "se", "z", "tasks", "better", "worse"}. The standard
    error is that of the mean of the per-task differences d_i ∈ {−1, 0, 1} (sample standard deviation / √n),
    which is smaller than the unpaired one because the two models share most of their right answers."""
    if len(before) != len(after) or len(before) < 2:
        raise ValueError(f"paired_difference: {len(before)} and {len(after)} results; expected the same tasks, ≥ 2")
    d = [int(a) - int(b) for b, a in zip(before, after)]
    n = len(d)
    mean = sum(d) / n
    se = (sum((x - mean) ** 2 for x in d) / (n - 1) / n) ** 0.5
    return {"difference": mean, "se": se, "z": mean / se if se else float("inf") if mean else 0.0, "tasks": n,
            "better": d.count(1), "worse": d.count(-1)}


def check_heldout(items, setting):
    """Refuse training data that asks tasks of the toy world's held-out split, the split eval_toy scores.
    items: data/sft.py Examples or data/hh.py Pairs (their template prompts; of a dialogue, the last turn).
    SystemExit with one line naming the setting, the count and the first such item."""
    def heldout(item):
        task = world.parse_instruction(item.prompt.rsplit("Human: ", 1)[-1])
        return task is not None and world.split_of(task.family, task.operands) == "heldout"
    hits = [item for item in items if heldout(item)]
    if hits:
        raise SystemExit(f"{setting}: {len(hits)} of {len(items)} training examples ask toy tasks of the held-out "
                         f"split (first: {hits[0].id}), which eval_toy scores; train on the toy world's training "
                         f"split (toy/world.py split_of), or set eval_toy = 0")


def recorded(cfg):
    """<cfg.out_dir>/eval_toy.json as a dict ({} if there is none yet)."""
    path = os.path.join(cfg.out_dir, "eval_toy.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def record_eval(cfg, key, checkpoint, tok, device):
    """Score a checkpoint on cfg.eval_toy held-out toy tasks (greedy, cfg.eval_max_new_tokens, cfg.seed's
    tasks, cfg.dtype), print it and add it under `key` to <cfg.out_dir>/eval_toy.json (with the per-task
    results, "right": 1 or 0 in world.heldout_tasks order). Main rank."""
    from model.loading import load_pretrained
    model = load_pretrained(checkpoint, dtype=cfg.dtype, device=device)
    right = heldout_checks(model, tok, cfg.eval_toy, cfg.seed, cfg.eval_max_new_tokens)
    em = sum(right) / len(right)
    results = recorded(cfg)
    results[key] = {"exact_match": em, "tasks": cfg.eval_toy, "checkpoint": checkpoint, "right": [int(r) for r in right]}
    write_text_atomic(os.path.join(cfg.out_dir, "eval_toy.json"), json.dumps(results, indent=2))
    print(f"eval_toy {key}: exact_match={em:.3f} on {cfg.eval_toy} held-out toy tasks ({checkpoint})", flush=True)
    return em


def report_dpo(cfg, merged, tok, device):
    """train_dpo.py's figures: score the SFT start and the merged DPO model (each once) and print both, with the
    paired difference and its standard error."""
    for key, folder in (("sft", cfg.base), ("dpo", merged)):
        if key not in recorded(cfg):
            record_eval(cfg, key, folder, tok, device)
    results = recorded(cfg)
    d = paired_difference(results["sft"]["right"], results["dpo"]["right"])
    print(f"eval_toy: exact_match sft {results['sft']['exact_match']:.3f} → dpo {results['dpo']['exact_match']:.3f} "
          f"on {cfg.eval_toy} held-out toy tasks: {d['difference']:+.3f} ± {d['se']:.3f} (paired SE; "
          f"{d['better']} tasks gained, {d['worse']} lost)")
