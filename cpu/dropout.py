"""Counter-based dropout: the keep mask is a function of a seed and each element's index, not a drawn tensor.

LoRA's dropout (p = 0.05 in the recipe) is applied to the input of every adapter. nn.Dropout draws the mask
from torch's generator, compares and multiplies (several passes over the input), twice per step under
activation checkpointing, and keeps the mask for backward. Here (the "lora" path, cpu/lora.py) one 63-bit seed
is drawn from torch's CPU generator per call (so torch.manual_seed and checkpoint's RNG replay apply as
before), and element i of the (flattened, row-major) tensor is kept when

    u(seed, i) ≥ t,   t = round(p · 2¹⁶),   so P(drop) = p' = t / 2¹⁶  (p = 0.05: p' = 0.0500031)
    u(seed, i) = bits [16 (i mod 4), 16 (i mod 4) + 16) of mix64(seed + (⌊i / 4⌋ + 1) · γ)   (mod 2⁶⁴)

with γ = 0x9E3779B97F4A7C15 and mix64 SplitMix64's output function (Steele, Lea & Flood 2014): the n-th output
of a SplitMix64 generator seeded with `seed` gives the 16-bit uniforms of elements 4(n-1) … 4(n-1)+3. Backward
recomputes the mask from the seed instead of storing it.

select(x, seed, p) = x where kept, 0 where dropped (raw bit patterns: no rounding). On the CPU for 16- and
32-bit dtypes it is cpu/dropout.c (built by build.py), one pass over x; everywhere else keep_mask(), the same
formula in torch ops, which tests/cpu/test_dropout.py holds the kernel to.
"""
import ctypes
import os

import torch

from cpu import build

GAMMA = 0x9E3779B97F4A7C15
MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dropout.c")
_ARGS = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int32]
KERNEL = build.Kernel(SOURCE, {"dropout_select_16": _ARGS, "dropout_select_32": _ARGS})


def threshold(p: float) -> int:
    """t = round(p · 2¹⁶): an element is dropped when its 16-bit uniform is below t."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability is {p!r}, expected a probability in [0, 1)")
    return round(p * 65536)


def keep_probability(p: float) -> float:
    """1 − p', the probability that an element is kept (inverted dropout divides by it)."""
    return 1 - threshold(p) / 65536


def draw_seed(generator=None) -> int:
    """One seed in [0, 2⁶³) from torch's CPU generator (the default one unless given)."""
    return int(torch.empty((), dtype=torch.int64, device="cpu").random_(generator=generator))


def _signed(c: int) -> int:                          # a 64-bit constant as torch's int64 holds it
    return c - (1 << 64) if c >= 1 << 63 else c


def _shift_right(z, k: int):                         # logical shift of int64 bit patterns
    return (z >> k) & ((1 << (64 - k)) - 1)


def uniforms(n: int, seed: int, device="cpu"):
    """u(seed, i) for i < n: int32 [n] in [0, 2¹⁶), by the formula in torch ops (int64 arithmetic wraps
    mod 2⁶⁴, as the C kernel's uint64 does)."""
    g = torch.arange(1, (n + 3) // 4 + 1, dtype=torch.int64, device=device)              # ⌊i/4⌋ + 1
    z = g * _signed(GAMMA) + _signed(seed)
    z = (z ^ _shift_right(z, 30)) * _signed(MIX[0])
    z = (z ^ _shift_right(z, 27)) * _signed(MIX[1])
    z = z ^ _shift_right(z, 31)                                                           # [n/4] hashes
    lanes = torch.stack([_shift_right(z, 16 * j) & 0xFFFF for j in range(4)], dim=-1)     # [n/4, 4]
    return lanes.reshape(-1)[:n].to(torch.int32)


def keep_mask(shape, seed: int, p: float, device="cpu"):
    """The keep mask (True = kept) of a tensor of `shape`, by the formula (the reference)."""
    n = 1
    for s in shape:
        n *= s
    return (uniforms(n, seed, device) >= threshold(p)).view(shape)


def _kernel_usable(x) -> bool:
    return x.device.type == "cpu" and x.element_size() in (2, 4) and x.is_floating_point() and KERNEL.lib is not None


def select(x, seed: int, p: float, out=None):
    """x where kept, 0 where dropped; into `out` (which may be x itself) or a new tensor. x contiguous."""
    if not x.is_contiguous():
        raise ValueError("dropout.select: x must be contiguous (the mask follows the row-major element index)")
    t = threshold(p)
    out = torch.empty_like(x) if out is None else out
    if not _kernel_usable(x):
        return torch.where(keep_mask(x.shape, seed, p, x.device), x, torch.zeros((), dtype=x.dtype, device=x.device),
                           out=out)
    f = KERNEL.lib.dropout_select_16 if x.element_size() == 2 else KERNEL.lib.dropout_select_32
    f(x.data_ptr(), out.data_ptr(), x.numel(), seed, t, build.threads(x.numel()))
    return out
