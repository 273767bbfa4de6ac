"""The embedded default's exact match: held-out toy tasks answered greedily, checked by toy/world.py.

train_sft.py scores the base and each stage's merged model with it (eval_toy > 0), train_dpo.py the SFT start
and the merged DPO model; the figures go to stdout and <out_dir>/eval_toy.json. evaluate.py report prints the
same measure for every checkpoint of the recipe.
"""
import json
import os

from files import write_text_atomic
from toy import world


def heldout_exact_match(model, tok, n_tasks, seed, max_new_tokens, batch=64):
    """Fraction of n_tasks held-out toy tasks (world.heldout_tasks) answered exactly, greedy decoding of the
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
        return world.exact_match(answer, world.heldout_tasks(n_tasks, seed))


def recorded(cfg):
    """<cfg.out_dir>/eval_toy.json as a dict ({} if there is none yet)."""
    path = os.path.join(cfg.out_dir, "eval_toy.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def record_eval(cfg, key, checkpoint, tok, device):
    """Score a checkpoint on cfg.eval_toy held-out toy tasks (greedy, cfg.eval_max_new_tokens, cfg.seed's
    tasks, cfg.dtype), print it and add it under `key` to <cfg.out_dir>/eval_toy.json. Main rank."""
    from model.loading import load_pretrained
    model = load_pretrained(checkpoint, dtype=cfg.dtype, device=device)
    em = heldout_exact_match(model, tok, cfg.eval_toy, cfg.seed, cfg.eval_max_new_tokens)
    results = recorded(cfg)
    results[key] = {"exact_match": em, "tasks": cfg.eval_toy, "checkpoint": checkpoint}
    write_text_atomic(os.path.join(cfg.out_dir, "eval_toy.json"), json.dumps(results, indent=2))
    print(f"eval_toy {key}: exact_match={em:.3f} on {cfg.eval_toy} held-out toy tasks ({checkpoint})", flush=True)
    return em


def report_dpo(cfg, merged, tok, device):
    """train_dpo.py's figures: score the SFT start and the merged DPO model (each once) and print both."""
    for key, folder in (("sft", cfg.base), ("dpo", merged)):
        if key not in recorded(cfg):
            record_eval(cfg, key, folder, tok, device)
    results = recorded(cfg)
    print(f"eval_toy: exact_match sft {results['sft']['exact_match']:.3f} → dpo {results['dpo']['exact_match']:.3f} "
          f"on {cfg.eval_toy} held-out toy tasks")
