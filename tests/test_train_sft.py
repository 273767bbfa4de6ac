"""train_sft.py end to end on a micro model: two QLoRA stages that write adapters and merged checkpoints
that load; a run killed by SIGTERM and resumed equals the uninterrupted run bit for bit; two gloo ranks give
the loss curve of one process with twice the accumulation; configs reject unknown keys."""
import json
import os
import re
import signal
import subprocess
import sys
from functools import partial

import pytest
import torch
from safetensors.torch import load_file

from config import load_config
from lora import load_adapter
from micro_model import ENV, REPO, micro_model, run_apart, run_script
from model.loading import load_pretrained
from train_sft import SFTConfig, main, micro_batches

STAGES = ("lamini", "hh_rlhf")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random 2-layer LLaMA (hidden 64) with a 384-piece tokenizer trained on toy text, as a HF folder."""
    return micro_model(tmp_path_factory.mktemp("base"))[0]


def micro_toml(tmp, base, stages=STAGES, **top):
    """A config file for the micro runs; toy data shared by every run in `tmp`."""
    settings = dict(base=str(base), dtype="float32", device="cpu", lr=1e-2, batch_size=8, micro_batch_size=2,
                    max_len=128, min_prompt_len=16, gradient_checkpointing=True, log_every=1, save_every=5)
    settings.update(top)
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    toy_files = {"lamini": ("lamini.jsonl", 61), "hh_rlhf": ("hh.jsonl.gz", 40)}
    for name in stages:
        file, n = toy_files[name]
        lines += ["", "[[stages]]", f'name = "{name}"', f'scheme = "{name}"',
                  f'data = ["{tmp / "data" / file}"]', f"toy_records = {n}", "epochs = 2"]
    path = tmp / f"micro-{'-'.join(stages)}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


run_sft = partial(run_script, "train_sft.py")   # (return code, output); kill_at=log-line prefix


def losses(run_dir):
    return [(r["stage"], r["step"], r["loss"]) for r in map(json.loads, open(run_dir / "metrics.jsonl"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base):
    """One uninterrupted two-stage run."""
    tmp = tmp_path_factory.mktemp("sft")
    toml = micro_toml(tmp, base)
    code, out = run_sft("--config", toml, "--out_dir", tmp / "reference", "--eval_toy", 4)
    assert code == 0, out[-3000:]
    return tmp, toml, tmp / "reference", out


def test_two_stages_write_a_peft_adapter_and_a_merged_checkpoint_each(reference, base):
    tmp, _, run, out = reference
    start = str(base)
    for stage in STAGES:
        adapter, merged = run / stage / "adapter", run / stage / "merged"
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 16, 16, 0.05)
        assert sorted(config["target_modules"]) == ["k_proj", "q_proj", "v_proj"]
        assert {k.rsplit(".", 3)[-3] for k in load_file(adapter / "adapter_model.safetensors")} == {"q_proj", "k_proj", "v_proj"}
        assert (merged / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
        # merged = the stage's start checkpoint (dense) with the adapter on top: same logits
        ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            with_adapter = load_adapter(load_pretrained(start), str(adapter)).eval()(ids)   # no dropout
            from_merged = load_pretrained(str(merged))(ids)
        assert torch.allclose(from_merged, with_adapter, atol=1e-5, rtol=0)
        assert (from_merged - load_pretrained(start)(ids)).abs().max() > 1e-3    # the stage changed the model
        start = str(merged)
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert {"stage", "step", "loss", "lr", "tok/s", "elapsed", "eta", "peak_mem_gb"} <= set(records[0])
    # 61 examples in batches of 8 = 8 batches (the last of 5), 2 epochs; HH: 40 → 5 batches, 2 epochs
    assert [(r["stage"], r["step"]) for r in records] == [("lamini", s) for s in range(1, 17)] + \
                                                         [("hh_rlhf", s) for s in range(1, 11)]
    assert f"stage=lamini step=1 loss={records[0]['loss']:.6g}" in out           # the same record on stdout
    assert set(json.loads((run / "eval_toy.json").read_text())) == {"base", "lamini", "hh_rlhf"}
    assert load_config(SFTConfig, ["--config", str(run / "config.toml")]).out_dir == str(run)


def test_killed_and_resumed_run_ends_bit_identical_to_the_uninterrupted_run(reference):
    tmp, toml, ref, _ = reference
    run = tmp / "killed"
    code, out = run_sft("--config", toml, "--out_dir", run, kill_at="stage=lamini step=7")
    assert code == 0 and "[lamini] stopped after step" in out, out[-3000:]
    assert (run / "lamini" / "checkpoint.pt").exists() and not (run / "lamini" / "merged").exists()
    code, out = run_sft("--config", toml, "--out_dir", run, "--resume", kill_at="stage=hh_rlhf step=3")
    assert code == 0 and "[lamini] resuming at step" in out and "[hh_rlhf] stopped after step" in out, out[-3000:]
    code, out = run_sft("--config", toml, "--out_dir", run, "--resume")
    assert code == 0 and "[lamini] finished earlier" in out and "[hh_rlhf] resuming at step" in out, out[-3000:]
    for stage in STAGES:
        for file in ("adapter/adapter_model.safetensors", "merged/model.safetensors"):
            assert (run / stage / file).read_bytes() == (ref / stage / file).read_bytes(), f"{stage}/{file}"
    # the resumed runs log each step once more after the checkpoint they restart from; the values agree
    assert dict(((s, n), l) for s, n, l in losses(run)) == dict(((s, n), l) for s, n, l in losses(ref))


def test_two_gloo_ranks_give_the_loss_curve_of_one_process_with_twice_the_accumulation(reference, base):
    """batch 8, micro-batch 2: one process accumulates 4 micro-batches, each of two ranks 2. The last batch
    of each epoch holds 5 examples (61 = 7 · 8 + 5): rank 0 takes 4 of them, rank 1 one."""
    tmp, _, _, _ = reference
    toml = micro_toml(tmp, base, stages=("lamini",), lora_dropout=0.0)   # dropout streams differ per rank
    code, out = run_sft("--config", toml, "--out_dir", tmp / "one")
    assert code == 0, out[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train_sft.py", "--config", str(toml), "--out_dir", str(tmp / "two")],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert ddp.returncode == 0, (ddp.stdout + ddp.stderr)[-3000:]
    one, two = losses(tmp / "one"), losses(tmp / "two")
    assert [x[:2] for x in one] == [x[:2] for x in two] and len(one) == 16
    assert [x[2] for x in two] == pytest.approx([x[2] for x in one], rel=1e-6, abs=0)
    a = load_file(tmp / "one" / "lamini" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp / "two" / "lamini" / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_each_rank_takes_its_consecutive_run_of_micro_batches_and_short_batches_split_left_first():
    rows = list(range(100))
    assert micro_batches(rows, list(range(8)), 0, 1, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert micro_batches(rows, list(range(8)), 1, 2, 2) == [[4, 5], [6, 7]]
    assert micro_batches(rows, list(range(5)), 0, 2, 2) == [[0, 1], [2, 3]]
    assert micro_batches(rows, list(range(5)), 1, 2, 2) == [[4]]
    assert micro_batches(rows, list(range(1)), 1, 2, 2) == []


def test_unknown_config_keys_are_errors_that_list_the_valid_ones(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('lr_sheduler = "cosine"\n')
    with pytest.raises(SystemExit, match=r"bad.toml: unknown key 'lr_sheduler' \(valid: base, tokenizer, out_dir, "):
        main(["--config", str(bad)])
    bad.write_text('[[stages]]\nname = "lamini"\ndata = ["x.jsonl"]\nepoch = 2\n')
    with pytest.raises(SystemExit, match=r"unknown key 'stages\[0\]\.epoch' \(valid: name, scheme, data, "):
        main(["--config", str(bad)])
    with pytest.raises(SystemExit, match=r"command line: unknown flag '--lora_rank' \(valid: .*lora_r, "):
        main(["--lora_rank", "8"])


def test_shipped_configs_load_and_a_fresh_run_refuses_an_existing_run_folder(reference):
    tiny = load_config(SFTConfig, ["--config", os.path.join(REPO, "configs/tiny.toml")])
    paper = load_config(SFTConfig, ["--config", os.path.join(REPO, "configs/openbezoar-3b.toml")])
    for cfg in (tiny, paper):
        assert [s.scheme for s in cfg.stages] == ["lamini", "orca", "evol_instruct", "hh_rlhf"]
        assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets) == (16, 16, 0.05, ["q_proj", "k_proj", "v_proj"])
        assert cfg.quantize == "nf4"
    assert paper.stages[-1].first_n == 100_000
    _, toml, run, _ = reference
    with pytest.raises(SystemExit, match="already holds stage"):
        main(["--config", str(toml), "--out_dir", str(run)])


def test_a_resume_checks_data_and_start_and_after_sigkill_logs_each_step_once(tmp_path, base):
    """SIGKILL at step 7 with the checkpoint at 5: the resume refuses other data and a rewritten start (one
    line naming the file), then logs steps 6 and 7 again, once each. A SIGTERM that comes after the last
    stage was saved (here during the toy evaluation) exits 0: all the work is saved."""
    toml = micro_toml(tmp_path, base, stages=("lamini",))
    run, data = tmp_path / "run", tmp_path / "data" / "lamini.jsonl"
    code, out, err = run_apart("train_sft.py", "--config", toml, "--out_dir", run, kill_at="stage=lamini step=7",
                               sig=signal.SIGKILL)
    assert code == -signal.SIGKILL and (run / ".lock").exists(), out[-3000:]     # the lock of a dead run
    (run / "lamini" / f".merged.partial.tmp-{dead_pid()}").mkdir()               # as a kill mid-merge leaves
    kept = data.read_bytes()
    data.write_bytes(b"".join(kept.splitlines(keepends=True)[:40]))              # the same path, other records
    code, out, err = run_apart("train_sft.py", "--config", toml, "--out_dir", run, "--resume")
    ckpt = run / "lamini" / "checkpoint.pt"
    assert code == 1 and err[-1] == f"{data}: not what {ckpt} was trained on (its data fingerprint differs); " \
                                    f"restore it, or start the run again in another out_dir", err
    assert len(err) == 3 and re.fullmatch(rf"{re.escape(str(run))}: taking over the lock of pid \d+ on \S+, which is "
                                          rf"no longer running", err[0]), err
    assert re.fullmatch(rf"{re.escape(str(run))}/lamini/\.merged\.partial\.tmp-\d+: removing what pid \d+ left there "
                        rf"\(killed before it finished writing\)", err[1]), err                # the dead merge's folder
    data.write_bytes(kept)
    weights, st = base / "model.safetensors", os.stat(base / "model.safetensors")
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))               # the start rewritten
    try:
        code, out, err = run_apart("train_sft.py", "--config", toml, "--out_dir", run, "--resume")
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert code == 1 and err == [f"{base}: not what {ckpt} was trained on (its start fingerprint differs); "
                                 f"restore it, or start the run again in another out_dir"], err
    code, out, err = run_apart("train_sft.py", "--config", toml, "--out_dir", run, "--resume", "--eval_toy", 2,
                               kill_at="[lamini] saved")
    assert code == 0 and "[lamini] resuming at step 5 of 16" in out, out[-3000:]
    assert re.search(r"removed [12] line\(s\) logged after step 5, which follow again", out)   # 6, 7 (if written)
    assert "SIGTERM: all work was saved" in out and "continue with --resume" not in out, out[-2000:]
    assert [(r["stage"], r["step"]) for r in map(json.loads, open(run / "metrics.jsonl"))] == \
        [("lamini", s) for s in range(1, 17)]
    assert sorted(os.listdir(run / "lamini")) == ["adapter", "checkpoint.pt", "merged"]   # the temp folder went
    assert not (run / ".lock").exists()


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
