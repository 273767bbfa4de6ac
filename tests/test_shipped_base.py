"""The shipped toy base (toy/pretrained), where `make sft` starts: what `python -m toy.base` writes with its
defaults from the documents toy/world.py writes today, and a base in the sense the embedded default needs (it
states the toy world's facts, and cannot yet follow the instruction format)."""
import os
import random
from pathlib import Path

import pytest
import torch

from model import Tokenizer
from model.loading import load_pretrained
from model.sampling import generate
from toy import base, world
from toy.base import SHIPPED, BaseConfig, check_shipped
from toy.eval import heldout_exact_match


def test_the_shipped_base_is_this_scripts_defaults_on_todays_world():
    check_shipped(BaseConfig(shipped=SHIPPED))           # SystemExit naming the stale setting or data.json


def test_another_setting_or_world_is_refused_in_one_line(monkeypatch):
    with pytest.raises(SystemExit, match=r"pretrained/train_config\.toml: steps is 2000, this run asks for 1500; "):
        check_shipped(BaseConfig(shipped=SHIPPED, steps=1500))
    real = world.pretraining_text
    monkeypatch.setattr(world, "pretraining_text", lambda n, seed: real(n, seed)[:-1] + ["7 plus 5 is 13."])
    with pytest.raises(SystemExit, match=r"pretrained/data\.json: the base learnt other documents than toy/world"):
        check_shipped(BaseConfig(shipped=SHIPPED))


def test_a_folder_without_the_files_is_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"^.*: no train_config\.toml; expected a folder written by python -m toy\.base$"):
        check_shipped(BaseConfig(shipped=str(tmp_path)))


def test_installing_copies_the_whole_folder(tmp_path):
    out = tmp_path / "base"
    base.main(["--shipped", SHIPPED, "--out_dir", str(out)])
    names = sorted(os.listdir(SHIPPED))
    assert sorted(os.listdir(out)) == names and not (tmp_path / "base.tmp").exists()
    assert all((out / n).read_bytes() == (Path(SHIPPED) / n).read_bytes() for n in names)


def test_the_shipped_base_states_the_facts_but_does_not_follow_instructions():
    model = load_pretrained(SHIPPED).eval()
    tok = Tokenizer(os.path.join(SHIPPED, "tokenizer.model"))
    # Facts: a held-out task's statement ("... is 12.") with its answer cut off, completed greedily.
    rng = random.Random(1)
    tasks = [world.sample_task(rng, "heldout") for _ in range(300)]
    prefixes = [(s := world.restatement(t))[:s.rindex(t.answer)].rstrip() for t in tasks]
    with torch.no_grad():
        outs = generate(model, [tok.encode(p) for p in prefixes], 12, eos_id=tok.eos_id, tokenizer=tok)
    facts = sum(o.text.strip().startswith(t.answer) for o, t in zip(outs, tasks)) / len(tasks)
    assert facts >= 0.95, facts                          # 0.98 measured on 600 (bench/README.md)
    # The format: asked the held-out tasks in the prompt template, it answers none of them right.
    assert heldout_exact_match(model, tok, 200, 0, 64) < 0.10
