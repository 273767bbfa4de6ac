"""The CPU paths of a LLaMA block (cpu/block.py on cpu/block.c): RMSNorm forward and ∂x, rotary embeddings
forward and ∂x, SwiGLU, and causal attention's written-out backward, against model/llama.py's plain code
(BEZOAR_C_KERNELS=0, or the composition called directly), SDPA's backward and the formulas in fp64."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import cpu
from cpu import block
from cpu import build as c_build
from kernel_checks import at_thread_counts, needs_kernels, portable_build
from model import llama
from model.config import PRESETS
from model.llama import RMSNorm, apply_rotary, rotary_cos_sin

pytestmark = needs_kernels


def rand(*shape, seed=0, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def plain_code(monkeypatch):
    """Every CPU path off: model/llama.py runs the code CUDA runs."""
    monkeypatch.setenv("BEZOAR_C_KERNELS", "0")


def test_the_kernels_build_here_and_the_switch_turns_each_path_off(monkeypatch):
    assert block.KERNEL.lib is not None, block.KERNEL.status
    f32, b16 = torch.empty(1), torch.empty(1, dtype=torch.bfloat16)
    assert cpu.enabled("rms_norm", f32, f32) and cpu.enabled("rotary", b16, b16)
    assert not cpu.enabled("rms_norm", f32, b16)                            # two dtypes: the plain code
    assert not cpu.enabled("swiglu", torch.empty(1, dtype=torch.float16))  # a dtype the kernels lack
    monkeypatch.setenv("BEZOAR_C_KERNELS", "-rms_norm")
    assert not cpu.enabled("rms_norm", f32) and cpu.enabled("attention", f32)
    plain_code(monkeypatch)
    assert not any(cpu.enabled(p, f32) for p in ("rms_norm", "rotary", "swiglu", "attention"))


# --- RMSNorm ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [48, 512, 37])
def test_rmsnorm_forward_is_the_formula_rounded_where_the_plain_code_rounds(dtype, D):
    """y = round(w · round(x r)), r = 1/sqrt(mean(x²) + eps): against r from fp64 sums; r within 1e-6
    relative (fp32 sums), each y within one rounding of the formula with the exact r."""
    x, w = rand(6, 7, D, seed=D, dtype=dtype, scale=3), rand(D, seed=1, dtype=dtype) + 1
    y, r = block.rmsnorm_forward(x, w, 1e-6)
    r64 = 1 / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(r.double(), r64, rtol=1e-6, atol=0)
    want = w.double() * (x.double() * r64).to(dtype).double()
    torch.testing.assert_close(y.double(), want, rtol=1e-6 if dtype == torch.float32 else 2 ** -7, atol=0)


def norm_with_weight(D, dtype, seed=1, trains=True):
    norm = RMSNorm(D, eps=1e-6).to(dtype).requires_grad_(trains)
    with torch.no_grad():
        norm.weight.copy_(rand(D, seed=seed, dtype=dtype) + 1)
    return norm


def norm_outputs(norm, x, g):
    """(y, ∂x, ∂w) of norm at x for the output gradient g (∂w None for a frozen norm)."""
    xi = x.clone().requires_grad_()
    norm.weight.grad = None
    y = norm(xi)
    y.backward(g)
    return y.detach(), xi.grad, norm.weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_backward_kernel_equals_the_plain_backward_of_a_frozen_norm(dtype, monkeypatch):
    """∂x with the weight frozen (the training case): the kernel against autograd through the plain module,
    the same formula with sums in another order: fp32 1e-5, bf16 one rounding (2e-2 of the values' scale)."""
    norm = norm_with_weight(512, dtype, trains=False)
    x, g = rand(4, 33, 512, seed=2, dtype=dtype, scale=3), rand(4, 33, 512, seed=3, dtype=dtype)
    kernel = norm_outputs(norm, x, g)
    plain_code(monkeypatch)
    plain = norm_outputs(norm, x, g)
    assert kernel[2] is None and plain[2] is None
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(kernel[1], plain[1], **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_path_equals_the_plain_module_and_its_autograd(dtype, monkeypatch):
    """A trained norm (toy/base.py): forward, ∂x and ∂w of cpu.rms_norm against the plain module. Forward: the
    kernel sums the squares in another order: fp32 1e-6 relative, bf16 at most one rounding apart (2⁻⁷).
    Gradients: another grouping of the same sums; fp32 1e-5 relative; bf16: autograd rounds ∂y ⊙ w and each
    product to bf16 on its own path, so one bf16 rounding of the values' scale, 2e-2."""
    norm = norm_with_weight(48, dtype)
    x, g = rand(3, 5, 48, seed=2, dtype=dtype, scale=3), rand(3, 5, 48, seed=3, dtype=dtype)
    y, dx, dw = norm_outputs(norm, x, g)
    plain_code(monkeypatch)
    y_ref, dx_ref, dw_ref = norm_outputs(norm, x, g)
    torch.testing.assert_close(y, y_ref, rtol=1e-6 if dtype == torch.float32 else 2 ** -7, atol=0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in ((dx, dx_ref), (dw, dw_ref)):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, **tol)


def test_rms_norm_backward_gradchecks():
    """The Function's ∂x (kernel) and ∂w (torch) against finite differences. The kernels compute in fp32 (no
    fp64), so the differences are taken with eps 1e-3 and compared at 1e-3 (fp32 rounding / eps ≈ 1e-4)."""
    x, w = rand(2, 3, 6, seed=5).requires_grad_(), rand(6, seed=4).requires_grad_()
    with pytest.warns(UserWarning, match="not a double precision"):
        assert torch.autograd.gradcheck(lambda x, w: cpu.rms_norm(x, w, 1e-3), (x, w), eps=1e-3, atol=1e-3,
                                        rtol=1e-3)


# --- rotary embeddings -------------------------------------------------------------------------------------

def rotary_inputs(B, T, H, Dh, dtype, seed=0):
    cos, sin = rotary_cos_sin(torch.arange(T).expand(B, T) + 3, Dh, 10000.0, dtype)  # [B, 1, T, Dh]
    return rand(B, T, H, Dh, seed=seed, dtype=dtype), cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_kernel_forward_and_backward_equal_the_plain_composition(dtype):
    """Forward: apply_rotary on the transposed input; backward: the rotation by −angle, transposed back.
    fp32: 1e-6 relative to the values' scale; bf16: the kernel rounds once where torch rounds three times,
    so within 2 bf16 roundings (2⁻⁶ relative to the values' scale)."""
    B, T, H, Dh = 2, 9, 3, 16
    x, cos, sin = rotary_inputs(B, T, H, Dh, dtype)
    g = rand(B, H, T, Dh, seed=5, dtype=dtype)
    out = {}
    for path, fn in (("kernel", cpu.rotary), ("plain", lambda x, c, s: apply_rotary(x.transpose(1, 2), c, s))):
        xi = x.clone().requires_grad_()
        y = fn(xi, cos, sin)
        y.backward(g)
        out[path] = (y.detach(), xi.grad)
    assert out["kernel"][0].shape == (B, H, T, Dh) and out["kernel"][0].is_contiguous()
    assert out["kernel"][1].shape == (B, T, H, Dh)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=2 ** -6)
    for a, b in zip(out["kernel"], out["plain"]):
        torch.testing.assert_close(a, b, **tol)
    ref = apply_rotary(x.double().transpose(1, 2), cos.double(), sin.double())
    torch.testing.assert_close(out["kernel"][0].double(), ref, **tol)


def test_rotary_backward_is_the_adjoint_of_forward_and_gradchecks():
    """<R x, g> = <x, Rᵀ g> (fp32 kernel), and against finite differences: R is linear, so they are exact up
    to fp32 rounding (1e-7 / eps 1e-2), compared at 1e-3."""
    x, cos, sin = rotary_inputs(2, 7, 2, 8, torch.float32, seed=1)
    g = rand(2, 2, 7, 8, seed=2)
    xi = x.clone().requires_grad_()
    y = cpu.rotary(xi, cos, sin)
    y.backward(g)
    torch.testing.assert_close((y * g).sum(), (x * xi.grad).sum(), rtol=1e-5, atol=1e-5)
    x, cos, sin = rotary_inputs(1, 5, 2, 4, torch.float32, seed=3)
    with pytest.warns(UserWarning, match="not a double precision"):
        assert torch.autograd.gradcheck(lambda x: cpu.rotary(x, cos, sin), (x.requires_grad_(),), eps=1e-2,
                                        atol=1e-3, rtol=1e-3)


def test_rotary_kernel_splits_between_threads_like_one_thread(monkeypatch):
    monkeypatch.setattr(c_build, "MIN_PARALLEL", 1)
    x, cos, sin = rotary_inputs(3, 11, 4, 32, torch.bfloat16, seed=4)
    one, three = at_thread_counts(lambda: (cpu.rotary(x, cos, sin),
                                           block.rmsnorm_forward(x.reshape(33, 128), x[0, 0].reshape(128), 1e-6)[0]))
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])


def test_the_portable_c_loops_give_the_native_builds_values(monkeypatch, tmp_path):
    x, cos, sin = rotary_inputs(2, 5, 2, 16, torch.float32, seed=6)
    w = rand(32, seed=7) + 1
    native = (cpu.rotary(x, cos, sin), block.rmsnorm_forward(x.reshape(10, 32), w, 1e-6))
    with portable_build(block.KERNEL, monkeypatch, tmp_path):
        portable = (cpu.rotary(x, cos, sin), block.rmsnorm_forward(x.reshape(10, 32), w, 1e-6))
    torch.testing.assert_close(portable[0], native[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(portable[1], native[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


# --- SwiGLU ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernel_and_plain_code_equal_the_formula_in_fp64(dtype):
    """silu(g) ⊙ u and its gradients, cpu.swiglu and the plain F.silu(g) * u, against autograd of the formula
    in fp64, with g across the exponential's clamp (|g| up to 100) and a length that is not a multiple of 16
    (the scalar tail). fp32: 1e-5 relative (e^x and 1/x within 2 ulps); bf16: the inputs are bf16 values, so
    the fp64 formula on them differs from each path by its roundings only (one for the kernel, two for the
    plain forward): 2⁻⁶ relative."""
    g = torch.cat([rand(3, 201, seed=1, scale=4).flatten(), torch.tensor([-100.0, -90.0, -30.0, 0.0, 30.0, 90.0])])
    g, u, dy = g.to(dtype), rand(g.numel(), seed=2, dtype=dtype), rand(g.numel(), seed=3, dtype=dtype)
    g64, u64 = g.double().requires_grad_(), u.double().requires_grad_()
    y64 = F.silu(g64) * u64
    y64.backward(dy.double())
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=1e-3)
    for fn in (cpu.swiglu, lambda g, u: F.silu(g) * u):
        gi, ui = g.clone().requires_grad_(), u.clone().requires_grad_()
        y = fn(gi, ui)
        y.backward(dy)
        for got, want in ((y, y64), (gi.grad, g64.grad), (ui.grad, u64.grad)):
            assert got.dtype == dtype
            torch.testing.assert_close(got.double(), want.detach(), **tol)


def test_swiglu_threads_and_the_portable_loop_agree(monkeypatch, tmp_path):
    monkeypatch.setattr(c_build, "MIN_PARALLEL", 1)
    g, u = rand(1000, seed=4, dtype=torch.bfloat16), rand(1000, seed=5, dtype=torch.bfloat16)
    one, three = at_thread_counts(lambda: block.swiglu_forward(g, u))
    assert torch.equal(one, three)
    with portable_build(block.KERNEL, monkeypatch, tmp_path):
        portable = block.swiglu_forward(g, u)
    torch.testing.assert_close(portable.float(), one.float(), rtol=2 ** -7, atol=0)


# --- causal attention's backward (CausalAttention, the softmax sweep of block.c) ------------------------

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
    block.attention_softmax_backward(s.clone(), dp, P, dS, scale)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -8, atol=1e-6)
    torch.testing.assert_close(P.double(), p64, **tol)
    torch.testing.assert_close(dS.double(), ds64, **tol)
    upper = ~torch.ones(T, T, dtype=torch.bool).tril()
    assert not P[:, upper].any() and not dS[:, upper].any()


def test_attention_softmax_backward_may_write_over_its_fp32_inputs():
    s, dp = rand(2, 40, 40, seed=1, scale=10), rand(2, 40, 40, seed=2)
    P, dS = torch.empty_like(s), torch.empty_like(dp)
    block.attention_softmax_backward(s.clone(), dp, P, dS, 0.3)
    s2, dp2 = s.clone(), dp.clone()
    block.attention_softmax_backward(s2, dp2, s2, dp2, 0.3)
    assert torch.equal(s2, P) and torch.equal(dp2, dS)


def attention_grads(fn, q, k, v, g):
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    fn(*xs).backward(g)
    return [t.grad for t in xs]


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_attention_backward_matches_sdpa(dtype):
    """∂q, ∂k, ∂v of cpu.causal_attention against SDPA's backward in fp64 (the reference): fp32 within 1e-5
    relative (Frobenius); bf16 no further from fp64 than 1.25x SDPA's own bf16 backward (s and ∂p are fp32
    products in both; 1.25: the roundings fall elsewhere). Forward is SDPA's own, value for value."""
    B, H, T, Dh = 2, 3, 37, 16
    q, k, v, g = (rand(B, H, T, Dh, seed=i, scale=3 if i < 2 else 1) for i in range(4))
    want = attention_grads(sdpa_causal, *(t.double() for t in (q, k, v, g)))
    q, k, v, g = (t.to(dtype) for t in (q, k, v, g))
    assert torch.equal(cpu.causal_attention(q, k, v), sdpa_causal(q, k, v))
    ours = attention_grads(cpu.causal_attention, q, k, v, g)
    sdpa = attention_grads(sdpa_causal, q, k, v, g)
    for o, s, w in zip(ours, sdpa, want):
        assert o.dtype == dtype and o.shape == w.shape
        err, err_sdpa = ((o.double() - w).norm() / w.norm()).item(), ((s.double() - w).norm() / w.norm()).item()
        assert err <= (1e-5 if dtype == torch.float32 else 1.25 * err_sdpa), (err, err_sdpa)


def test_causal_attention_heads_in_groups_equal_all_at_once(monkeypatch):
    """A workspace that fits 4 of the 6 heads' [T, T] buffers: groups of 4 and 2, the same gradients."""
    B, H, T, Dh = 2, 3, 20, 8
    q, k, v, g = (rand(B, H, T, Dh, seed=10 + i) for i in range(4))
    whole = attention_grads(cpu.causal_attention, q, k, v, g)
    monkeypatch.setattr(block, "ATTENTION_WORKSPACE_BYTES", 4 * T * T * 8)
    grouped = attention_grads(cpu.causal_attention, q, k, v, g)
    for a, b in zip(grouped, whole):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_the_model_takes_the_written_out_backward_for_causal_training_only(monkeypatch):
    """Llama with gradients on the CPU (fp32): every block's attention goes through cpu.causal_attention, and
    the parameters' gradients equal those of the plain code (BEZOAR_C_KERNELS=0: SDPA's backward, and the
    other paths off too) to 1e-5 relative; without gradients, or with a padding mask, SDPA alone."""
    calls = []
    real = cpu.causal_attention
    monkeypatch.setattr(cpu, "causal_attention", lambda *a: calls.append(1) or real(*a))
    config = replace(PRESETS["tiny"], vocab_size=50, num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                     num_key_value_heads=4, intermediate_size=48)
    model = llama.Llama(config)
    model.init_weights(seed=0, std=0.5)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for path in ("kernel", "plain"):
        with monkeypatch.context() as m:
            if path == "plain":
                plain_code(m)
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
    a, b = block.workspace(((4, 4), torch.float32), ((8,), torch.bfloat16))
    assert a.shape == (4, 4) and b.shape == (8,) and b.dtype == torch.bfloat16
    assert b.data_ptr() == a.data_ptr() + 64                                  # one after the other
    (c,) = block.workspace(((4, 4), torch.float32))
    assert c.data_ptr() == a.data_ptr()                                       # the same buffer again
    (d,) = block.workspace(((1 << 20,), torch.float32))
    assert d.numel() == 1 << 20


def test_attention_kernel_threads_and_portable_loop_agree(monkeypatch, tmp_path):
    monkeypatch.setattr(c_build, "MIN_PARALLEL", 1)
    s, dp = rand(3, 45, 45, seed=20, scale=10), rand(3, 45, 45, seed=21)

    def run():
        P, dS = torch.empty(3, 45, 45, dtype=torch.bfloat16), torch.empty(3, 45, 45, dtype=torch.bfloat16)
        block.attention_softmax_backward(s.clone(), dp, P, dS, 0.25)
        return P, dS
    one, three = at_thread_counts(run)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])
    with portable_build(block.KERNEL, monkeypatch, tmp_path):
        portable = run()
    for a, b in zip(portable, one):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-6)
