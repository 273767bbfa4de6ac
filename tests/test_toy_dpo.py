"""The embedded default's DPO side: on-policy toy pairs (toy/pairs.py: the SFT model's own wrong or unfinished
samples, judged through filter.py's judging code), the harness task that separates the base from the SFT model
(evals/tasks.py toy_format_mc), the paired difference of two models' exact match (toy/eval.py), and the refusal
of training data that asks held-out tasks."""
import os
import random
import re
import tempfile

import pytest
from data.hh import hh_pairs
from evals.tasks import toy_format_mc
from files import write_jsonl_atomic
from micro_model import micro_model
from model import Tokenizer
from toy import world
from toy.eval import check_heldout, paired_difference
from toy.pairs import judged_wrong, on_policy_pairs

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: one torch thread


def test_paired_difference_is_the_mean_of_the_per_task_differences_and_its_standard_error():
    before, after = [1, 1, 0, 0, 1, 0], [1, 0, 1, 1, 1, 0]
    d = [0, -1, 1, 1, 0, 0]
    mean = sum(d) / 6
    se = (sum((x - mean) ** 2 for x in d) / 5 / 6) ** 0.5
    got = paired_difference(before, after)
    assert got == {"difference": pytest.approx(mean), "se": pytest.approx(se), "z": pytest.approx(mean / se),
                   "tasks": 6, "better": 2, "worse": 1}
    assert paired_difference([1, 0], [1, 0])["z"] == 0.0
    with pytest.raises(ValueError, match="the same tasks"):
        paired_difference([1, 0], [1])


def test_the_judging_through_filter_py_agrees_with_the_checker():
    rng = random.Random(0)
    for _ in range(200):
        t = world.sample_task(rng, "train")
        assert not judged_wrong(t, world.reference_response(t))
        wrong = world.make_wrong(t, rng)
        assert judged_wrong(t, f"{world.restatement(t, wrong)}\nAnswer: {wrong}")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    folder, model = micro_model(tmp_path_factory.mktemp("micro"), max_position_embeddings=512)
    return model, Tokenizer(folder / "tokenizer.model")


def test_on_policy_pairs_reject_the_models_own_wrong_or_cut_samples_and_choose_the_checked_gold(micro):
    model, tok = micro
    rows, counts = on_policy_pairs(model, tok, 12, 0, "train", 3, 1.0, 16, batch=8)
    assert counts["tasks"] == 12 and counts["samples"] == 36
    assert counts["wrong"] + counts["cut (no EOS)"] + counts["right"] == 36
    assert counts["pairs"] == len(rows) > 0
    pairs, _ = hh_pairs_of(rows)
    for p in pairs:
        task = world.parse_instruction(p.prompt)
        assert world.split_of(task.family, task.operands) == "train"
        assert world.check(task, p.chosen) and p.chosen == world.reference_response(task)
        assert p.rejected != p.chosen
    again, _ = on_policy_pairs(model, tok, 12, 0, "train", 3, 1.0, 16, batch=8)
    assert again == rows                                      # seeded: the same file every time


def hh_pairs_of(rows):
    """The rows as train_dpo.py reads them (data/hh.py), through a file."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "pairs.jsonl")
        write_jsonl_atomic(path, rows)
        return hh_pairs(path)


def test_on_policy_pairs_of_the_heldout_split_ask_heldout_tasks_only(micro):
    model, tok = micro
    rows, _ = on_policy_pairs(model, tok, 8, 0, "heldout", 2, 1.0, 8, batch=16)
    pairs, _ = hh_pairs_of(rows)
    assert pairs and all(world.split_of(t.family, t.operands) == "heldout"
                         for t in (world.parse_instruction(p.prompt) for p in pairs))


def test_training_pairs_that_ask_heldout_tasks_are_refused_in_one_line_naming_the_setting(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl_atomic(path, world.hh_pairs(20, 0, "train"))
    pairs, _ = hh_pairs(str(path))
    check_heldout(pairs, "data")                              # training tasks only: accepted
    write_jsonl_atomic(path, world.hh_pairs(20, 0, "train") + world.hh_pairs(3, 0, "heldout"))
    pairs, _ = hh_pairs(str(path))
    with pytest.raises(SystemExit) as e:
        check_heldout(pairs, f"data ({path})")
    assert str(e.value).startswith(f"data ({path}): 3 of 23 training examples ask toy tasks of the held-out "
                                   f"split (first: {path}:21)")
    assert "\n" not in str(e.value)


def test_toy_format_mc_sets_the_taught_format_against_true_prose_and_a_wrong_answer():
    task = toy_format_mc(100, 0)
    for doc in task.docs:
        t = doc.item
        gold = doc.choices[doc.gold]
        assert gold == world.reference_response(t) and world.check(t, gold)
        others = [c for i, c in enumerate(doc.choices) if i != doc.gold]
        assert len(doc.choices) == 4 and len(set(doc.choices)) == 4
        prose = [c for c in others if "Answer:" not in c]
        wrong = [c for c in others if "Answer:" in c]
        assert len(prose) == 2 and len(wrong) == 1 and not world.check(t, wrong[0])
        for c in prose:                                       # a true statement of the gold answer
            assert c.rstrip(".").endswith(t.answer) or t.answer in c
            assert len(re.findall(r"\.(?: |$)", c)) == 2        # two sentences: about as long as the gold
        assert world.split_of(t.family, t.operands) == "heldout"
    assert len({doc.gold for doc in task.docs}) == 4          # the gold's position varies
