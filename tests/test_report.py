"""evals/report.py (`python evaluate.py report`, `make eval`) on micro checkpoints laid out as train_sft.py
and train_dpo.py leave them: one row per checkpoint in recipe order (base, each SFT stage, DPO); toy exact
match equal to greedy answers decoded one prompt at a time and checked by toy/world.py (and to hand-counted
golden values: three checkpoints are built to give one fixed answer); toy_mc equal to evals/harness.py on the
same model; results.md's numbers equal results.json's; every output written through a synced temp file and a
rename; a missing checkpoint counted and named, a folder without config.json named, before anything is
scored."""
import json
import os
import shutil
import subprocess
import sys

import matplotlib.image
import pytest
import torch

import evaluate
from config import dump_config
from evals import harness
from micro_model import ENV, REPO, micro_model
from model import Tokenizer, load_pretrained, save_pretrained
from model.sampling import generate
from toy import world
from train_sft import SFTConfig, Stage

TOY_TASKS, SEED, LIMIT = 32, 0, 32
# The fixed answer each checkpoint gives (the base is the random micro model). Of the 32 held-out tasks
# (seed 0) one has the answer 19 and two the answer 7; "The answer is 7." has no "Answer:" mark, so
# world.extract_answer takes the whole line and no task counts it right.
ANSWERS = {"lamini": "19", "hh_rlhf": "7", "dpo": "The answer is 7."}
GOLDEN = {"lamini": 1 / 32, "hh_rlhf": 2 / 32, "dpo": 0.0}
NAMES = ["base", "lamini", "hh_rlhf", "dpo"]
OUTPUTS = ("results.json", "results.md", "report.png")
pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: one torch thread


def answering(model, tok, text):
    """Make `model` answer every templated prompt with `text`, then EOS. With o_proj and down_proj zero no
    block writes to the residual stream, so the logits depend on the last token only (a bigram model):
    token c_i embeds as the unit vector e_i, the final RMSNorm makes it √D·e_i, and lm_head row c_{i+1}
    reads dimension i. The chain starts at the prompt's last token ("\\n" after "### Response:")."""
    prompt_end = tok.encode(world.task_prompt(world.heldout_tasks(1, SEED)[0]))[-1]
    chain = [prompt_end] + tok.encode(text, bos=False) + [tok.eos_id]
    assert len(set(chain)) == len(chain), f"{text!r}: a token repeats, the bigram chain would loop"
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for i, (c, nxt) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[c, i] = 1.0
            model.lm_head.weight[nxt, i] = 1.0
    return model


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def sft_run_config(sft_run, base, stages=("lamini", "hh_rlhf")):
    """config.toml as train_sft.py saves it in its out_dir."""
    sft_run.mkdir(parents=True, exist_ok=True)
    cfg = SFTConfig(base=str(base), out_dir=str(sft_run),
                    stages=[Stage(s, s, [str(sft_run / "data" / f"{s}.jsonl")]) for s in stages])
    dump_config(cfg, sft_run / "config.toml")


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """base/ (random micro model, pretraining metrics), sft/config.toml, sft/<stage>/merged, dpo/merged, each
    merged model answering ANSWERS[name]; training curves in each run's metrics.jsonl."""
    root = tmp_path_factory.mktemp("report")
    base, model = micro_model(root / "base", max_position_embeddings=512)
    tok = Tokenizer(base / "tokenizer.model")
    sft_run, dpo_run = root / "sft", root / "dpo"
    sft_run_config(sft_run, base)
    folders = {"base": base, "lamini": sft_run / "lamini" / "merged", "hh_rlhf": sft_run / "hh_rlhf" / "merged",
               "dpo": dpo_run / "merged"}
    for name, text in ANSWERS.items():
        save_pretrained(answering(model, tok, text), str(folders[name]))
        shutil.copyfile(base / "tokenizer.model", folders[name] / "tokenizer.model")
    write_jsonl(base / "metrics.jsonl", [{"step": s, "loss": 6.0 - s} for s in range(1, 6)])
    write_jsonl(sft_run / "metrics.jsonl", [{"stage": st, "step": s, "loss": 2.0 / s}
                                            for st in ("lamini", "hh_rlhf") for s in range(1, 4)])
    write_jsonl(dpo_run / "metrics.jsonl", [{"step": 1, "loss": 0.69, "rewards/accuracies": 0.0},
                                            {"step": 2, "loss": 0.6, "rewards/accuracies": 0.5},
                                            {"step": 2, "eval/loss": 0.65, "eval/rewards/accuracies": 0.5}])
    return root, sft_run, dpo_run, folders


def report_args(sft_run, dpo_run, out):
    return ["report", "--sft-run", str(sft_run), "--dpo-run", str(dpo_run), "--out", str(out),
            "--toy-tasks", str(TOY_TASKS), "--seed", str(SEED), "--tasks", "toy_mc", "--limit", str(LIMIT),
            "--device", "cpu"]


@pytest.fixture(scope="module")
def report(layout):
    """One report run, in-process, recording each fsync (by the path of the synced file) and each rename."""
    root, sft_run, dpo_run, _ = layout
    out = root / "eval"
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.abspath(src), os.path.abspath(dst)))
        return real_replace(src, dst)

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("JUDGE_URL", raising=False)
        mp.delenv("JUDGE_MODEL", raising=False)
        mp.setattr(os, "fsync", fsync)
        mp.setattr(os, "replace", replace)
        evaluate.main(report_args(sft_run, dpo_run, out))
    results = json.loads((out / "results.json").read_text())
    return out, results, (out / "results.md").read_text(), events


def test_one_row_per_checkpoint_in_recipe_order(report, layout):
    out, results, md, _ = report
    folders = layout[3]
    assert list(results["table"]) == NAMES and list(results["details"]) == NAMES
    assert [results["details"][n]["checkpoint"] for n in NAMES] == [str(folders[n]) for n in NAMES]
    columns = ["toy exact_match", "toy_mc acc", "toy_mc acc_norm"]
    assert all(list(results["table"][n]) == columns for n in NAMES)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0] == "| checkpoint | " + " | ".join(columns) + " |"
    assert [r.split(" | ")[0].removeprefix("| ") for r in rows[1:]] == NAMES
    assert "MT-Bench: not run (no judge endpoint" in md                # said so, not silently left out


def test_results_md_numbers_equal_results_json(report):
    _, results, md, _ = report
    rows = [line for line in md.splitlines() if line.startswith("| ")][1:]
    for row in rows:
        name, *cells = [c.strip() for c in row.strip("|").split("|")]
        values = list(results["table"][name].values())
        assert cells == [f"{v:.4f}" for v in values]
        assert [float(c) for c in cells] == pytest.approx(values, abs=5e-5 + 1e-12)   # rounded to 4 places


def test_toy_exact_match_equals_greedy_answers_checked_one_prompt_at_a_time(report, layout):
    """Independent of toy.eval.heldout_exact_match's batching: each prompt decoded alone, toy/world.py's check."""
    _, results, _, _ = report
    folders = layout[3]
    tasks = world.heldout_tasks(TOY_TASKS, SEED)
    for name in NAMES:
        model, tok = load_pretrained(str(folders[name])), Tokenizer(folders[name] / "tokenizer.model")
        responses = [generate(model, [tok.encode(world.task_prompt(t))], 64, eos_id=tok.eos_id, tokenizer=tok)[0].text
                     for t in tasks]
        expected = sum(world.check(t, r) for t, r in zip(tasks, responses)) / len(tasks)
        assert results["table"][name]["toy exact_match"] == expected, name
        if name in ANSWERS:                                            # the built-in answer, found by hand
            assert {world.extract_answer(r) for r in responses} == {world.extract_answer(ANSWERS[name])}
            assert expected == GOLDEN[name]
            assert sum(world.normalise(t.answer) == world.extract_answer(ANSWERS[name]) for t in tasks) == GOLDEN[name] * 32


def test_toy_mc_equals_the_harness_on_the_same_model(report, layout):
    _, results, _, _ = report
    folders = layout[3]
    for name in NAMES:
        model, tok = load_pretrained(str(folders[name])), Tokenizer(folders[name] / "tokenizer.model")
        metrics = harness.evaluate(model, tok, ["toy_mc"], limit=LIMIT, progress=False)["results"]["toy_mc"]
        assert results["table"][name]["toy_mc acc"] == metrics["acc,none"]
        assert results["table"][name]["toy_mc acc_norm"] == metrics["acc_norm,none"]
        assert results["details"][name]["harness"]["results"]["toy_mc"]["acc,none"] == metrics["acc,none"]
    # the rows differ, and somewhere acc and acc_norm do, so a swapped or repeated column shows
    assert len({results["table"][n]["toy_mc acc"] for n in NAMES}) > 1
    assert any(results["table"][n]["toy_mc acc"] != results["table"][n]["toy_mc acc_norm"] for n in NAMES)


def test_every_output_is_a_synced_temp_file_renamed_into_place(report):
    out, _, _, events = report
    assert sorted(os.listdir(out)) == sorted(OUTPUTS)                  # no temp file left behind
    for name in OUTPUTS:
        final = str(out / name)
        renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == final]
        assert len(renames) == 1, f"{name}: written in place, not renamed into place"
        src = events[renames[0]][1]
        assert src != final and os.path.dirname(src) == str(out)     # beside it: the rename is atomic
        assert ("fsync", src) in events[:renames[0]], f"{name}: renamed before its temp file was synced"
    png = matplotlib.image.imread(out / "report.png")
    assert png.shape[:2] == (420, 2000)                                # 20 x 4.2 inches at 100 dpi
    assert png[..., :3].std() > 0.05                                   # curves and labels drawn, not blank


def test_missing_checkpoints_are_counted_and_named_before_anything_is_scored(layout, tmp_path):
    _, sft_run, _, folders = layout
    run = tmp_path / "sft"
    sft_run_config(run, folders["base"])
    shutil.copytree(folders["lamini"], run / "lamini" / "merged")      # hh_rlhf and dpo never trained
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "evaluate.py", *report_args(run, tmp_path / "dpo", out)], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    message = proc.stderr.strip()
    assert "\n" not in message and "Traceback" not in message, proc.stderr   # one line
    assert "2 of 4 checkpoints missing" in message
    assert str(run / "hh_rlhf" / "merged") in message and str(tmp_path / "dpo" / "merged") in message
    assert str(run / "lamini" / "merged") not in message
    assert not out.exists()


def test_a_checkpoint_folder_without_config_json_is_named_before_anything_is_scored(layout, tmp_path):
    root, sft_run, _, folders = layout
    dpo = tmp_path / "dpo"
    shutil.copytree(folders["dpo"], dpo / "merged")
    (dpo / "merged" / "config.json").unlink()
    with pytest.raises(SystemExit) as e:
        evaluate.main(report_args(sft_run, dpo, tmp_path / "eval"))
    message = str(e.value)
    assert message.startswith(str(dpo / "merged" / "config.json") + ": not found") and "\n" not in message
    assert not (tmp_path / "eval").exists()                            # failed before scoring base and SFT


def test_dpo_against_the_sft_model_is_the_paired_difference_on_the_same_tasks(report):
    """hh_rlhf (the SFT model, the last stage) answers the 2 tasks whose answer is 7 right; dpo none: the
    per-task differences are −1 twice and 0 thirty times."""
    _, results, md, _ = report
    n, lost = TOY_TASKS, 2
    mean = -lost / n
    se = ((lost - n * mean ** 2) / (n - 1) / n) ** 0.5         # sample variance of d over n, divided by n
    d = results["dpo_vs_sft"]
    assert d["sft"] == "hh_rlhf" and (d["tasks"], d["better"], d["worse"]) == (n, 0, lost)
    assert d["difference"] == pytest.approx(mean, abs=1e-12) and d["se"] == pytest.approx(se, rel=1e-12)
    assert d["z"] == pytest.approx(mean / se)
    assert results["details"]["dpo"]["toy_right"] == [0] * n
    assert sum(results["details"]["hh_rlhf"]["toy_right"]) == lost
    assert f"DPO − hh_rlhf (toy exact match, paired over {n} tasks): {mean:+.4f} ± {se:.4f} (SE)" in md
