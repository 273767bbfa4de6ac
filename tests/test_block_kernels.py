"""The C kernels of a LLaMA block (model/block_kernel.c via model/block_cpu.py): RMSNorm forward and ∂x, rotary
embeddings forward and ∂x, SwiGLU, and causal attention's softmax backward (with CausalAttentionFunction),
against the torch code of model/llama.py, SDPA's backward and the formulas in fp64."""
import pytest
import torch

import c_build
from kernel_checks import at_thread_counts, needs_kernels, portable_build
from model import block_cpu
from model.llama import RMSNorm, RotaryFunction, apply_rotary, rotary_cos_sin

pytestmark = needs_kernels


def rand(*shape, seed=0, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def torch_path(monkeypatch):
    monkeypatch.setattr(block_cpu, "usable", lambda *a: False)


def test_the_kernels_build_here():
    assert block_cpu.KERNEL.lib is not None, block_cpu.KERNEL.status
    assert block_cpu.usable(torch.empty(1), torch.empty(1)) and block_cpu.usable(torch.empty(1, dtype=torch.bfloat16))
    assert not block_cpu.usable(torch.empty(1), torch.empty(1, dtype=torch.bfloat16))
    assert not block_cpu.usable(torch.empty(1, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [48, 512, 37])
def test_rmsnorm_forward_is_the_formula_rounded_where_the_torch_code_rounds(dtype, D):
    """y = round(w · round(x r)), r = 1/sqrt(mean(x²) + eps): against r from fp64 sums; r within 1e-6
    relative (fp32 sums), each y within one rounding of the formula with the exact r."""
    x, w = rand(6, 7, D, seed=D, dtype=dtype, scale=3), rand(D, seed=1, dtype=dtype) + 1
    y, r = block_cpu.rmsnorm_forward(x, w, 1e-6)
    r64 = 1 / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(r.double(), r64, rtol=1e-6, atol=0)
    want = w.double() * (x.double() * r64).to(dtype).double()
    torch.testing.assert_close(y.double(), want, rtol=1e-6 if dtype == torch.float32 else 2 ** -7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_backward_kernel_equals_the_torch_backward_of_a_frozen_norm(dtype, monkeypatch):
    """∂x with the weight frozen (the training case): kernel against RMSNormFunction's torch code, the same
    formula with sums in another order: fp32 1e-5, bf16 one rounding (2e-2 of the values' scale)."""
    norm = RMSNorm(512, eps=1e-6).to(dtype).requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(rand(512, seed=1, dtype=dtype) + 1)
    x, g = rand(4, 33, 512, seed=2, dtype=dtype, scale=3), rand(4, 33, 512, seed=3, dtype=dtype)
    grads = []
    for path in ("kernel", "torch"):
        with monkeypatch.context() as m:
            if path == "torch":
                torch_path(m)
            xi = x.clone().requires_grad_()
            norm(xi).backward(g)
            grads.append(xi.grad)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads[0], grads[1], **tol)


def rotary_inputs(B, T, H, Dh, dtype, seed=0):
    cos, sin = rotary_cos_sin(torch.arange(T).expand(B, T) + 3, Dh, 10000.0, dtype)  # [B, 1, T, Dh]
    return rand(B, T, H, Dh, seed=seed, dtype=dtype), cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_kernel_forward_and_backward_equal_the_torch_composition(dtype, monkeypatch):
    """Forward: apply_rotary on the transposed input; backward: the rotation by −angle, transposed back.
    fp32: 1e-6 relative to the values' scale; bf16: the kernel rounds once where torch rounds three times,
    so within 2 bf16 roundings (2⁻⁶ relative to the values' scale)."""
    B, T, H, Dh = 2, 9, 3, 16
    x, cos, sin = rotary_inputs(B, T, H, Dh, dtype)
    g = rand(B, H, T, Dh, seed=5, dtype=dtype)
    out = {}
    for path in ("kernel", "torch"):
        with monkeypatch.context() as m:
            if path == "torch":
                torch_path(m)
            xi = x.clone().requires_grad_()
            y = RotaryFunction.apply(xi, cos, sin)
            y.backward(g)
            out[path] = (y.detach(), xi.grad)
    assert out["kernel"][0].shape == (B, H, T, Dh) and out["kernel"][0].is_contiguous()
    assert out["kernel"][1].shape == (B, T, H, Dh)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=2 ** -6)
    for a, b in zip(out["kernel"], out["torch"]):
        torch.testing.assert_close(a, b, **tol)
    ref = apply_rotary(x.double().transpose(1, 2), cos.double(), sin.double())
    torch.testing.assert_close(out["kernel"][0].double(), ref, **tol)


def test_rotary_backward_is_the_adjoint_of_forward_and_gradchecks():
    """<R x, g> = <x, Rᵀ g> (fp32 kernel), and the torch path against finite differences in fp64."""
    x, cos, sin = rotary_inputs(2, 7, 2, 8, torch.float32, seed=1)
    g = rand(2, 2, 7, 8, seed=2)
    xi = x.clone().requires_grad_()
    y = RotaryFunction.apply(xi, cos, sin)
    y.backward(g)
    torch.testing.assert_close((y * g).sum(), (x * xi.grad).sum(), rtol=1e-5, atol=1e-5)
    x64, cos64, sin64 = rotary_inputs(1, 5, 2, 4, torch.float64, seed=3)
    assert torch.autograd.gradcheck(lambda x: RotaryFunction.apply(x, cos64, sin64), (x64.requires_grad_(),))


def test_rotary_kernel_splits_between_threads_like_one_thread(monkeypatch):
    monkeypatch.setattr(c_build, "MIN_PARALLEL", 1)
    x, cos, sin = rotary_inputs(3, 11, 4, 32, torch.bfloat16, seed=4)
    one, three = at_thread_counts(lambda: (RotaryFunction.apply(x, cos, sin),
                                           block_cpu.rmsnorm_forward(x.reshape(33, 128), x[0, 0].reshape(128), 1e-6)[0]))
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])


def test_the_portable_c_loops_give_the_native_builds_values(monkeypatch, tmp_path):
    x, cos, sin = rotary_inputs(2, 5, 2, 16, torch.float32, seed=6)
    w = rand(32, seed=7) + 1
    native = (RotaryFunction.apply(x, cos, sin), block_cpu.rmsnorm_forward(x.reshape(10, 32), w, 1e-6))
    with portable_build(block_cpu.KERNEL, monkeypatch, tmp_path):
        portable = (RotaryFunction.apply(x, cos, sin), block_cpu.rmsnorm_forward(x.reshape(10, 32), w, 1e-6))
    torch.testing.assert_close(portable[0], native[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(portable[1], native[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernel_and_torch_paths_equal_the_formula_in_fp64(dtype, monkeypatch):
    """silu(g) ⊙ u and its gradients, both paths, against autograd of the formula in fp64, with g across the
    exponential's clamp (|g| up to 100) and a length that is not a multiple of 16 (the scalar tail).
    fp32: 1e-5 relative (e^x and 1/x within 2 ulps); bf16: the inputs are bf16 values, so the fp64 formula
    on them differs from each path by its roundings only (one for the kernel, two for the torch forward):
    2⁻⁶ relative."""
    from model.llama import SwiGLUFunction
    g = torch.cat([rand(3, 201, seed=1, scale=4).flatten(), torch.tensor([-100.0, -90.0, -30.0, 0.0, 30.0, 90.0])])
    g, u, dy = g.to(dtype), rand(g.numel(), seed=2, dtype=dtype), rand(g.numel(), seed=3, dtype=dtype)
    g64, u64 = g.double().requires_grad_(), u.double().requires_grad_()
    y64 = torch.nn.functional.silu(g64) * u64
    y64.backward(dy.double())
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=1e-3)
    for path in ("kernel", "torch"):
        with monkeypatch.context() as m:
            if path == "torch":
                torch_path(m)
            gi, ui = g.clone().requires_grad_(), u.clone().requires_grad_()
            y = SwiGLUFunction.apply(gi, ui)
            y.backward(dy)
        for got, want in ((y, y64), (gi.grad, g64.grad), (ui.grad, u64.grad)):
            assert got.dtype == dtype
            torch.testing.assert_close(got.double(), want.detach(), **tol)


def test_swiglu_threads_and_the_portable_loop_agree(monkeypatch, tmp_path):
    monkeypatch.setattr(c_build, "MIN_PARALLEL", 1)
    g, u = rand(1000, seed=4, dtype=torch.bfloat16), rand(1000, seed=5, dtype=torch.bfloat16)
    one, three = at_thread_counts(lambda: block_cpu.swiglu_forward(g, u))
    assert torch.equal(one, three)
    with portable_build(block_cpu.KERNEL, monkeypatch, tmp_path):
        portable = block_cpu.swiglu_forward(g, u)
    torch.testing.assert_close(portable.float(), one.float(), rtol=2 ** -7, atol=0)


# --- causal attention's backward (CausalAttentionFunction, the softmax sweep of block_kernel.c) ----------------

def softmax_backward_fp64(s, dp, scale):
    """The formula in fp64: p = softmax(scale · s) over keys j ≤ t, ∂s = scale · p (∂p − Σ p ∂p), 0 above."""
    T = s.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    p = (scale * s.double()).masked_fill(~causal, float("-inf")).softmax(-1)
    dp = dp.double()
    return p, scale * p * (dp - (p * dp).sum(-1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 37, 64])
def test_attention_softmax_backward_kernel_is_the_formula(dtype, T):
    """P and ∂s against fp64, rows of every length 1..T (whole 16-lane vectors and scalar tails), scores up to
    ±40 after scaling (the exponential's range): fp32 within 1e-6 of the values' scale (e^x within 2 ulps,
    sums in another order), bf16 one rounding of the fp32 values (2⁻⁸ relative). Above the diagonal exactly 0."""
    G, scale = 3, 0.125
    s, dp = rand(G, T, T, seed=T, scale=100), rand(G, T, T, seed=T + 1)
    p64, ds64 = softmax_backward_fp64(s, dp, scale)
    P, dS = torch.empty(G, T, T, dtype=dtype), torch.empty(G, T, T, dtype=dtype)
    block_cpu.attention_softmax_backward(s.clone(), dp, P, dS, scale)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -8, atol=1e-6)
    torch.testing.assert_close(P.double(), p64, **tol)
    torch.testing.assert_close(dS.double(), ds64, **tol)
    upper = ~torch.ones(T, T, dtype=torch.bool).tril()
    assert not P[:, upper].any() and not dS[:, upper].any()


def test_attention_softmax_backward_may_write_over_its_fp32_inputs():
    s, dp = rand(2, 40, 40, seed=1, scale=10), rand(2, 40, 40, seed=2)
    P, dS = torch.empty_like(s), torch.empty_like(dp)
    block_cpu.attention_softmax_backward(s.clone(), dp, P, dS, 0.3)
    s2, dp2 = s.clone(), dp.clone()
    block_cpu.attention_softmax_backward(s2, dp2, s2, dp2, 0.3)
    assert torch.equal(s2, P) and torch.equal(dp2, dS)


def attention_grads(fn, q, k, v, g):
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    fn(*xs).backward(g)
    return [t.grad for t in xs]


def sdpa_causal(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_attention_backward_matches_sdpa(dtype):
    """∂q, ∂k, ∂v of CausalAttentionFunction against SDPA's backward in fp64 (the reference): fp32 within 1e-5
    relative (Frobenius); bf16 no further from fp64 than 1.25x SDPA's own bf16 backward (s and ∂p are fp32
    products in both; 1.25: the roundings fall elsewhere). Forward is SDPA's own, value for value."""
    from model.llama import CausalAttentionFunction
    B, H, T, Dh = 2, 3, 37, 16
    q, k, v, g = (rand(B, H, T, Dh, seed=i, scale=3 if i < 2 else 1) for i in range(4))
    want = attention_grads(sdpa_causal, *(t.double() for t in (q, k, v, g)))
    q, k, v, g = (t.to(dtype) for t in (q, k, v, g))
    assert torch.equal(CausalAttentionFunction.apply(q, k, v), sdpa_causal(q, k, v))
    ours = attention_grads(CausalAttentionFunction.apply, q, k, v, g)
    sdpa = attention_grads(sdpa_causal, q, k, v, g)
    for o, s, w in zip(ours, sdpa, want):
        assert o.dtype == dtype and o.shape == w.shape
        err, err_sdpa = ((o.double() - w).norm() / w.norm()).item(), ((s.double() - w).norm() / w.norm()).item()
        assert err <= (1e-5 if dtype == torch.float32 else 1.25 * err_sdpa), (err, err_sdpa)


def test_causal_attention_heads_in_groups_equal_all_at_once(monkeypatch):
    """A budget that fits 4 of the 6 heads' [T, T] buffers: groups of 4 and 2, the same gradients."""
    from model import llama
    B, H, T, Dh = 2, 3, 20, 8
    q, k, v, g = (rand(B, H, T, Dh, seed=10 + i) for i in range(4))
    whole = attention_grads(llama.CausalAttentionFunction.apply, q, k, v, g)
    monkeypatch.setattr(llama, "ATTENTION_BUDGET", 4 * T * T * 8)
    grouped = attention_grads(llama.CausalAttentionFunction.apply, q, k, v, g)
    for a, b in zip(grouped, whole):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_the_model_takes_the_written_out_backward_for_causal_training_only(monkeypatch):
    """Llama with gradients on the CPU (fp32): every block's attention goes through CausalAttentionFunction, and
    the parameters' gradients equal those through SDPA's backward (kernels off: block_cpu.usable False) to 1e-5
    relative; without gradients, or with a padding mask, SDPA alone."""
    from dataclasses import replace

    from model import llama
    from model.config import PRESETS
    calls = []
    apply = llama.CausalAttentionFunction.apply
    monkeypatch.setattr(llama.CausalAttentionFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    config = replace(PRESETS["tiny"], vocab_size=50, num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                     num_key_value_heads=4, intermediate_size=48)
    model = llama.Llama(config)
    model.init_weights(seed=0, std=0.5)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for path in ("kernel", "torch"):
        with monkeypatch.context() as m:
            if path == "torch":
                torch_path(m)
            model.zero_grad()
            model(ids).float().logsumexp(-1).sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
    assert len(calls) == model.config.num_hidden_layers
    for a, b in zip(*grads):
        assert ((a - b).norm() / b.norm()).item() <= 1e-5
    with torch.no_grad():
        model(ids)
    model(ids, attention_mask=torch.ones_like(ids))
    assert len(calls) == model.config.num_hidden_layers


def test_workspace_is_reused_and_grows():
    a, b = block_cpu.workspace(((4, 4), torch.float32), ((8,), torch.bfloat16))
    assert a.shape == (4, 4) and b.shape == (8,) and b.dtype == torch.bfloat16
    assert b.data_ptr() == a.data_ptr() + 64                                  # one after the other
    (c,) = block_cpu.workspace(((4, 4), torch.float32))
    assert c.data_ptr() == a.data_ptr()                                       # the same buffer again
    (d,) = block_cpu.workspace(((1 << 20,), torch.float32))
    assert d.numel() == 1 << 20


def test_attention_kernel_threads_and_portable_loop_agree(monkeypatch, tmp_path):
    monkeypatch.setattr(c_build, "MIN_PARALLEL", 1)
    s, dp = rand(3, 45, 45, seed=20, scale=10), rand(3, 45, 45, seed=21)

    def run():
        P, dS = torch.empty(3, 45, 45, dtype=torch.bfloat16), torch.empty(3, 45, 45, dtype=torch.bfloat16)
        block_cpu.attention_softmax_backward(s.clone(), dp, P, dS, 0.25)
        return P, dS
    one, three = at_thread_counts(run)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])
    with portable_build(block_cpu.KERNEL, monkeypatch, tmp_path):
        portable = run()
    for a, b in zip(portable, one):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-6)
