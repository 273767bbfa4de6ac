"""The CPU fast path of NF4 dequantisation: lora/nf4_kernel.c, built once per machine, called through ctypes.

Why a C kernel. Dequantising is level[code] · absmax for every value. In eager torch that is three passes over
memory (bytes → int32 indices, a gather, a scale), and bitsandbytes' CPU backend does it in one (measured on an
8640 × 3200 weight: the torch code took 1.5× bitsandbytes' time in fp32, 1.7× in bf16). The kernel does the
same arithmetic in one pass; lora/nf4.py keeps the torch code as the reference that every result is tested
against (tests/test_nf4_cpu.py: bit for bit, fp32 and bf16, every block size) and as the path wherever the
kernel is not there.

Build: c_build.py (once per machine, cached; the rows split on torch's OpenMP threads).

A whole weight's output is a fresh buffer whose first touch (page faults) costs more than the kernel itself;
dequantize() asks for huge pages for it first (advise_huge_pages).

The kernel is not used, and dequantize() takes the torch path, when: BEZOAR_C_KERNELS=0; the tensor is not on
the CPU; the dtype is not fp32 or bf16; the block size is not a multiple of 32; or the build failed (no
compiler: `KERNEL.status` says why, and bench/bench_nf4.py prints it).
"""
import ctypes
import os
import sys

import torch

import c_build

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nf4_kernel.c")
_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p] + \
    [ctypes.c_int64] * 4 + [ctypes.c_int32]
KERNEL = c_build.Kernel(SOURCE, {"nf4_dequantize_f32": _ARGS, "nf4_dequantize_bf16": _ARGS})
HUGE_PAGE, MADV_HUGEPAGE = 2 << 20, 14  # Linux's transparent huge pages (x86-64, arm64 with 4 KiB base pages)
HUGE_PAGE_MIN_BYTES = 16 << 20        # outputs this large ask for huge pages (advise_huge_pages)
_libc = {}


def usable(device, dtype, block_size: int) -> bool:
    return (torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and block_size % 32 == 0 and KERNEL.lib is not None)


def advise_huge_pages(t: torch.Tensor) -> int:
    """Ask Linux to back t's memory with 2 MiB pages (madvise MADV_HUGEPAGE), before anything touches it; the
    bytes advised (0: too small, not Linux, or refused). Why: a whole dequantised weight is a fresh buffer (glibc
    maps anything over 32 MiB anew each time), and touching it page by page is most of dequantize()'s time:
    allocating and filling 8640 × 3200 fp32 took 32.8 ms with 4 KiB pages, 10.3 ms with 2 MiB ones (measured
    here, transparent huge pages in "madvise" mode). Only the 2 MiB-aligned inside of t is advised; a hint
    that cannot change any value. Where free memory is fragmented, Linux may compact it to find 2 MiB pages
    (measured once: a median of 159 ms in a run right after 3 GB were freed; 13-16 ms in the runs around it)."""
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
    Whole blocks only; usable() must hold."""
    R, C = out.shape
    bs = C // absmax.shape[1]
    assert packed.shape == (R, C // 2) and absmax.shape[0] == R and C % bs == 0
    assert packed.stride(1) == absmax.stride(1) == out.stride(1) == 1, "rows must be contiguous"
    assert packed.dtype == torch.uint8 and absmax.dtype == torch.float32 and level.dtype == torch.float32
    f = KERNEL.lib.nf4_dequantize_f32 if out.dtype == torch.float32 else KERNEL.lib.nf4_dequantize_bf16
    level = level.contiguous()

    if R:
        f(packed.data_ptr(), packed.stride(0), absmax.data_ptr(), absmax.stride(0), level.data_ptr(),
          out.data_ptr(), out.stride(0), R, C // bs, bs, min(c_build.threads(R * C), R))
    return out
