"""The C kernel of the frozen-lm_head loss's softmax (cpu/losses.c via cpu/losses.py) against the formulas in
fp64 and against losses.py's torch path."""
import pytest
import torch

from cpu import build as c_build
import cpu
import losses
from cpu import losses as losses_cpu
from kernel_checks import at_thread_counts, needs_kernels, portable_build

pytestmark = needs_kernels


def logits(n, V, dtype, seed=0, scale=4.0):
    return (torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def test_the_kernel_builds_here():
    assert losses_cpu.KERNEL.lib is not None, losses_cpu.KERNEL.status
    assert cpu.enabled("loss", torch.empty(1, 2)) and cpu.enabled("loss", torch.empty(1, 2, dtype=torch.bfloat16))
    assert not cpu.enabled("loss", torch.empty(1, 2, dtype=torch.float16))
    assert not cpu.enabled("loss", torch.empty(1, 2), torch.empty(1, 2, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V,build", [(32000, "native"), (37, "native"), (16, "native"), (32000, "portable")])
def test_log_p_of_the_target_and_p_minus_onehot_equal_the_formulas_in_fp64(dtype, V, build, monkeypatch, tmp_path):
    """log p(y) within 1e-5 absolute of z_y − logsumexp(z); z ← p − onehot within 1e-5 relative in fp32 (the
    sum of V fp32 terms, 16 lanes of V/16 each, is what limits it; exp_poly is within 2 ulps) and one bf16
    rounding of it in bf16. One row's target has p ≈ e^−60:
    its log p is still exact (no log of an underflowed p). Also in the portable build (no AVX-512), whose
    one scalar sum of 32000 terms must not drift."""
    if build == "portable":
        with portable_build(losses_cpu.KERNEL, monkeypatch, tmp_path):
            return test_log_p_of_the_target_and_p_minus_onehot_equal_the_formulas_in_fp64(dtype, V, "native",
                                                                                         monkeypatch, tmp_path)
    z = logits(6, V, dtype, seed=V)
    y = torch.tensor([0, V - 1, 3, 5, V // 2, 7]) % V
    z[2, :] = 0
    z[2, y[2]] = -60.0                                                     # p(y) ≈ e^-60 / V
    z64 = z.double()
    want_logp = z64.gather(1, y[:, None]).squeeze(1) - z64.logsumexp(1)
    want_grad = z64.softmax(1) - torch.nn.functional.one_hot(y, V).double()
    logp = torch.empty(6)
    got = z.clone()
    losses_cpu.token_logp_grad(got, y, logp)
    torch.testing.assert_close(logp.double(), want_logp, rtol=0, atol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want_grad, rtol=1e-5, atol=1e-7)
    else:
        torch.testing.assert_close(got.double(), want_grad, rtol=2 ** -8, atol=1e-7)
    untouched = z.clone()
    losses_cpu.token_logp_grad(untouched, y, torch.empty(6), write_grad=False)
    assert torch.equal(untouched, z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_frozen_head_loss_gives_the_torch_paths_values_and_gradients(dtype, monkeypatch):
    """losses.sequence_logps_chunked with the kernel and with the plain code: log-probabilities within 1e-4
    (sums of fp32 terms, exp within 2 ulps), ∂hidden within one rounding of the dtype."""
    g = torch.Generator().manual_seed(1)
    hidden = (torch.randn(2, 9, 32, generator=g)).to(dtype)
    W = (torch.randn(300, 32, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, 300, (2, 9), generator=g)
    labels[0, :3] = losses.IGNORE_INDEX
    out = {}
    for path in ("kernel", "torch"):
        with monkeypatch.context() as m:
            if path == "torch":
                m.setenv("BEZOAR_C_KERNELS", "-loss")
            assert cpu.enabled("loss", hidden) == (path == "kernel")
            h = hidden.clone().requires_grad_()
            lp = losses.sequence_logps_chunked(h, W, labels, chunk_size=4)
            lp.sum().backward()
            out[path] = (lp.detach(), h.grad)
    torch.testing.assert_close(out["kernel"][0], out["torch"][0], rtol=0, atol=1e-4)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-3)
    torch.testing.assert_close(out["kernel"][1], out["torch"][1], **tol)


def test_threads_give_the_one_thread_result(monkeypatch):
    monkeypatch.setattr(c_build, "MIN_PARALLEL", 1)
    z, y = logits(7, 500, torch.bfloat16), torch.arange(7) * 3
    def run():
        zi, lp = z.clone(), torch.empty(7)
        losses_cpu.token_logp_grad(zi, y, lp)
        return zi, lp

    one, three = at_thread_counts(run)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])


def test_the_portable_c_loop_is_close_to_the_vector_one(monkeypatch, tmp_path):
    """Baseline x86-64 (no AVX-512): the same formulas, summed in another order."""
    z, y = logits(5, 1000, torch.float32, seed=3), torch.arange(5)
    native = z.clone(), torch.empty(5)
    losses_cpu.token_logp_grad(native[0], y, native[1])
    with portable_build(losses_cpu.KERNEL, monkeypatch, tmp_path):
        portable = z.clone(), torch.empty(5)
        losses_cpu.token_logp_grad(portable[0], y, portable[1])
    torch.testing.assert_close(portable[0], native[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(portable[1], native[1], rtol=0, atol=1e-5)
