"""Devices a run asks for, checked before anything loads: a missing CUDA, a device index past the machine's,
and NF4 on CUDA without a usable bitsandbytes (one line, then the torch dequantisation)."""
import subprocess
import sys

import pytest
import torch

import training
from lora import nf4
from tests.micro_model import ENV, REPO


def test_cpu_and_the_default_resolve_without_cuda():
    assert training.resolve_device("cpu") == torch.device("cpu")
    assert training.resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_cuda_without_cuda_is_one_line_naming_the_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"^--device is 'cuda' but this torch has no usable CUDA device .*; use cpu"):
        training.resolve_device("cuda", "--device")


def test_a_cuda_index_past_the_machines_devices_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert training.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(SystemExit, match=r"^device is 'cuda:3' but this machine has 2 CUDA device\(s\): cuda:0 … cuda:1$"):
        training.resolve_device("cuda:3")
    with pytest.raises(SystemExit, match=r"^device is 'gpu0': expected cpu, cuda or cuda:N$"):
        training.resolve_device("gpu0")
    with pytest.raises(SystemExit, match=r"^device is 'mps': bezoar runs on cpu or cuda$"):
        training.resolve_device("mps")


@pytest.mark.parametrize("script, args", [
    (["train_sft.py"], ["--config", "configs/tiny.toml"]),
    (["train_dpo.py"], ["--config", "configs/dpo-tiny.toml"]),
    (["-m", "toy.base"], []),
])
def test_the_scripts_refuse_a_missing_cuda_before_loading_anything(script, args, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, *script, *args, "--device", "cuda", "--out_dir", str(out)], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]                 # one line, no traceback
    assert "device is 'cuda' but this torch has no usable CUDA device" in done.stderr
    assert not out.exists()                                                         # nothing was started


def test_bitsandbytes_check_passes_where_its_dequantisation_is_ours():
    """The check itself, on the CPU (its CUDA half is bench/gpu_check.py's): bitsandbytes' dequantize_4bit of
    the check's weight equals NF4Tensor.dequantize."""
    assert nf4._check_bitsandbytes_cuda(torch.device("cpu")) is None
    assert nf4.bitsandbytes_cuda_problem("cpu") == "cpu is not a CUDA device"


def test_bitsandbytes_check_says_why_when_it_is_missing_fails_or_disagrees(monkeypatch):
    import bitsandbytes.functional as bnbF
    cpu = torch.device("cpu")
    real = bnbF.dequantize_4bit
    monkeypatch.setattr(bnbF, "dequantize_4bit", lambda *a, **k: real(*a, **k) * 1.5)
    assert "dequantize_4bit differs from bezoar's NF4 (max |Δ|" in nf4._check_bitsandbytes_cuda(cpu)

    def no_binary(*a, **k):
        raise RuntimeError("no kernel image is available for execution on the device")
    monkeypatch.setattr(bnbF, "dequantize_4bit", no_binary)
    assert "cannot dequantise on cpu (RuntimeError: no kernel image" in nf4._check_bitsandbytes_cuda(cpu)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert nf4._check_bitsandbytes_cuda(cpu).startswith("bitsandbytes cannot be imported (ModuleNotFoundError")


def test_nf4_on_cuda_without_bitsandbytes_is_one_line_of_notice_and_the_torch_path(monkeypatch):
    monkeypatch.setitem(nf4._bitsandbytes_cuda, "cuda:0", "bitsandbytes cannot be imported (ImportError: …)")
    line = training.nf4_notice("nf4", torch.device("cuda", 0))
    assert line.startswith('quantize = "nf4" on cuda:0: bitsandbytes cannot be imported') and "\n" not in line
    assert "torch code instead" in line
    assert training.nf4_notice("none", torch.device("cuda", 0)) is None
    assert training.nf4_notice("nf4", torch.device("cpu")) is None
    monkeypatch.setitem(nf4._bitsandbytes_cuda, "cuda:0", None)
    assert training.nf4_notice("nf4", torch.device("cuda", 0)) is None


def test_compile_applies_on_cuda_only_and_says_so_elsewhere(capsys):
    from dataclasses import replace

    from model.config import PRESETS
    from model.llama import Llama
    model = Llama(replace(PRESETS["tiny"], num_hidden_layers=2))
    forward = [b.forward for b in model.model.layers]
    training.compile_blocks(model, False)
    assert capsys.readouterr().out == ""
    training.compile_blocks(model, True)
    assert capsys.readouterr().out == "compile = true applies on CUDA only; the model is on cpu: running it eagerly\n"
    assert [b.forward for b in model.model.layers] == forward and all(b._compiled_call_impl is None
                                                                      for b in model.model.layers)


def test_a_decoding_row_goes_through_bitsandbytes_4bit_matvec_where_it_is_usable(monkeypatch):
    """Where bitsandbytes' kernels are in use (CUDA, after the check), one row without gradients takes its
    matmul_4bit (the 4-bit matrix-vector kernel); its product equals dequantising W first. Run here with the
    check's answer for the CPU forced to yes, since bitsandbytes' CPU backend has the same function."""
    import bitsandbytes

    from lora import Linear4bit, layers
    torch.manual_seed(0)
    layer = Linear4bit(torch.randn(96, 320), compute_dtype=torch.bfloat16)
    x = torch.randn(1, 1, 320)
    want = (x.bfloat16().view(1, 320) @ layer.dequantized_weight().t()).float().view(1, 1, 96)
    calls = []
    real = bitsandbytes.matmul_4bit
    monkeypatch.setattr(bitsandbytes, "matmul_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(layers, "on_bitsandbytes", lambda q: True)
    with torch.no_grad():
        got = layer(x)
        assert calls == [1] and torch.equal(got, want)
        layer(torch.randn(2, 320))                                   # two rows: dequantise, F.linear
    assert calls == [1]
