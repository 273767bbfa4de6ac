"""The toy data files the trainers read, written from toy/world.py when they are missing (toy_records > 0).

The files have the formats of the real data, so the trainers read them through the same readers: generate.py's
JSONL schema for the lamini, orca and evol_instruct stages (data/sft.py), HH-RLHF's {"chosen", "rejected"}
transcripts (.jsonl.gz) for the hh_rlhf stage and for DPO (data/hh.py).
"""
import os

from files import write_jsonl_atomic
from toy import world


def write_stage_data(stage, seed):
    """train_sft.py: stage.toy_records records of stage.scheme to stage.data[0], if that file is missing."""
    path, n = stage.data[0], stage.toy_records
    if os.path.exists(path):
        return
    if stage.scheme == "hh_rlhf":
        lines = world.hh_pairs(n, seed)                 # {"chosen", "rejected"} transcripts, HH-RLHF's rows
    else:
        make = {"lamini": world.lamini_records, "orca": world.orca_records, "evol_instruct": world.evol_records}
        lines = make[stage.scheme](n, seed)             # generate.py's schema (data/sft.py "generated")
    write_jsonl_atomic(path, lines)
    print(f"[{stage.name}] wrote {n} toy {stage.scheme} records to {path}")


def write_pair_data(cfg, device):
    """train_dpo.py: the training pairs (cfg.toy_records tasks) to cfg.data[0] and the held-out pairs
    (cfg.toy_eval_records tasks of the toy world's held-out split) to cfg.eval_data[0], each if that file is
    missing. cfg.toy_pairs "on_policy": the SFT model's (cfg.base) own wrong or unfinished answers as the
    rejected side (toy/pairs.py); "static": world.hh_pairs (gold against a make_wrong answer)."""
    todo = [(path, n, split) for path, n, split in ((cfg.data[0], cfg.toy_records, "train"),
                                                    (cfg.eval_data[0], cfg.toy_eval_records, "heldout"))
            if n and not os.path.exists(path)]
    if not todo:
        return
    if cfg.toy_pairs == "static":
        for path, n, split in todo:
            write_jsonl_atomic(path, world.hh_pairs(n, cfg.seed, split))
            print(f"wrote {n} toy {split} preference pairs to {path}")
        return
    from model import Tokenizer
    from model.loading import load_pretrained
    from toy.pairs import on_policy_pairs
    model = load_pretrained(cfg.base, dtype=cfg.dtype, device=device)
    tok = Tokenizer(cfg.tokenizer or os.path.join(cfg.base, "tokenizer.model"))
    for path, n, split in todo:
        rows, counts = on_policy_pairs(model, tok, n, cfg.seed, split, cfg.toy_samples, cfg.toy_temperature,
                                       cfg.eval_max_new_tokens)
        print(f"on-policy {split} pairs from {cfg.base}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if not rows:
            raise SystemExit(f"{cfg.base}: no wrong or unfinished answer in {counts['samples']} samples of {n} {split} "
                             f"toy tasks, so no on-policy pairs for {path}; raise toy_records or toy_temperature")
        write_jsonl_atomic(path, rows)
        print(f"wrote {len(rows)} on-policy toy {split} preference pairs to {path}")
