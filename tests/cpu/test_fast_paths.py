"""The CPU's "lora" and "nf4" paths equal the plain code of lora/layers.py: cpu.lora_linear (one LoRAFunction node,
its own dropout mask) against LoRALinear's plain composition, the formula with that mask, and gradcheck; the
4-bit product in tiles of W, or with a small W kept from forward, against the whole dequantised W; activation
checkpointing (whole or partial) against none, dropout masks replayed, on either path. Tolerances are stated
where exactness does not exist."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import cpu
from cpu import dropout, nf4 as cpu_nf4
from kernel_checks import needs_kernels
from losses import sft_loss_chunked
from lora import apply_lora
from lora.layers import Linear4bit, LoRALinear
from lora.nf4 import quantize_nf4
from model.config import PRESETS
from model.llama import Llama


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


def lora_path(layer):
    """x ↦ cpu.lora_linear for this layer's weights and dropout, called directly (any dtype, either switch)."""
    return lambda x: cpu.lora_linear(x, layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight,
                                     layer.scaling, layer.dropout_p)


def plain(layer, monkeypatch):
    """x ↦ layer(x) with every CPU path off: the plain code CUDA runs."""
    def f(x):
        with monkeypatch.context() as m:
            m.setenv("BEZOAR_C_KERNELS", "0")
            return layer(x)
    return f


# --- the "lora" path (cpu/lora.py) against the plain composition ---

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base_kind", ["dense", "nf4"])
def test_the_lora_path_forward_and_gradients_equal_the_plain_composition(base_kind, dtype, monkeypatch):
    """No dropout: the same products in another order. fp32: 1e-5; bf16: each side rounds its own
    intermediates (∂x here sums two bf16 products), so 2e-2 relative to the values' scale."""
    W = rand(40, 128, scale=0.05)
    base = dense(W.to(dtype)) if base_kind == "dense" else Linear4bit(W, compute_dtype=dtype)
    layer = adapted(base)
    x, g = rand(3, 7, 128, seed=3, dtype=dtype), rand(3, 7, 40, seed=4, dtype=dtype)
    fast = grads(layer, x, g, lora_path(layer))
    ref = grads(layer, x, g, plain(layer, monkeypatch))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(fast, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("base_kind", ["dense", "nf4"])
def test_the_lora_path_with_dropout_equals_the_formula_with_the_same_mask(base_kind):
    """y = x Wᵀ + ((m ⊙ x) / (1 − p')) Aᵀ Bᵀ · s with cpu/dropout.py's mask for the seed the path draws;
    autograd through that formula gives the same ∂x, ∂A, ∂B (fp64, so 1e-12: only the order differs)."""
    f64 = torch.float64
    W = rand(24, 64, scale=0.05, dtype=f64)
    base = dense(W) if base_kind == "dense" else Linear4bit(W.float(), compute_dtype=f64)
    W_used = W if base_kind == "dense" else base.dequantized_weight()
    layer = adapted(base, dropout=0.3, lora_dtype=f64)
    x, g = rand(5, 64, seed=5, dtype=f64), rand(5, 24, seed=6, dtype=f64)
    torch.manual_seed(7)
    fast = grads(layer, x, g, lora_path(layer))
    torch.manual_seed(7)
    m, keep = dropout.keep_mask(x.shape, dropout.draw_seed(), 0.3).to(f64), dropout.keep_probability(0.3)
    assert keep == 1 - round(0.3 * 65536) / 65536
    assert 0 < m.sum() < m.numel()                                      # some kept, some dropped

    def formula(x):
        A, B = layer.lora_A.weight, layer.lora_B.weight
        return x @ W_used.t() + ((x * m / keep) @ A.t()) @ B.t() * layer.scaling

    for a, b in zip(fast, grads(layer, x, g, formula)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_lora_path_gradcheck_in_float64_with_dropout_on():
    """The hand-written backward against finite differences; the mask is re-drawn from the same seed on
    every call, so the function is deterministic."""
    base = Linear4bit(rand(12, 64, scale=0.1), compute_dtype=torch.float64)
    layer = adapted(base, r=3, alpha=6, dropout=0.25, lora_dtype=torch.float64)
    x = rand(4, 64, seed=8, dtype=torch.float64).requires_grad_()
    A = layer.lora_A.weight.detach().clone().requires_grad_()
    B = layer.lora_B.weight.detach().clone().requires_grad_()

    def f(x, A, B):
        torch.manual_seed(9)
        return cpu.lora_linear(x, base.weight, A, B, layer.scaling, 0.25)

    assert torch.autograd.gradcheck(f, (x, A, B))


@needs_kernels
def test_lora_linear_in_training_takes_the_lora_path_with_the_mask_of_the_seed_it_draws():
    """The call site: in training, y - base(x) = (m ⊙ x / (1 - p')) Aᵀ Bᵀ · s with the mask m of cpu/dropout.py
    for the seed the path draws (p = 0.5 is a multiple of 2⁻¹⁶, so p' = p); in eval mode no dropout."""
    base = dense(rand(20, 32, scale=0.1))
    layer = adapted(base, r=4, alpha=4, dropout=0.5)
    x = rand(6, 32, seed=8)
    assert cpu.enabled("lora", x)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    m, keep = dropout.keep_mask(x.shape, dropout.draw_seed(), 0.5).to(x.dtype), dropout.keep_probability(0.5)
    assert keep == 0.5 and set(m.unique().tolist()) == {0.0, 1.0}
    A, B = layer.lora_A.weight, layer.lora_B.weight
    torch.testing.assert_close(y, base(x) + ((x * m / keep) @ A.t()) @ B.t())
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + (x @ A.t()) @ B.t())


# --- the "nf4" path (cpu/nf4.py): tiles of W, or the dequantised W kept from forward ---

@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_nf4_path_gives_the_product_with_the_whole_dequantised_weight(dtype, monkeypatch):
    """The tiles (a few rows forward, a few block columns backward) give F.linear's answer with the whole
    dequantised W (KEEP_MAX_BYTES = 0, so this small W is tiled, not kept); rows that straddle blocks
    (K = 96) take W whole. fp32: only the matmul's blocking differs; bf16: one rounding of each output."""
    monkeypatch.setattr(cpu_nf4, "KEEP_MAX_BYTES", 0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for (N, K), tiles in [((200, 256), (1 << 20, 5000)), ((24, 96), (1 << 20,))]:
        W = rand(N, K, scale=0.05)
        layer = Linear4bit(W, compute_dtype=dtype)
        Wq = quantize_nf4(W).dequantize(dtype)
        x = rand(3, 9, K, seed=9, dtype=dtype).requires_grad_()
        g = rand(3, 9, N, seed=10, dtype=dtype)
        x_ref = x.detach().clone().requires_grad_()
        y_ref = F.linear(x_ref, Wq)
        y_ref.backward(g)
        assert cpu.enabled("nf4", x)
        for tile in tiles:      # one tile; several row tiles forward, 2-block column tiles backward
            monkeypatch.setattr(cpu_nf4, "TILE", tile)
            x.grad = None
            y = layer(x)
            y.backward(g)
            assert y.dtype == dtype
            torch.testing.assert_close(y, y_ref, **tol)
            torch.testing.assert_close(x.grad, x_ref.grad, **tol)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keeping_the_dequantised_weight_gives_the_gradients_of_dequantising_again(dtype, monkeypatch):
    """Bare Linear4bit and LoRALinear(Linear4bit): keep (whole W, one matmul) against recompute (tiles of
    W, TILE small enough for several). Each output element is one dot product either way, so only the
    matmul's blocking differs: fp32 1e-5; bf16 one rounding of each output, 1e-2."""
    W = rand(200, 256, scale=0.05)
    x, g = rand(2, 9, 256, seed=10, dtype=dtype), rand(2, 9, 200, seed=11, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    monkeypatch.setattr(cpu_nf4, "TILE", 5000)
    results = {}
    for keep_max in (0, 1 << 30):
        monkeypatch.setattr(cpu_nf4, "KEEP_MAX_BYTES", keep_max)
        bare = Linear4bit(W, compute_dtype=dtype)
        assert cpu_nf4.keeps_dequantized(bare.weight, dtype) == bool(keep_max)
        xb = x.clone().requires_grad_()
        yb = bare(xb)
        yb.backward(g)
        layer = adapted(Linear4bit(W, compute_dtype=dtype))
        results[keep_max] = (yb, xb.grad) + grads(layer, x, g, layer)
    for a, b in zip(results[0], results[1 << 30]):
        torch.testing.assert_close(a, b, **tol)


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
    """Recomputation restores the RNG state, so the same masks are drawn (nn.Dropout's on the plain path, the
    counter-based mask's seed on the "lora" path): the gradients equal those of the run that stores every
    activation, bit for bit (the same operations in the same order)."""
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
