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


def write_pair_data(cfg):
    """train_dpo.py: cfg.toy_records training pairs to cfg.data[0] and cfg.toy_eval_records pairs of the toy
    world's held-out split to cfg.eval_data[0], each if that file is missing."""
    for path, n, split in ((cfg.data[0], cfg.toy_records, "train"),
                           (cfg.eval_data[0], cfg.toy_eval_records, "heldout")):
        if n and not os.path.exists(path):
            write_jsonl_atomic(path, world.hh_pairs(n, cfg.seed, split))
            print(f"wrote {n} toy {split} preference pairs to {path}")
