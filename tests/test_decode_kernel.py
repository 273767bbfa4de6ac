"""Batch-1 decoding's bf16 product (model/decode_kernel.c via model/decode_cpu.py, used by model/llama.py's
Linear): against the sum in fp64 and torch's F.linear, the routing, threads and the portable build."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import c_build
from kernel_checks import at_thread_counts, needs_kernels, portable_build
from model import decode_cpu, llama
from model.config import PRESETS

pytestmark = needs_kernels


def rand(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.bfloat16)


def sum_bound(x, W):
    """|y − Σ w x| allowed per output: one bf16 rounding of the exact sum, plus fp32 summation over K terms
    (K · 2⁻²⁴ · Σ|w x|, the textbook bound, far above what either order reaches)."""
    exact = x.double() @ W.double().t()
    K = x.shape[-1]
    return exact, 2 ** -8 * exact.abs() + K * 2 ** -24 * (x.double().abs() @ W.double().abs().t())


@pytest.mark.parametrize("N, K", [(64, 512), (37, 45), (300, 16), (5, 7), (1, 1)])
def test_linear_row_is_the_fp32_sum_rounded_once(N, K):
    """Whole blocks of rows and a partial one (N mod 16), whole 16-lane vectors and a scalar tail (K mod 16)."""
    x, W = rand(1, K, seed=N, scale=3), rand(N, K, seed=K)
    y = decode_cpu.linear_row(x, W)
    assert y.shape == (1, N) and y.dtype == torch.bfloat16
    exact, bound = sum_bound(x, W)
    assert ((y.double() - exact).abs() <= bound).all()
    assert ((F.linear(x, W).double() - exact).abs() <= bound).all()          # the same bound holds for torch


def test_linear_row_keeps_leading_dims_and_takes_non_contiguous_weights():
    x, W = rand(1, 1, 40, seed=1), rand(40, 24, seed=2).t()                  # W [24, 40] as a transposed view
    y = decode_cpu.linear_row(x, W)
    assert y.shape == (1, 1, 24)
    exact, bound = sum_bound(x.reshape(1, 40), W)
    assert ((y.reshape(1, 24).double() - exact).abs() <= bound).all()


def test_usable_only_for_one_bf16_row_without_gradients():
    W = rand(8, 16)
    assert decode_cpu.usable(rand(1, 16), W) and decode_cpu.usable(rand(1, 1, 16), W)
    assert not decode_cpu.usable(rand(2, 16), W)                             # two rows: torch's product
    assert not decode_cpu.usable(rand(1, 16).float(), W.float())             # fp32
    assert not decode_cpu.usable(rand(1, 16).requires_grad_(), W)            # a gradient to track
    with torch.no_grad():
        assert decode_cpu.usable(rand(1, 16).requires_grad_(), W)
    assert not decode_cpu.usable(rand(1, 8), W)                              # wrong width: nn.Linear's error


def test_the_model_decodes_through_the_kernel_and_its_logits_match_torch(monkeypatch):
    """A bf16 Llama, one cached decoding step: every projection and lm_head go through the kernel (8 per
    block, 1 head), and the logits equal those through nn.Linear within bf16 noise (2e-2 of their scale);
    the prefill (several rows) does not use it."""
    config = replace(PRESETS["tiny"], vocab_size=50, num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                     num_key_value_heads=4, intermediate_size=48)
    model = llama.Llama(config)
    model.init_weights(seed=0, std=0.2)
    model = model.to(torch.bfloat16).eval()
    calls = []
    row = decode_cpu.linear_row
    monkeypatch.setattr(decode_cpu, "linear_row", lambda *a: calls.append(1) or row(*a))
    ids = torch.tensor([[1, 7, 9, 4, 11]])
    logits = []
    for path in ("kernel", "torch"):
        with monkeypatch.context() as m, torch.no_grad():
            if path == "torch":
                m.setattr(decode_cpu, "usable", lambda *a: False)
            cache = model.new_cache(1, 8)
            model(ids[:, :4], cache=cache)
            n_prefill = len(calls)
            logits.append(model(ids[:, 4:], cache=cache)[0, -1].float())
            if path == "kernel":
                assert n_prefill == 0 and len(calls) == 7 * config.num_hidden_layers + 1
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=2e-2 * logits[1].abs().max().item())


def test_a_merged_dense_layer_keeps_the_models_linear_class():
    from lora.layers import LoRALinear
    lora = LoRALinear(llama.Linear(16, 8, bias=False), r=2, alpha=2)
    assert type(lora.merged_linear()) is llama.Linear


def test_threads_and_the_portable_loop_agree(monkeypatch, tmp_path):
    monkeypatch.setattr(c_build, "MIN_PARALLEL", 1)
    x, W = rand(1, 53, seed=3), rand(70, 53, seed=4)
    one, three = at_thread_counts(lambda: decode_cpu.linear_row(x, W))
    assert torch.equal(one, three)                                            # rows are split, not sums
    with portable_build(decode_cpu.KERNEL, monkeypatch, tmp_path):
        portable = decode_cpu.linear_row(x, W)
    exact, bound = sum_bound(x, W)
    assert ((portable.double() - exact).abs() <= bound).all()
