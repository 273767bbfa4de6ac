"""train_dpo.py end to end on a micro model: the first step sees policy = reference (loss log 2, rewards 0);
the run writes a PEFT adapter and a merged checkpoint that equals it; a run killed by SIGTERM and resumed
equals the uninterrupted run bit for bit; two gloo ranks give the loss curve of one process with twice the
accumulation; cached reference log-probs equal independently computed ones and give the same training."""
import gzip
import json
import math
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
from data.batching import tokenize_pair
from data.hh import hh_pairs
from data.template import format_prompt
from lora import load_adapter
from losses import sequence_logps
from micro_model import ENV, REPO, micro_model, run_apart, run_script
from model import Tokenizer
from model.loading import load_pretrained
from toy import world
from train_dpo import METRICS, DPOConfig, main, rpo_term


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A random 2-layer LLaMA (hidden 64) with a 512-piece tokenizer trained on toy text and templated toy
    prompts (so that a toy pair is ~100 tokens): the 'SFT model'."""
    texts = world.pretraining_text(300, 0) + [format_prompt(t.instruction, t.input) for t in world.heldout_tasks(300, 5)]
    return micro_model(tmp_path_factory.mktemp("start"), texts, vocab_size=512)[0]


def micro_toml(tmp, start, **top):
    """40 toy training pairs (batches of 8: 5 steps an epoch, 2 epochs), 12 held-out pairs."""
    settings = dict(base=str(start), dtype="float32", device="cpu", lr=2e-2, beta=0.5, batch_size=8,
                    micro_batch_size=2, max_len=160, min_prompt_len=16, gradient_checkpointing=True,
                    log_every=1, save_every=3, eval_every=4, epochs=2, toy_records=40, toy_eval_records=12,
                    data=[str(tmp / "data" / "train.jsonl.gz")], eval_data=[str(tmp / "data" / "eval.jsonl.gz")])
    settings.update(top)
    path = tmp / f"micro-{len(list(tmp.glob('micro-*.toml')))}.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    return path


run_dpo = partial(run_script, "train_dpo.py")   # (return code, output); kill_at=log-line prefix ("step=4")


def records(run_dir, kind="loss"):
    """metrics.jsonl records holding `kind` (training steps: "loss"; evaluations: "eval/loss"; all: "")."""
    return [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if not kind or kind in r]


def values(record):
    """A record without its wall-clock fields, keyed by step: what must repeat exactly."""
    return {k: v for k, v in record.items() if k not in ("time", "tok/s", "elapsed", "eta", "peak_mem_gb")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, start):
    """One uninterrupted run."""
    tmp = tmp_path_factory.mktemp("dpo")
    toml = micro_toml(tmp, start)
    code, out = run_dpo("--config", toml, "--out_dir", tmp / "reference", "--eval_toy", 4)
    assert code == 0, out[-3000:]
    return tmp, toml, tmp / "reference", out


def test_the_first_step_has_policy_equal_to_reference_so_loss_log2_and_zero_rewards(reference):
    """B = 0 in a fresh LoRA: the policy is the reference exactly, h = 0, −log σ(0) = log 2."""
    first = records(reference[2])[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0
    assert first["rewards/accuracies"] == 0                            # ties are not wins
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0


def test_a_run_logs_the_dpo_metrics_and_writes_an_adapter_and_a_merged_checkpoint(reference, start):
    tmp, _, run, out = reference
    train, evals = records(run), records(run, "eval/loss")
    assert [r["step"] for r in train] == list(range(1, 11))            # 40 pairs / 8 = 5 steps, 2 epochs
    assert {*METRICS, "lr", "grad_norm", "tok/s", "elapsed", "eta", "peak_mem_gb"} <= set(train[0])
    assert [r["step"] for r in evals] == [4, 8, 10]                    # every 4 steps and after the last
    assert {f"eval/{m}" for m in METRICS} <= set(evals[0])
    for r in train + evals:
        p = "eval/" if "eval/loss" in r else ""
        assert r[p + "rewards/margins"] == pytest.approx(r[p + "rewards/chosen"] - r[p + "rewards/rejected"], abs=1e-9)
        assert 0 <= r[p + "rewards/accuracies"] <= 1
    assert f"step=1 loss={train[0]['loss']:.6g} rewards/chosen=0" in out   # the same record on stdout
    second_epoch = train[5:]                                           # it learned the training pairs
    assert sum(r["loss"] for r in second_epoch) / 5 < math.log(2) - 0.02
    assert sum(r["rewards/accuracies"] for r in second_epoch) / 5 > 0.5
    assert "hh-rlhf pairs: read 40, used 40" in out and "tokenize pairs: tokenized 12" in out

    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], sorted(config["target_modules"])) == \
        ("LORA", 16, 16, ["k_proj", "q_proj", "v_proj"])
    assert (run / "merged" / "tokenizer.model").read_bytes() == (start / "tokenizer.model").read_bytes()
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_adapter = load_adapter(load_pretrained(str(start)), str(run / "adapter")).eval()(ids)
        from_merged = load_pretrained(str(run / "merged"))(ids)
        assert torch.allclose(from_merged, with_adapter, atol=1e-5, rtol=0)
        assert (from_merged - load_pretrained(str(start))(ids)).abs().max() > 1e-3
    assert set(json.loads((run / "eval_toy.json").read_text())) == {"sft", "dpo"}
    assert load_config(DPOConfig, ["--config", str(run / "config.toml")]).out_dir == str(run)


def test_killed_and_resumed_run_ends_bit_identical_to_the_uninterrupted_run(reference):
    tmp, toml, ref, _ = reference
    run = tmp / "killed"
    code, out = run_dpo("--config", toml, "--out_dir", run, kill_at="step=5")
    assert code == 0 and "stopped after step" in out, out[-3000:]
    assert (run / "checkpoint.pt").exists() and not (run / "merged").exists()
    code, out = run_dpo("--config", toml, "--out_dir", run, "--resume")
    assert code == 0 and "resuming at step" in out, out[-3000:]
    for file in ("adapter/adapter_model.safetensors", "merged/model.safetensors"):
        assert (run / file).read_bytes() == (ref / file).read_bytes(), file
    # the stopped run and the resumed one together logged exactly the uninterrupted run's records
    assert [values(r) for r in records(run, "")] == [values(r) for r in records(ref, "")]
    code, out = run_dpo("--config", toml, "--out_dir", run, "--resume")
    assert code == 0 and "finished earlier" in out


def test_two_gloo_ranks_give_the_loss_curve_of_one_process_with_twice_the_accumulation(reference, start):
    """batch 8, micro-batch 2: one process accumulates 4 micro-batches, each of two ranks 2. The 12 held-out
    pairs make 6 evaluation micro-batches: 3 per rank."""
    tmp, _, _, _ = reference
    toml = micro_toml(tmp, start, lora_dropout=0.0, epochs=1)          # dropout streams differ per rank
    code, out = run_dpo("--config", toml, "--out_dir", tmp / "one")
    assert code == 0, out[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train_dpo.py", "--config", str(toml), "--out_dir", str(tmp / "two")],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert ddp.returncode == 0, (ddp.stdout + ddp.stderr)[-3000:]
    for kind in ("loss", "eval/loss"):
        one, two = records(tmp / "one", kind), records(tmp / "two", kind)
        assert [r["step"] for r in one] == [r["step"] for r in two] and len(one) > 1
        for name in (METRICS if kind == "loss" else [f"eval/{m}" for m in METRICS]):
            # rewards are β × differences of fp32 sums near −30: absolute rounding ~1e-6
            assert [r[name] for r in two] == pytest.approx([r[name] for r in one], rel=1e-5, abs=1e-5), name
    a = load_file(tmp / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp / "two" / "adapter" / "adapter_model.safetensors")
    # Adam steps are ≈ lr = 2e-2 each; a wrong reduction would differ by that much. The rounding of the two
    # gradient sums (ranks' all-reduce against one process's accumulation) differs by ~1e-7 relative, and
    # Adam divides A's tiny early gradients (B starts at 0) by their own scale, which amplifies it: measured
    # 3.3e-6 with the for-each AdamW and 2.6e-5 with fused AdamW (training.make_optimizer), hence 1e-4.
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-4) for k in a)


def test_cached_reference_logps_equal_one_pair_at_a_time_logps_and_give_the_same_training(reference):
    """The cache holds log π_ref of each pair (the start model in NF4, no adapter); recomputed here pair by
    pair, unpadded, through the plain (unchunked) sequence_logps. Training from it follows the in-loop run,
    and a resumed run reads the cache instead of recomputing it."""
    tmp, toml, ref, _ = reference
    run = tmp / "cached"
    code, out = run_dpo("--config", toml, "--out_dir", run, "--precompute_ref_logps", "true", kill_at="step=3")
    assert code == 0 and "stopped after step" in out and "reference log-probs (train)" in out, out[-3000:]
    code, out = run_dpo("--config", toml, "--out_dir", run, "--precompute_ref_logps", "true", "--resume")
    assert code == 0 and f"reference log-probs: read {run}/ref_logps.pt" in out, out[-3000:]
    cfg = load_config(DPOConfig, ["--config", str(toml)])
    cache = torch.load(run / "ref_logps.pt", weights_only=True)
    tok = Tokenizer(os.path.join(cfg.base, "tokenizer.model"))
    model = load_pretrained(cfg.base, quantize="nf4").eval()
    for key, path in (("train", cfg.data[0]), ("eval", cfg.eval_data[0])):
        pairs, _ = hh_pairs(path)
        assert cache[key].shape == (len(pairs), 2)
        for i, p in enumerate(pairs):
            row = tokenize_pair(tok, p.prompt, p.chosen, p.rejected, cfg.max_len, cfg.min_prompt_len)
            for j, side in enumerate(("chosen", "rejected")):
                ids = torch.tensor([row[f"{side}_input_ids"]])
                with torch.no_grad():
                    expected = sequence_logps(model(ids), torch.tensor([row[f"{side}_labels"]]))[0]
                assert cache[key][i, j].item() == pytest.approx(expected.item(), abs=1e-4)
    for kind, names in (("loss", METRICS), ("eval/loss", [f"eval/{m}" for m in METRICS])):
        cached, in_loop = records(run, kind), records(ref, kind)
        assert [r["step"] for r in cached] == [r["step"] for r in in_loop]
        for name in names:
            assert [r[name] for r in cached] == pytest.approx([r[name] for r in in_loop], rel=1e-3, abs=1e-5), name


def test_rpo_adds_alpha_times_the_chosen_responses_mean_token_nll_and_nothing_at_alpha_0():
    """Chosen rows of 3 and 1 response tokens (labels ≠ −100) with log-probs −3 and −1: NLL per token 1 and 1."""
    labels = torch.tensor([[-100, 5, 6, 2], [-100, -100, 7, -100],       # chosen rows
                           [-100, 9, 2, -100], [-100, -100, 8, 2]])      # rejected rows (not counted)
    logps = torch.tensor([-3.0, -1.0])
    cfg = DPOConfig(rpo_alpha=0.5)
    assert rpo_term(cfg, logps, {"labels": labels}).tolist() == [0.5, 0.5]
    assert rpo_term(DPOConfig(), logps, {"labels": labels}).tolist() == [0.0, 0.0]


def test_shipped_configs_load_and_bad_settings_are_one_line_errors(reference, tmp_path):
    tiny = load_config(DPOConfig, ["--config", os.path.join(REPO, "configs/dpo-tiny.toml")])
    paper = load_config(DPOConfig, ["--config", os.path.join(REPO, "configs/dpo-openbezoar-3b.toml")])
    for cfg in (tiny, paper):
        assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets) == (16, 16, 0.05, ["q_proj", "k_proj", "v_proj"])
        assert cfg.quantize == "nf4"
    assert tiny.base == "runs/tiny/hh_rlhf/merged" and tiny.out_dir == "runs/tiny-dpo"
    assert paper.epochs == 1
    assert paper.base.endswith("hh_rlhf/merged") and paper.merged_dtype == "float16"
    assert (paper.beta, paper.rpo_alpha, paper.label_smoothing, paper.ipo) == (0.1, 0.0, 0.0, False)  # plain DPO
    bad = tmp_path / "bad.toml"
    bad.write_text('betta = 0.1\n')
    with pytest.raises(SystemExit, match=r"bad.toml: unknown key 'betta' \(valid: base, tokenizer, out_dir, "):
        main(["--config", str(bad)])
    with pytest.raises(SystemExit, match=r"command line: key 'beta' is 'high', expected float"):
        main(["--beta", "high"])
    _, toml, run, _ = reference
    with pytest.raises(SystemExit, match="already holds a DPO run; pass --resume"):
        main(["--config", str(toml), "--out_dir", str(run)])
    with pytest.raises(SystemExit, match=r"config.toml: --resume with a different config \(beta changed\)"):
        main(["--config", str(toml), "--out_dir", str(run), "--resume", "--beta", "0.2"])
    with pytest.raises(SystemExit, match="no config.json; base must be the merged HH-RLHF SFT checkpoint"):
        main(["--config", str(toml), "--out_dir", str(tmp_path / "x"), "--base", str(tmp_path)])


def test_a_resume_refuses_other_pairs_logs_each_step_once_and_a_sigterm_after_the_merge_exits_0(reference):
    """SIGKILL at step 5 with the checkpoint at 3 (and an evaluation logged at 4): the resume refuses a
    training file rewritten with other pairs, then, on the right one, logs steps 4 and 5 and the evaluation
    at 4 once more, once each. A SIGTERM during the toy evaluation after the merge exits 0."""
    tmp, toml, ref, _ = reference
    run, data = tmp / "fingerprint", tmp / "data" / "train.jsonl.gz"
    code, out, err = run_apart("train_dpo.py", "--config", toml, "--out_dir", run, kill_at="step=5",
                               sig=signal.SIGKILL)
    assert code == -signal.SIGKILL, out[-3000:]
    kept = data.read_bytes()
    data.write_bytes(gzip.compress(b"".join(gzip.decompress(kept).splitlines(keepends=True)[::-1])))  # reordered
    code, out, err = run_apart("train_dpo.py", "--config", toml, "--out_dir", run, "--resume")
    assert code == 1 and err[-1] == f"{data}: not what {run}/checkpoint.pt was trained on (its data fingerprint " \
                                    f"differs); restore it, or start the run again in another out_dir", err
    data.write_bytes(kept)
    code, out, err = run_apart("train_dpo.py", "--config", toml, "--out_dir", run, "--resume", "--eval_toy", 2,
                               kill_at="saved")
    assert code == 0 and "resuming at step 3 of 10" in out, out[-3000:]
    assert re.search(r"metrics.jsonl: removed [23] line\(s\) logged after step 3, which follow again", out), out
    assert "SIGTERM: all work was saved" in out, out[-2000:]
    assert [values(r) for r in records(run, "")] == [values(r) for r in records(ref, "")]    # each step once
    assert not (run / ".lock").exists()
