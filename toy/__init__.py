"""The embedded default's stand-ins: what `make sft dpo eval` runs on with no network and no GPU, in place of
OpenLLaMA 3B, the generator and judge LLMs and the real datasets.

    world.py  the toy world: task families, their checkers, responses in each scheme's style, pretraining text
    llm.py    the toy teacher and judge: HTTP servers speaking Chat Completions (make data, synth/pipeline.py)
    base.py   the tiny base: tokenizer + LLaMA pretrained on the toy world (python -m toy.base, make base)
    demo.py   a 1-minute look at the plumbing: tokenizer, checkpoint, KV-cached sampling (python -m toy.demo)
    data.py   the toy data files the trainers read when they are missing (their toy_records fields)
    pairs.py  on-policy DPO pairs: the SFT model's own wrong or unfinished answers, judged as filter.py does
    eval.py   exact match on held-out toy tasks (the trainers' eval_toy field, evaluate.py report)

The recipe (train_sft.py, train_dpo.py, training.py) reaches in here at a few visible call sites, `toy.…`,
each behind a config field that is 0 in the real recipe's configs.
"""
from toy.data import write_pair_data, write_stage_data
from toy.eval import check_heldout, heldout_checks, heldout_exact_match, paired_difference, record_eval, recorded, report_dpo

__all__ = ["check_heldout", "heldout_checks", "heldout_exact_match", "paired_difference", "record_eval", "recorded", "report_dpo",
           "write_pair_data", "write_stage_data"]
