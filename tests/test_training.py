"""training.py: the lr schedule, bit-exact resume, atomic checkpoints, a clean stop on SIGTERM, metrics
lines, seeding, the optimiser, and DDP over gloo with two processes."""
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import training
from training import (GracefulExit, MetricsLogger, Progress, format_hms, load_resume_state, lr_at, make_optimizer,
                      peak_memory_gb, rng_state, save_resume_state, seed_everything, set_rng_state)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- learning-rate schedule ---------------------------------------------------------------------

def test_warmup_rises_linearly_from_peak_over_w_to_peak():
    """W = 4: the steps 0..3 take 1/4, 2/4, 3/4, 4/4 of the peak."""
    assert [lr_at(s, 10, 4, 2.0) for s in range(4)] == [0.5, 1.0, 1.5, 2.0]


def test_cosine_and_linear_decay_hand_values():
    """N = 10, W = 4, so p = (step − 4) / 6. Steps 4, 6, 7, 8, 10 give p = 0, 1/3, 1/2, 2/3, 1 and
    cos(πp) = 1, 1/2, 0, −1/2, −1, so f = ½(1 + cos πp) = 1, 3/4, 1/2, 1/4, 0; linear f = 1 − p."""
    cosine = [lr_at(s, 10, 4, 1.0) for s in (4, 6, 7, 8, 10)]
    assert cosine == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0], abs=1e-15)
    linear = [lr_at(s, 10, 4, 1.0, "linear") for s in (4, 6, 7, 8, 10)]
    assert linear == pytest.approx([1.0, 2 / 3, 0.5, 1 / 3, 0.0], abs=1e-15)
    assert [lr_at(s, 10, 4, 1.0, "constant") for s in (4, 7, 10)] == [1.0, 1.0, 1.0]


def test_min_lr_ratio_sets_the_floor_and_steps_past_the_end_stay_there():
    """min = 0.1 · peak: at p = 1/2 the cosine gives 0.1 + 0.9 · 1/2 = 0.55; at and after N, 0.1."""
    assert lr_at(7, 10, 4, 1.0, min_lr_ratio=0.1) == pytest.approx(0.55)
    assert lr_at(10, 10, 4, 1.0, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(25, 10, 4, 1.0, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(0, 10, 0, 1.0) == 1.0                            # no warmup: the first step at peak
    with pytest.raises(ValueError, match="schedule is 'cosin'"):
        lr_at(5, 10, 4, 1.0, "cosin")


def test_decay_matches_transformers_schedules():
    """transformers' lambdas give the factor of the peak; their warmup starts at 0, ours one step later,
    so compare from step W on, up to N (their cosine climbs again past N; ours stays at the floor)."""
    from transformers.optimization import (get_cosine_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup,
                                           get_linear_schedule_with_warmup)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    W, N = 7, 50
    theirs = {"cosine": get_cosine_schedule_with_warmup(opt, W, N).lr_lambdas[0],
              "linear": get_linear_schedule_with_warmup(opt, W, N).lr_lambdas[0],
              "min": get_cosine_with_min_lr_schedule_with_warmup(opt, W, N, min_lr_rate=0.2).lr_lambdas[0]}
    for step in range(W, N + 1):
        assert lr_at(step, N, W, 3.0) == pytest.approx(3.0 * theirs["cosine"](step), abs=1e-12)
        assert lr_at(step, N, W, 3.0, "linear") == pytest.approx(3.0 * theirs["linear"](step), abs=1e-12)
        assert lr_at(step, N, W, 3.0, min_lr_ratio=0.2) == pytest.approx(3.0 * theirs["min"](step), abs=1e-12)
    for step in range(W):
        assert lr_at(step, N, W, 3.0) == pytest.approx(3.0 * theirs["cosine"](step + 1), abs=1e-12)


# --- checkpoints: resume bit for bit ---------------------------------------------------------------

def toy_model():
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1))


def train(model, optimizer, steps):
    """Each step draws from torch (data, dropout), numpy and python's random, as real loops do."""
    for _ in range(steps):
        x = torch.randn(4, 8)
        scale = 1.0 + np.random.rand() + random.random()
        loss = model(x).pow(2).mean() * scale
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_resumed_training_equals_uninterrupted_training_bit_for_bit(tmp_path):
    seed_everything(1)
    model = toy_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, optimizer, 3)
    order = torch.randperm(50)
    save_resume_state(tmp_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 3,
                               "data": {"epoch": 2, "position": 17, "order": order}, "rng": rng_state()})
    train(model, optimizer, 4)                                    # the run that was never interrupted

    seed_everything(99)                                           # a new process: other weights, other RNG
    resumed = toy_model()
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    ckpt = load_resume_state(tmp_path)
    resumed.load_state_dict(ckpt["model"])
    resumed_optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    assert ckpt["step"] == 3 and ckpt["data"]["epoch"] == 2 and ckpt["data"]["position"] == 17
    assert torch.equal(ckpt["data"]["order"], order)
    train(resumed, resumed_optimizer, 4)

    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(optimizer.state.values(), resumed_optimizer.state.values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_draws_after_restoring_rng_equal_draws_after_saving(tmp_path):
    seed_everything(5)
    torch.rand(3), np.random.rand(), random.random(), np.random.randn()  # numpy caches a gaussian now
    save_resume_state(tmp_path, {"rng": rng_state()})
    after_save = (torch.rand(5), np.random.rand(5), np.random.randn(3), [random.random() for _ in range(5)])
    seed_everything(6)
    set_rng_state(load_resume_state(tmp_path)["rng"])
    after_restore = (torch.rand(5), np.random.rand(5), np.random.randn(3), [random.random() for _ in range(5)])
    assert torch.equal(after_save[0], after_restore[0])
    assert np.array_equal(after_save[1], after_restore[1]) and np.array_equal(after_save[2], after_restore[2])
    assert after_save[3] == after_restore[3]


def test_optimizer_state_round_trips_bit_for_bit_through_weights_only_load(tmp_path):
    """Both optimisers make_optimizer returns: torch's fused AdamW and bitsandbytes' PagedAdamW (on CPU
    tensors bitsandbytes falls back to unpaged buffers, which is enough to check its state dict)."""
    for name in ("adamw", "paged_adamw"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64, 32))
        optimizer = make_optimizer([p], lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), device="cpu", name=name)
        p.grad = torch.randn_like(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                       # bitsandbytes: "paged ... not supported on CPU"
            optimizer.step()
        saved = optimizer.state_dict()
        save_resume_state(tmp_path, {"optimizer": saved})
        loaded = load_resume_state(tmp_path)["optimizer"]

        def flat(d, prefix=""):
            items = d.items() if isinstance(d, dict) else enumerate(d)
            for k, v in items:
                if isinstance(v, (dict, list, tuple)):
                    yield from flat(v, f"{prefix}{k}.")
                else:
                    yield f"{prefix}{k}", v

        a, b = dict(flat(saved)), dict(flat(loaded))
        assert a.keys() == b.keys() and any(isinstance(v, torch.Tensor) for v in a.values())
        for k in a:
            assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k


# --- checkpoints: atomic ---------------------------------------------------------------------------

def test_a_crash_mid_write_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    save_resume_state(tmp_path, {"step": 1, "w": torch.arange(1000.0)})
    real_save = torch.save

    def write_half_then_crash(obj, f):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", write_half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_resume_state(tmp_path, {"step": 2, "w": torch.zeros(1000)})
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    ckpt = load_resume_state(tmp_path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.arange(1000.0))


def test_a_temp_file_left_by_a_killed_save_is_ignored_then_replaced(tmp_path):
    save_resume_state(tmp_path, {"step": 1})
    (tmp_path / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")   # what SIGKILL mid-write leaves
    assert load_resume_state(tmp_path) == {"step": 1}
    save_resume_state(tmp_path, {"step": 2})
    assert os.listdir(tmp_path) == ["checkpoint.pt"] and load_resume_state(tmp_path) == {"step": 2}


class NotWeights:
    pass


def test_loading_refuses_objects_and_names_the_file(tmp_path):
    assert load_resume_state(tmp_path / "empty") is None
    torch.save({"x": NotWeights()}, tmp_path / "checkpoint.pt")   # weights_only=True runs no pickled code
    with pytest.raises(ValueError, match=r"checkpoint\.pt: cannot load checkpoint"):
        load_resume_state(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"checkpoint\.pt: cannot load checkpoint"):
        load_resume_state(tmp_path)


# --- signals ---------------------------------------------------------------------------------------

TOY_LOOP = """
import sys, time, torch
sys.path.insert(0, {repo!r})
from training import GracefulExit, save_resume_state, rng_state
out, mode = sys.argv[1], sys.argv[2]
model = torch.nn.Linear(4, 4)
optimizer = torch.optim.AdamW(model.parameters())
with GracefulExit() as stop:
    for step in range(100_000):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step={{step}}", flush=True)
        time.sleep(0.01)
        if mode == "check" and stop.should_stop():
            save_resume_state(out, {{"model": model.state_dict(), "step": step + 1, "rng": rng_state()}})
            print("saved", flush=True)
            break
"""


def start_toy_loop(tmp_path, mode):
    script = tmp_path / "loop.py"
    script.write_text(TOY_LOOP.format(repo=REPO))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "out"), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("step=")                # the loop is running
    return proc


def test_sigterm_saves_a_checkpoint_after_the_step_and_exits_0(tmp_path):
    proc = start_toy_loop(tmp_path, "check")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.rstrip().endswith("saved") and "SIGTERM: stopping after this step" in err
    ckpt = load_resume_state(tmp_path / "out")
    assert 1 <= ckpt["step"] < 100_000 and set(ckpt) == {"model", "step", "rng"}


def test_a_second_signal_exits_at_once(tmp_path):
    proc = start_toy_loop(tmp_path, "ignore")                      # a loop that never checks the flag
    proc.send_signal(signal.SIGINT)
    assert "SIGINT: stopping" in proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT


def test_graceful_exit_sets_a_flag_in_process_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulExit() as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)                                          # python runs the handler between bytecodes
        assert stop.should_stop()
    assert signal.getsignal(signal.SIGTERM) is before


# --- metrics ---------------------------------------------------------------------------------------

def test_metrics_jsonl_lines_are_json_and_match_stdout(tmp_path, capsys):
    path = tmp_path / "run" / "metrics.jsonl"
    logger = MetricsLogger(path, enabled=True)
    logger.log(step=1, loss=torch.tensor(2.3456789), lr=2e-4, **{"rewards/chosen": -0.125, "eta": "0:00:12"})
    logger.log(step=2, loss=1.5, lr=1.999e-4, **{"rewards/chosen": 0.25, "eta": "0:00:06"})
    logger.close()
    MetricsLogger(path, enabled=True).log(step=3, loss=1.0)        # a resumed run appends
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == len(records) == 3
    for line, record in zip(lines, records):
        shown = dict(pair.split("=", 1) for pair in line.split())
        assert list(shown) == [k for k in record if k != "time"]
        for key, text in shown.items():
            value = record[key]
            if isinstance(value, float):
                assert text == f"{value:.6g}" and float(text) == pytest.approx(value, rel=1e-5)
            else:
                assert text == str(value)
    assert records[0]["loss"] == pytest.approx(2.3456789) and records[0]["rewards/chosen"] == -0.125


def test_metrics_logger_is_silent_off_the_main_rank(tmp_path, capsys):
    MetricsLogger(tmp_path / "metrics.jsonl", enabled=False).log(step=1, loss=1.0)
    assert capsys.readouterr().out == "" and not (tmp_path / "metrics.jsonl").exists()


def test_time_helpers(monkeypatch):
    assert [format_hms(s) for s in (0, 59.6, 3725, 90000)] == ["0:00:00", "0:01:00", "1:02:05", "25:00:00"]
    clock = iter([100.0, 104.0, 106.0])
    monkeypatch.setattr(training.time, "perf_counter", lambda: next(clock))
    progress = Progress(total_steps=10, start_step=2)             # t0 = 100
    first = progress.update(step=4, tokens=1000)                  # 4 s, 2 steps done → 2 s/step × 6 left
    second = progress.update(step=6, tokens=500)                  # 6 s, 4 steps → 1.5 s/step × 4 left
    monkeypatch.undo()
    assert first == {"tok/s": 250.0, "elapsed": "0:00:04", "eta": "0:00:12"}
    assert second == {"tok/s": 250.0, "elapsed": "0:00:06", "eta": "0:00:06"}


def test_peak_memory_on_cpu_is_the_process_high_water_mark():
    with open("/proc/self/status") as f:
        vm_hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    assert peak_memory_gb("cpu") == pytest.approx(vm_hwm_kib / 2**20, rel=0.05)


# --- seeding and the optimiser ---------------------------------------------------------------------

def test_seed_everything_repeats_every_stream():
    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()
    seed_everything(3)
    a = draws()
    seed_everything(3)
    assert draws() == a


@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_deterministic_mode_keeps_cpu_sdpa_working_and_repeatable(restore_determinism):
    def attention_grad():
        seed_everything(0, deterministic=True)
        q = torch.randn(2, 4, 16, 8, requires_grad=True)                       # [B, H, T, Dh]
        F.scaled_dot_product_attention(q, q, q, dropout_p=0.1, is_causal=True).sum().backward()
        return q.grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # no "nondeterministic op" warning either
        a, b = attention_grad(), attention_grad()
    assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.utils.deterministic.fill_uninitialized_memory is False      # no NaN-filling pass on CUDA
    assert torch.equal(a, b)


def test_make_optimizer_is_torchs_fused_adamw_on_every_device_and_paged_adamw_by_name():
    """The default, on CPU and CUDA alike, is torch's fused AdamW; "paged_adamw" is bitsandbytes' PagedAdamW
    (32-bit states, the QLoRA paper's), whose update equals torch's AdamW up to float rounding (checked here on
    CPU tensors, where bitsandbytes runs unpaged); another name is refused."""
    import bitsandbytes
    torch.manual_seed(0)
    p_cpu = torch.nn.Parameter(torch.randn(32, 16))
    p_bnb = torch.nn.Parameter(p_cpu.detach().clone())
    for device in ("cpu", torch.device("cuda")):
        adamw = make_optimizer([torch.nn.Parameter(torch.zeros(2))], 1e-2, 0.0, [0.9, 0.999], device=device)
        assert type(adamw) is torch.optim.AdamW and adamw.defaults["fused"]
    cpu = make_optimizer([p_cpu], lr=1e-2, weight_decay=0.1, betas=[0.8, 0.95], device="cpu")
    paged = make_optimizer([p_bnb], lr=1e-2, weight_decay=0.1, betas=[0.8, 0.95], device="cpu", name="paged_adamw")
    assert type(paged) is bitsandbytes.optim.PagedAdamW
    for group in (cpu.param_groups[0], paged.param_groups[0]):
        assert (group["lr"], group["weight_decay"], group["betas"]) == (1e-2, 0.1, (0.8, 0.95))
    assert paged.args.optim_bits == 32 and paged.is_paged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            g = torch.randn(32, 16)
            p_cpu.grad, p_bnb.grad = g.clone(), g.clone()
            cpu.step()
            paged.step()
    torch.testing.assert_close(p_bnb, p_cpu, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="optimizer is 'sgd', expected one of adamw, paged_adamw"):
        make_optimizer([p_cpu], 1e-2, 0.0, [0.9, 0.999], "cpu", name="sgd")


def test_cpu_optimizer_is_fused_equals_the_for_loop_adamw_and_repeats_bit_for_bit():
    """fused=True (one kernel per tensor) against torch's reference for-loop AdamW: the same update up to
    float rounding (1e-6 relative after 5 steps), and two runs from the same state agree exactly."""
    def run(fused):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*s)) for s in [(64, 32), (7,), (3, 5, 2)]]
        opt = (make_optimizer(params, lr=1e-2, weight_decay=0.1, betas=[0.9, 0.99], device="cpu") if fused else
               torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), foreach=False))
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return opt, [p.detach() for p in params]
    opt, fused = run(True)
    assert opt.param_groups[0]["fused"] is True
    _, again = run(True)
    _, loop = run(False)
    for a, b, c in zip(fused, again, loop):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)


# --- distributed ---------------------------------------------------------------------------------

DDP_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {repo!r})
from training import (GracefulExit, MetricsLogger, all_reduce_grads, all_reduce_mean, broadcast_params, cleanup,
                      is_main, rng_state, set_rng_state, setup_distributed)
rank, world_size, local_rank, device = setup_distributed("cpu")
x = torch.tensor([rank + 1.0, 10.0 * rank])
mean = all_reduce_mean(x)
params = [torch.nn.Parameter(torch.full((2, 3), rank + 1.0)), torch.nn.Parameter(torch.full((4,), 10.0 * rank + 1))]
broadcast_params(params)                         # rank 0's values everywhere
params[0].grad = torch.arange(6.0).view(2, 3) * (rank + 1)
if rank == 0:
    params[1].grad = torch.ones(4)               # rank 1's share had no gradient for it: it joins with zeros
all_reduce_grads(params)
torch.manual_seed(rank)                          # each rank its own streams
rng = rng_state()
expected = torch.rand(3)
torch.manual_seed(99)
set_rng_state(rng)
restored_own_stream = torch.equal(torch.rand(3), expected)
stop = GracefulExit(device)
stop.requested = rank == 1                       # the signal reached rank 1 only
result = {{"rank": rank, "world_size": world_size, "local_rank": local_rank, "device": str(device),
          "backend": torch.distributed.get_backend(), "is_main": is_main(), "mean": mean.tolist(),
          "x": x.tolist(), "stop": stop.should_stop(), "rng_ranks": len(rng),
          "rng_differ": not torch.equal(rng[0]["torch"], rng[1]["torch"]), "restored": restored_own_stream,
          "params": [p.tolist() for p in params], "grads": [p.grad.tolist() for p in params]}}
MetricsLogger(sys.argv[1] + "/metrics.jsonl").log(rank=rank)
with open(f"{{sys.argv[1]}}/rank{{rank}}.json", "w") as f:
    json.dump(result, f)
cleanup()
"""


def test_two_gloo_processes_average_broadcast_sum_gradients_agree_to_stop_and_keep_their_own_rng(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(repo=REPO))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, result in enumerate(results):
        assert (result["rank"], result["world_size"], result["local_rank"]) == (r, 2, r)
        assert result["device"] == "cpu" and result["backend"] == "gloo"
        assert result["mean"] == [1.5, 5.0]                         # ([1, 0] + [2, 10]) / 2
        assert result["x"] == [r + 1.0, 10.0 * r]                    # the input is left alone
        assert result["stop"] is True                                # rank 0 stops too
        assert result["is_main"] is (r == 0)
        assert result["rng_ranks"] == 2 and result["rng_differ"] and result["restored"]
        assert result["params"] == [[[1.0] * 3] * 2, [1.0] * 4]                # broadcast from rank 0
        assert result["grads"] == [[[0.0, 3.0, 6.0], [9.0, 12.0, 15.0]], [1.0] * 4]   # summed, in one buffer
    assert [json.loads(line)["rank"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0]


def test_set_checkpointing_sets_the_model_and_names_the_field_when_out_of_range():
    from dataclasses import replace

    from model.config import PRESETS
    from model.llama import Llama
    from training import set_checkpointing
    model = Llama(replace(PRESETS["tiny"], num_hidden_layers=3, hidden_size=16, num_attention_heads=2,
                          num_key_value_heads=2, intermediate_size=32, vocab_size=20))
    set_checkpointing(model, True, 2)
    assert model.gradient_checkpointing and model.checkpoint_blocks == 2
    set_checkpointing(model, False)
    assert not model.gradient_checkpointing and model.checkpoint_blocks is None
    with pytest.raises(ValueError, match=r"checkpoint_blocks is 4, expected 0\.\.3"):
        set_checkpointing(model, True, 4)


@pytest.mark.parametrize("script, cls", [("train_sft", "SFTConfig"), ("train_dpo", "DPOConfig")])
def test_checkpoint_blocks_is_a_config_field_checked_at_load(script, cls):
    import importlib

    from config import load_config
    config_cls = getattr(importlib.import_module(script), cls)
    path = os.path.join(REPO, "configs", "tiny.toml" if script == "train_sft" else "dpo-tiny.toml")
    assert load_config(config_cls, ["--config", path, "--checkpoint_blocks", "3"]).checkpoint_blocks == 3
    assert load_config(config_cls, ["--config", path]).checkpoint_blocks is None
    with pytest.raises(SystemExit, match="command line: key 'checkpoint_blocks' is -1, expected an integer ≥ 0"):
        load_config(config_cls, ["--config", path, "--checkpoint_blocks", "-1"])
