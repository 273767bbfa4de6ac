"""The CPU RMSNorm path (cpu/rmsnorm.py on cpu/rmsnorm.c): forward and ∂x, against model/llama.py's plain
RMSNorm (BEZOAR_C_KERNELS=0), the formula in fp64 and finite differences."""
import pytest
import torch

import cpu
from cpu import build as c_build
from cpu import rmsnorm as kernels
from kernel_checks import at_thread_counts, needs_kernels, portable_build
from model.llama import RMSNorm

pytestmark = needs_kernels


def rand(*shape, seed=0, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def plain_code(monkeypatch):
    """Every CPU path off: model/llama.py runs the code CUDA runs."""
    monkeypatch.setenv("BEZOAR_C_KERNELS", "0")


def test_the_kernel_builds_here_and_the_switch_turns_the_path_off(monkeypatch):
    assert kernels.KERNEL.lib is not None, kernels.KERNEL.status
    f32, b16 = torch.empty(1), torch.empty(1, dtype=torch.bfloat16)
    assert cpu.enabled("rms_norm", f32, f32) and cpu.enabled("rms_norm", b16, b16)
    assert not cpu.enabled("rms_norm", f32, b16)                            # two dtypes: the plain code
    assert not cpu.enabled("rms_norm", torch.empty(1, dtype=torch.float16))  # a dtype the kernels lack
    monkeypatch.setenv("BEZOAR_C_KERNELS", "-rms_norm")
    assert not cpu.enabled("rms_norm", f32) and cpu.enabled("loss", f32)
    plain_code(monkeypatch)
    assert not any(cpu.enabled(p, f32) for p in cpu.KERNELS)


# --- RMSNorm ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [48, 512, 37])
def test_rmsnorm_forward_is_the_formula_rounded_where_the_plain_code_rounds(dtype, D):
    """y = round(w · round(x r)), r = 1/sqrt(mean(x²) + eps): against r from fp64 sums; r within 1e-6
    relative (fp32 sums), each y within one rounding of the formula with the exact r."""
    x, w = rand(6, 7, D, seed=D, dtype=dtype, scale=3), rand(D, seed=1, dtype=dtype) + 1
    y, r = kernels.rmsnorm_forward(x, w, 1e-6)
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


def test_the_kernel_splits_rows_between_threads_like_one_thread(monkeypatch):
    monkeypatch.setattr(c_build, "MIN_PARALLEL", 1)
    x, w = rand(33, 128, seed=4, dtype=torch.bfloat16), rand(128, seed=5, dtype=torch.bfloat16) + 1
    g = rand(33, 128, seed=6, dtype=torch.bfloat16)

    def both():
        y, r = kernels.rmsnorm_forward(x, w, 1e-6)
        return y, kernels.rmsnorm_backward(x, w, r, g)
    one, three = at_thread_counts(both)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])


def test_the_portable_c_loops_give_the_native_builds_values(monkeypatch, tmp_path):
    x, w = rand(10, 32, seed=6), rand(32, seed=7) + 1
    native = kernels.rmsnorm_forward(x, w, 1e-6)
    with portable_build(kernels.KERNEL, monkeypatch, tmp_path):
        portable = kernels.rmsnorm_forward(x, w, 1e-6)
    for a, b in zip(portable, native):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
