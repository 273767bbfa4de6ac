"""The fast paths equal their readable references: LoRALinear.forward (one LoRAFunction node, its own
dropout mask) against forward_reference and the formula; NF4 weights kept from forward against dequantised
again in backward; the frozen-lm_head loss against the plain loss; activation checkpointing (whole or
partial) against none, dropout masks replayed. Tolerances are stated where exactness does not exist."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import lora.layers
from losses import IGNORE_INDEX, sequence_logps, sequence_logps_chunked, sft_loss, sft_loss_chunked
from lora import apply_lora, dropout
from lora.layers import Linear4bit, LoRALinear
from model.config import PRESETS
from model import block_cpu
from model.llama import Llama, RMSNorm
from kernel_checks import needs_kernels
from test_losses import random_batch


def rand(*shape, seed=0, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def adapted(base, r=4, alpha=8, dropout=0.0, lora_dtype=torch.float32, seed=1):
    layer = LoRALinear(base, r=r, alpha=alpha, dropout=dropout, lora_dtype=lora_dtype)
    with torch.no_grad():
        layer.lora_A.weight.copy_(rand(*layer.lora_A.weight.shape, seed=seed, scale=0.1))
        layer.lora_B.weight.copy_(rand(*layer.lora_B.weight.shape, seed=seed + 1, scale=0.1))
    return layer.train()


def dense(W):
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
    return lin


def grads(layer, x, g, fn):
    """(y, ∂x, ∂A, ∂B) of fn(x) · g."""
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y = fn(x)
    y.backward(g)
    return y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad


# --- LoRALinear.forward (LoRAFunction) against the readable composition ---

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base_kind", ["dense", "nf4"])
def test_fused_lora_forward_and_gradients_equal_the_reference_composition(base_kind, dtype):
    """No dropout: the same products in another order. fp32: 1e-5; bf16: each side rounds its own
    intermediates (∂x here sums two bf16 products), so 2e-2 relative to the values' scale."""
    W = rand(40, 128, scale=0.05)
    base = dense(W.to(dtype)) if base_kind == "dense" else Linear4bit(W, compute_dtype=dtype)
    layer = adapted(base)
    x, g = rand(3, 7, 128, seed=3, dtype=dtype), rand(3, 7, 40, seed=4, dtype=dtype)
    fast = grads(layer, x, g, layer)
    ref = grads(layer, x, g, layer.forward_reference)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(fast, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("base_kind", ["dense", "nf4"])
def test_fused_lora_with_dropout_equals_the_formula_with_the_same_mask(base_kind):
    """y = x Wᵀ + ((m ⊙ x) / (1 − p')) Aᵀ Bᵀ · s with lora/dropout.py's mask for the seed forward draws;
    autograd through that formula gives the same ∂x, ∂A, ∂B (fp64, so 1e-12: only the order differs)."""
    f64 = torch.float64
    W = rand(24, 64, scale=0.05, dtype=f64)
    base = dense(W) if base_kind == "dense" else Linear4bit(W.float(), compute_dtype=f64)
    W_used = W if base_kind == "dense" else base.dequantized_weight()
    layer = adapted(base, dropout=0.3, lora_dtype=f64)
    x, g = rand(5, 64, seed=5, dtype=f64), rand(5, 24, seed=6, dtype=f64)
    torch.manual_seed(7)
    fast = grads(layer, x, g, layer)
    torch.manual_seed(7)
    m, keep = dropout.keep_mask(x.shape, dropout.draw_seed(), 0.3).to(f64), dropout.keep_probability(0.3)
    assert keep == 1 - round(0.3 * 65536) / 65536
    assert 0 < m.sum() < m.numel()                                      # some kept, some dropped

    def formula(x):
        A, B = layer.lora_A.weight, layer.lora_B.weight
        return x @ W_used.t() + ((x * m / keep) @ A.t()) @ B.t() * layer.scaling

    for a, b in zip(fast, grads(layer, x, g, formula)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fused_lora_gradcheck_in_float64_with_dropout_on():
    """The hand-written backward against finite differences; the mask is re-drawn from the same seed on
    every call, so the function is deterministic."""
    base = Linear4bit(rand(12, 64, scale=0.1), compute_dtype=torch.float64)
    layer = adapted(base, r=3, alpha=6, dropout=0.25, lora_dtype=torch.float64)
    x = rand(4, 64, seed=8, dtype=torch.float64).requires_grad_()
    A = layer.lora_A.weight.detach().clone().requires_grad_()
    B = layer.lora_B.weight.detach().clone().requires_grad_()

    def f(x, A, B):
        torch.manual_seed(9)
        return torch.func.functional_call(layer, {"lora_A.weight": A, "lora_B.weight": B}, (x,))

    assert torch.autograd.gradcheck(f, (x, A, B))


# --- NF4: the dequantised W kept from forward, or dequantised again in backward ---

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keeping_the_dequantised_weight_gives_the_gradients_of_dequantising_again(dtype, monkeypatch):
    """Bare Linear4bit and LoRALinear(Linear4bit): keep (whole W, one matmul) against recompute (tiles of
    W, TILE small enough for several). Each output element is one dot product either way, so only the
    matmul's blocking differs: fp32 1e-5; bf16 one rounding of each output, 1e-2."""
    W = rand(200, 256, scale=0.05)
    x, g = rand(2, 9, 256, seed=10, dtype=dtype), rand(2, 9, 200, seed=11, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    monkeypatch.setattr(lora.layers, "TILE", 5000)
    results = {}
    for keep_max in (0, 1 << 30):
        monkeypatch.setattr(lora.layers, "KEEP_MAX_BYTES", keep_max)
        bare = Linear4bit(W, compute_dtype=dtype)
        assert lora.layers.keeps_dequantized(bare.weight, dtype) == bool(keep_max)
        xb = x.clone().requires_grad_()
        yb = bare(xb)
        yb.backward(g)
        layer = adapted(Linear4bit(W, compute_dtype=dtype))
        results[keep_max] = (yb, xb.grad) + grads(layer, x, g, layer)
    for a, b in zip(results[0], results[1 << 30]):
        torch.testing.assert_close(a, b, **tol)


# --- the loss through a frozen lm_head ---


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 256])
def test_frozen_head_loss_and_its_gradient_equal_the_plain_loss(chunk_size):
    """lm_head weight without requires_grad: ∂h is made in forward. fp64, 1e-12."""
    hidden, weight, labels = random_batch()
    for plain_fn, chunked_fn in [(sft_loss, sft_loss_chunked), (sequence_logps, sequence_logps_chunked)]:
        h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
        plain = plain_fn(F.linear(h1, weight), labels)
        fast = chunked_fn(h2, weight, labels, chunk_size=chunk_size)
        assert fast.shape == plain.shape and fast.dtype == torch.float64
        torch.testing.assert_close(fast, plain, rtol=0, atol=1e-12)
        cotangent = torch.arange(1.0, plain.numel() + 1, dtype=plain.dtype).reshape(plain.shape)
        (plain * cotangent).sum().backward()
        (fast * cotangent).sum().backward()
        torch.testing.assert_close(h2.grad, h1.grad, rtol=0, atol=1e-12)


def test_frozen_head_loss_gradcheck_in_float64():
    hidden, weight, labels = random_batch(B=2, T=5, V=4, D=3)
    assert torch.autograd.gradcheck(lambda h: sequence_logps_chunked(h, weight, labels, chunk_size=2),
                                    (hidden.requires_grad_(),))


def test_frozen_head_loss_is_exact_where_the_target_probability_underflows():
    """A target 200 nats below the rest: softmax gives p = 0 in fp32, log p = −inf; the fallback returns
    z[y] − logsumexp(z), equal to the fp64 plain value to fp32 rounding."""
    hidden, weight, labels = random_batch(B=1, T=4, V=5, D=5, dtype=torch.float32)
    labels[0] = torch.tensor([IGNORE_INDEX, 2, 3, 1])
    hidden[0, 0] = 0
    hidden[0, 0, 2] = -200.0                                    # z = h Wᵀ with W = I: target 2 at −200
    weight = torch.eye(5)
    fast = sequence_logps_chunked(hidden.requires_grad_(), weight, labels)
    plain = sequence_logps(F.linear(hidden.double(), weight.double()), labels)
    assert torch.isfinite(fast).all() and fast.item() < -199
    torch.testing.assert_close(fast.double(), plain, rtol=1e-6, atol=0)


def test_frozen_head_loss_in_bf16_is_close_to_the_plain_loss_and_fp32():
    hidden, weight, labels = random_batch(dtype=torch.float32)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    plain = sequence_logps(F.linear(h1, weight), labels)
    fast = sequence_logps_chunked(h2, weight, labels, chunk_size=3)
    assert fast.dtype == torch.float32 and h2.dtype == torch.bfloat16
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)   # same bf16 logits, fp32 softmax
    plain.sum().backward()
    fast.sum().backward()
    assert h2.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h2.grad.float(), h1.grad.float(), rtol=2e-2, atol=2e-2)


# --- RMSNorm's hand-written backward ---

@pytest.mark.parametrize("path", ["torch", pytest.param("kernel", marks=needs_kernels)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_function_equals_the_composition_and_its_autograd(dtype, path, monkeypatch):
    """Forward: the torch path does the same operations, so the same bits; the C kernel (model/block_cpu.py)
    sums the squares in another order: fp32 1e-6 relative, bf16 at most one rounding apart. Gradients (∂x,
    and ∂w for a trained norm): another grouping of the same sums; fp32 1e-5 relative; bf16: autograd rounds
    ∂y ⊙ w and each product to bf16 on its own path, so one bf16 rounding of the values' scale, 2e-2."""
    if path == "torch":
        monkeypatch.setattr(block_cpu, "usable", lambda *a: False)
    else:
        assert block_cpu.usable(torch.empty(1, dtype=dtype)), block_cpu.KERNEL.status
    norm = RMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(rand(48, seed=1, dtype=dtype) + 1)
    x, g = rand(3, 5, 48, seed=2, dtype=dtype, scale=3), rand(3, 5, 48, seed=3, dtype=dtype)
    out = {}
    for fn in (norm, norm.forward_reference):
        xi = x.clone().requires_grad_()
        norm.weight.grad = None
        y = fn(xi)
        y.backward(g)
        out[fn] = (y.detach(), xi.grad, norm.weight.grad)
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = out[norm], out[norm.forward_reference]
    if path == "torch":
        assert torch.equal(y, y_ref)
    else:
        torch.testing.assert_close(y, y_ref, rtol=1e-6 if dtype == torch.float32 else 2 ** -7, atol=0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in ((dx, dx_ref), (dw, dw_ref)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


def test_rmsnorm_function_gradcheck():
    """Against finite differences. RMSNorm computes in fp32 even for fp64 inputs (as transformers does),
    so the differences are taken with eps 1e-3 and compared at 1e-3 (fp32 rounding / eps ≈ 1e-4)."""
    norm = RMSNorm(6, eps=1e-3).double()
    with torch.no_grad():
        norm.weight.copy_(rand(6, seed=4, dtype=torch.float64))
    x = rand(2, 3, 6, seed=5, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)),
                                    (x, norm.weight.detach().clone().requires_grad_()), eps=1e-3, atol=1e-3, rtol=1e-3)


# --- activation checkpointing with NF4 + LoRA ---

def qlora_model(seed=0):
    config = replace(PRESETS["tiny"], vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=4)
    model = Llama(config)
    model.init_weights(seed=seed, std=0.1)
    for block in model.model.layers:
        for owner in (block.self_attn, block.mlp):
            for name, child in list(owner.named_children()):
                setattr(owner, name, Linear4bit(child.weight.detach()))
    torch.manual_seed(seed)
    apply_lora(model, r=4, alpha=8, dropout=0.1, targets="all-linear")
    for name, p in model.named_parameters():
        if name.endswith("lora_B.weight"):
            with torch.no_grad():
                p.normal_(0, 0.05)                       # B ≠ 0, so dropout reaches the outputs
    return model.train()


def test_checkpointing_all_or_some_blocks_replays_the_dropout_masks_and_gives_the_same_gradients():
    """Recomputation restores the RNG state, so the same masks are drawn: the gradients equal those of the
    run that stores every activation, bit for bit (the same operations in the same order)."""
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    results = []
    for checkpointing, blocks in [(False, None), (True, None), (True, 1)]:
        model = qlora_model()
        model.gradient_checkpointing, model.checkpoint_blocks = checkpointing, blocks
        torch.manual_seed(2)
        loss = sft_loss_chunked(model.hidden_states(ids), model.lm_head.weight, ids, chunk_size=5)
        loss.backward()
        results.append([p.grad for p in model.parameters() if p.requires_grad])
    assert len(results[0]) == 2 * 7 * 3
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    torch.manual_seed(3)                                 # another seed: other masks, other gradients
    model = qlora_model()
    sft_loss_chunked(model.hidden_states(ids), model.lm_head.weight, ids, chunk_size=5).backward()
    assert not torch.equal(next(p.grad for p in model.parameters() if p.requires_grad), results[0][0])
