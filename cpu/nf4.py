"""The "nf4" path: NF4 dequantisation in C (cpu/nf4.c), and lora/layers.py's 4-bit product (NF4Matmul) taken a
tile of W at a time on it.

Dequantisation. w = level[code] · absmax for every value. The plain code (NF4Tensor.dequantize) makes several
passes over memory (bytes → codes → indices, a gather, a scale, a cast), each through a temporary; bitsandbytes'
CPU backend does it in one, and so does this kernel: it reads the packed bytes once and writes each value
once, with the same fp32 products rounded the same way (tests/cpu/test_nf4_cpu.py: bit for bit, fp32 and
bf16, every block size).

Tiles. NF4Matmul's plain code dequantises all of W [N, K] in forward and again in backward. Here each product
dequantises about TILE values of W, multiplies, and moves on:
    forward   y[:, rows]  = x · W[rows, :]ᵀ      tiles of whole rows; each y element is one K-long dot product
    backward  ∂x[:, cols] = ∂y · W[:, cols]      tiles of whole columns; each ∂x element one N-long dot product
Each element is thus one matmul's dot product, as with the whole W (no partial sums rounded to bf16). Why
tiles: a whole dequantised W is a fresh buffer every time, and on the CPU the first touch of fresh pages
(page faults) costs about as much as the dequantisation itself, while a tile is small enough that the
allocator hands back memory it has already mapped. Much smaller tiles mean many small operators and matmuls
that repack x each time. Rows that straddle blocks (K not a multiple of block_size) get W whole.

Kept W. A W of at most KEEP_MAX_BYTES in the compute dtype is instead dequantised whole once in forward and
kept for backward: one dequantisation fewer per step, for a dense copy of small layers only. Under activation
checkpointing the copy lives from a block's recomputation to its backward (one block's worth at a time).

A whole weight's output is a fresh buffer: dequantize_nf4 asks for huge pages for it first (advise_huge_pages).

Off, so that the plain code runs: BEZOAR_C_KERNELS=0 or -nf4, a tensor off the CPU, a dtype other than fp32 or
bf16, or no build (no compiler: `KERNEL.status` says why, and bench/bench_nf4.py prints it). Block sizes are
multiples of 32, as every size bitsandbytes accepts is.
"""
import ctypes
import os
import sys

import torch

from cpu import build

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nf4.c")
_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p] + \
    [ctypes.c_int64] * 4 + [ctypes.c_int32]
KERNEL = build.Kernel(SOURCE, {"nf4_dequantize_f32": _ARGS, "nf4_dequantize_bf16": _ARGS})
TILE = 1 << 22             # values of W dequantised at a time (16 MiB in fp32)
KEEP_MAX_BYTES = 1 << 22   # a dequantised W up to this size (compute dtype) is kept from forward for backward
HUGE_PAGE, MADV_HUGEPAGE = 2 << 20, 14  # Linux's transparent huge pages (x86-64, arm64 with 4 KiB base pages)
HUGE_PAGE_MIN_BYTES = 16 << 20        # outputs this large ask for huge pages (advise_huge_pages)
_libc = {}


# --- the kernel ----------------------------------------------------------------------------------------

def advise_huge_pages(t: torch.Tensor) -> int:
    """Ask Linux to back t's memory with 2 MiB pages (madvise MADV_HUGEPAGE), before anything touches it; the
    bytes advised (0: too small, not Linux, or refused). Why: a whole dequantised weight is a fresh buffer (glibc
    maps large ones anew each time), and touching it 4 KiB page by page is most of the time dequantisation
    takes; with 2 MiB pages there are 512 times fewer faults. Only the 2 MiB-aligned inside of t is advised: a
    hint that cannot change any value. Where free memory is fragmented, Linux may first compact it to find
    2 MiB pages, which can make an occasional call slower."""
    nbytes = t.numel() * t.element_size()
    if nbytes < HUGE_PAGE_MIN_BYTES or not sys.platform.startswith("linux") or t.device.type != "cpu":
        return 0
    start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (t.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return 0
    if "libc" not in _libc:
        _libc["libc"] = ctypes.CDLL(None, use_errno=True)                   # the process's own C library
        _libc["libc"].madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return end - start if _libc["libc"].madvise(start, end - start, MADV_HUGEPAGE) == 0 else 0


def dequantize_blocks(out, packed, absmax, level):
    """out [R, C] fp32/bf16 ← level[code] · absmax, for packed [R, C/2] uint8 and absmax [R, C/bs] fp32, each
    with unit stride along its last dim (rows may be strided: a tile of columns of a weight), level [16] fp32.
    Whole blocks only, bs a multiple of 32; the kernel must have built."""
    R, C = out.shape
    bs = C // absmax.shape[1]
    assert packed.shape == (R, C // 2) and absmax.shape[0] == R and C % bs == 0 and bs % 32 == 0
    assert packed.stride(1) == absmax.stride(1) == out.stride(1) == 1, "rows must be contiguous"
    assert packed.dtype == torch.uint8 and absmax.dtype == torch.float32 and level.dtype == torch.float32
    f = KERNEL.lib.nf4_dequantize_f32 if out.dtype == torch.float32 else KERNEL.lib.nf4_dequantize_bf16
    level = level.contiguous()
    if R:
        f(packed.data_ptr(), packed.stride(0), absmax.data_ptr(), absmax.stride(0), level.data_ptr(),
          out.data_ptr(), out.stride(0), R, C // bs, bs, min(build.threads(R * C), R))
    return out


def dequantize_nf4(q, out):
    """The weight of the NF4Tensor q in its shape, dequantised into out [nb, bs] (fp32 or bf16, on the CPU;
    a short last block has room for a whole one): NF4Tensor.dequantize's values."""
    n, bs = q.numel, q.block_size
    full = n // bs                                                            # whole blocks
    absmax, packed = q.block_absmax(), q.packed.view(-1)                      # [nb] fp32, [ceil(n / 2)]
    advise_huge_pages(out)                                                    # before the first touch
    dequantize_blocks(out[:full], packed[:full * bs // 2].view(full, bs // 2), absmax[:full, None], q.code)
    if full < out.shape[0]:                                                   # the short last block, padded
        last = torch.zeros(1, bs // 2, dtype=torch.uint8, device="cpu")
        last[0, :packed.numel() - full * bs // 2] = packed[full * bs // 2:]
        dequantize_blocks(out[full:], last, absmax[full:, None], q.code)
    return out.view(-1)[:n].view(q.shape)


def dequantize_tile(q, rows: slice, cols: slice, dtype, absmax=None) -> torch.Tensor:
    """W[rows, cols] [R, C] of the 2-D NF4Tensor q whose row length K is a multiple of block_size, in `dtype`;
    cols must start and stop on block boundaries, within K. absmax: q.block_absmax() if already computed."""
    N, K = q.shape
    bs = q.block_size
    assert K % bs == 0 and cols.start % bs == 0 and cols.stop % bs == 0 and cols.stop <= K
    absmax = q.block_absmax() if absmax is None else absmax
    packed = q.packed.view(N, K // 2)[rows, cols.start // 2:cols.stop // 2]       # [R, C/2]
    absmax = absmax.view(N, K // bs)[rows, cols.start // bs:cols.stop // bs]      # [R, C/bs]
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=dtype, device="cpu")
    return dequantize_blocks(out, packed, absmax, q.code)


# --- the 4-bit product in tiles --------------------------------------------------------------------------

def keeps_dequantized(q, dtype) -> bool:
    """True if forward dequantises W whole and keeps it for backward (W at most KEEP_MAX_BYTES in dtype)."""
    return q.numel * torch.finfo(dtype).bits // 8 <= KEEP_MAX_BYTES


def nf4_linear(x, q, keep: bool = False):
    """(y = x Wᵀ [M, N], W [N, K] kept for backward or None) for x [M, K] (fp32 or bf16, on the CPU) and the
    NF4Tensor q holding W [N, K]. keep: backward will need ∂x, so a small W (keeps_dequantized) is kept."""
    N, K = q.shape
    if keep and keeps_dequantized(q, x.dtype):
        W = q.dequantize(x.dtype)                                             # [N, K]
        return x @ W.t(), W
    if K % q.block_size:                                                      # rows straddle blocks
        return x @ q.dequantize(x.dtype).t(), None
    absmax = q.block_absmax()                                                 # [N·K / bs] fp32
    y = torch.empty(x.shape[0], N, dtype=x.dtype, device="cpu")
    step = max(1, TILE // K)                                                  # whole rows
    for a in range(0, N, step):
        w = dequantize_tile(q, slice(a, a + step), slice(0, K), x.dtype, absmax)   # [R, K]
        torch.mm(x, w.t(), out=y[:, a:a + step])                              # [M, R]
    return y, None


def nf4_linear_grad_input(grad_y, q, W=None):
    """∂x = ∂y W [M, K] for ∂y [M, N] (fp32 or bf16, on the CPU): with the W kept by nf4_linear, or
    dequantising W again a tile of whole columns at a time."""
    if W is not None:
        return grad_y @ W
    N, K = q.shape
    bs = q.block_size
    if K % bs:                                                                # rows straddle blocks
        return grad_y @ q.dequantize(grad_y.dtype)
    grad_y = grad_y.contiguous()
    absmax = q.block_absmax()
    grad_x = torch.empty(grad_y.shape[0], K, dtype=grad_y.dtype, device="cpu")
    step = max(4 * bs, TILE // N // bs * bs)                                  # whole blocks
    for c in range(0, K, step):
        cols = slice(c, min(c + step, K))
        w = dequantize_tile(q, slice(0, N), cols, grad_y.dtype, absmax)       # [N, C]
        torch.mm(grad_y, w, out=grad_x[:, cols])                              # [M, C]
    return grad_x
