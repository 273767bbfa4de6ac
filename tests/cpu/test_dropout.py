"""Counter-based dropout (cpu/dropout.py): the formula against an independent pure-Python SplitMix64, the C
kernel (cpu/dropout.c) against the torch formula bit for bit, and the mask's statistics."""
import math

import pytest
import torch

from cpu import build as c_build
from cpu import dropout
from kernel_checks import at_thread_counts, needs_kernels, portable_build

M64 = (1 << 64) - 1


def splitmix64_outputs(seed, count):
    """The first `count` outputs of a SplitMix64 generator (Steele, Lea & Flood 2014), in Python integers."""
    out, state = [], seed
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out.append(z ^ (z >> 31))
    return out


@pytest.mark.parametrize("seed", [0, 1, 12345, (1 << 63) - 1])
def test_uniforms_are_the_16_bit_lanes_of_splitmix64_outputs_low_lane_first(seed):
    n = 4 * 9 + 3                                                          # a short last group
    want = [(h >> (16 * j)) & 0xFFFF for h in splitmix64_outputs(seed, 10) for j in range(4)][:n]
    assert dropout.uniforms(n, seed).tolist() == want


def test_threshold_and_keep_probability():
    assert dropout.threshold(0.05) == 3277 and dropout.keep_probability(0.05) == 1 - 3277 / 65536
    assert dropout.threshold(0.0) == 0 and dropout.keep_probability(0.0) == 1.0
    with pytest.raises(ValueError, match="expected a probability in \\[0, 1\\)"):
        dropout.threshold(1.0)


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 3, 4, 31, 32, 33, 95, 1000, (1 << 19) + 7])
def test_the_kernel_selects_exactly_the_formulas_elements(dtype, n):
    assert dropout.KERNEL.lib is not None, dropout.KERNEL.status
    x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) + 3).to(dtype)   # no zeros of its own
    seed = 987654321987654321 % (1 << 63)
    got = dropout.select(x, seed, 0.3)
    want = torch.where(dropout.keep_mask(x.shape, seed, 0.3), x, torch.zeros((), dtype=dtype))
    assert torch.equal(bits(got), bits(want))
    inplace = x.clone()
    assert dropout.select(inplace, seed, 0.3, out=inplace).data_ptr() == inplace.data_ptr()
    assert torch.equal(bits(inplace), bits(want))


@needs_kernels
def test_threads_split_on_hash_groups_and_give_the_one_thread_result(monkeypatch):
    monkeypatch.setattr(c_build, "MIN_PARALLEL", 64)
    x = torch.randn(3, 1001).bfloat16()
    one, three = at_thread_counts(lambda: dropout.select(x, 5, 0.5))
    assert torch.equal(bits(one), bits(three))
    assert torch.equal(bits(one), bits(torch.where(dropout.keep_mask(x.shape, 5, 0.5), x, 0)))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_portable_c_loop_selects_the_same_elements(dtype, monkeypatch, tmp_path):
    """The plain-C loop that CPUs without AVX-512 run, built for a baseline x86-64 (elsewhere: this machine's
    default target)."""
    x = torch.randn(7, 333).to(dtype)
    with portable_build(dropout.KERNEL, monkeypatch, tmp_path):
        got = dropout.select(x, 77, 0.05)
    assert torch.equal(bits(got), bits(torch.where(dropout.keep_mask(x.shape, 77, 0.05), x, 0)))


def test_other_dtypes_and_devices_take_the_torch_formula(monkeypatch):
    x = torch.randn(5, 9, dtype=torch.float64)
    got = dropout.select(x, 3, 0.5)                                          # 8-byte elements: no kernel
    assert torch.equal(got, torch.where(dropout.keep_mask(x.shape, 3, 0.5), x, 0))
    monkeypatch.setenv("BEZOAR_C_KERNELS", "0")
    assert dropout.KERNEL.lib is None and "BEZOAR_C_KERNELS=0" in dropout.KERNEL.status
    with pytest.raises(ValueError, match="contiguous"):
        dropout.select(torch.randn(4, 6).t(), 3, 0.5)


def test_the_mask_keeps_with_probability_one_minus_p_prime_in_every_lane_independently():
    """Over n = 2²² elements, counts are Binomial: each must lie within 6 standard deviations of its mean
    (a false alarm about once in 10⁹ runs per check). Checked: the kept fraction overall and in each of the
    four 16-bit lanes of a hash; pairs of neighbours (same hash) and of elements 4 apart (next hash) both
    dropped with probability p'² (independence); and two seeds' masks agree where independence says."""
    n, p = 1 << 22, 0.05
    p_ = dropout.threshold(p) / 65536
    m = dropout.keep_mask((n,), dropout.draw_seed(torch.Generator().manual_seed(0)), p)

    def within(count, trials, prob):
        return abs(count - trials * prob) < 6 * math.sqrt(trials * prob * (1 - prob))

    assert within(m.sum().item(), n, 1 - p_)
    for lane in range(4):
        assert within(m[lane::4].sum().item(), n // 4, 1 - p_)
    dropped = ~m
    assert within((dropped[0::2] & dropped[1::2]).sum().item(), n // 2, p_ * p_)
    assert within((dropped[:-4] & dropped[4:]).sum().item(), n - 4, p_ * p_)
    other = dropout.keep_mask((n,), dropout.draw_seed(torch.Generator().manual_seed(1)), p)
    assert within((m == other).sum().item(), n, (1 - p_) ** 2 + p_ ** 2)


def test_seeds_replay_from_torchs_generator():
    torch.manual_seed(4)
    a = dropout.draw_seed()
    torch.manual_seed(4)
    assert dropout.draw_seed() == a and 0 <= a < 1 << 63 and dropout.draw_seed() != a
