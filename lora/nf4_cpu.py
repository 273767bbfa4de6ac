"""The CPU fast path of NF4 dequantisation: lora/nf4_kernel.c, built once per machine, called through ctypes.

Why a C kernel. Dequantising is level[code] · absmax for every value. In eager torch that is three passes over
memory (bytes → int32 indices, a gather, a scale), and bitsandbytes' CPU backend does it in one (measured on an
8640 × 3200 weight: the torch code took 1.5× bitsandbytes' time in fp32, 1.7× in bf16). The kernel does the
same arithmetic in one pass; lora/nf4.py keeps the torch code as the reference that every result is tested
against (tests/test_nf4_cpu.py: bit for bit, fp32 and bf16, every block size) and as the path wherever the
kernel is not there.

Build. The system C compiler (cc, or $CC) with -O3 -march=native, no OpenMP (threads come from Python: a
ctypes call releases the GIL, so torch.get_num_threads() threads each take a share of the blocks). The library
is cached in $BEZOAR_CACHE or ~/.cache/bezoar under a name that hashes the source, the flags, the compiler's
version and the CPU's flags, so a build for one CPU never runs on another; it is written to a temporary file
and renamed into place (concurrent builds are safe). Building takes about a second, once.

A whole weight's output is a fresh buffer whose first touch (page faults) costs more than the kernel itself;
dequantize() asks for huge pages for it first (advise_huge_pages).

The kernel is not used, and dequantize() takes the torch path, when: BEZOAR_NF4_KERNEL=0; the tensor is not on
the CPU; the dtype is not fp32 or bf16; the block size is not a multiple of 32; or the build failed (no
compiler: `kernel_status()` says why, and bench/bench_nf4.py prints it).
"""
import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nf4_kernel.c")
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c11"]
MIN_BLOCKS_PER_THREAD = 4096          # 256K values: below that one thread is faster than starting others
HUGE_PAGE, MADV_HUGEPAGE = 2 << 20, 14  # Linux's transparent huge pages (x86-64, arm64 with 4 KiB base pages)
HUGE_PAGE_MIN_BYTES = 16 << 20        # outputs this large ask for huge pages (advise_huge_pages)

_lock = threading.Lock()
_state = {"lib": None, "status": None}
_pool = {"threads": 0, "executor": None}


def _after_fork_in_child():
    """A forked child has none of its parent's threads: a fresh lock and pool (else the first map() waits
    forever for workers that do not exist)."""
    global _lock
    _lock = threading.Lock()
    _pool.update(threads=0, executor=None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build() -> tuple:
    """(ctypes library or None, status line)."""
    if os.environ.get("BEZOAR_NF4_KERNEL", "1") == "0":
        return None, "disabled by BEZOAR_NF4_KERNEL=0"
    cc = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"no C compiler ({cc}: {e.__class__.__name__}); using the torch path"
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + version.encode() + _cpu_flags().encode()).hexdigest()
    cache = os.environ.get("BEZOAR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bezoar")
    path = os.path.join(cache, f"nf4_kernel-{key[:16]}.so")
    if not os.path.exists(path):
        try:
            os.makedirs(cache, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
            os.close(fd)
            done = subprocess.run([cc, *FLAGS, SOURCE, "-o", tmp], capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                os.unlink(tmp)
                first = (done.stderr.strip().splitlines() or ["?"])[0]
                return None, f"{cc} failed on {SOURCE}: {first}; using the torch path"
            os.replace(tmp, path)
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"could not build {SOURCE} into {cache} ({e}); using the torch path"
    lib = ctypes.CDLL(path)
    for name in ("nf4_dequantize_f32", "nf4_dequantize_bf16"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                       ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 4
        getattr(lib, name).restype = None
    return lib, f"C kernel {path}"


def kernel():
    """The loaded library, building it on first use; None when it is not available (see kernel_status())."""
    with _lock:
        if _state["status"] is None:
            _state["lib"], _state["status"] = _build()
        return _state["lib"]


def kernel_status() -> str:
    kernel()
    return _state["status"]


def usable(device, dtype, block_size: int) -> bool:
    return (torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and block_size % 32 == 0 and kernel() is not None)


def _executor(threads: int):
    with _lock:
        if _pool["threads"] != threads:
            _pool["executor"] = ThreadPoolExecutor(threads, thread_name_prefix="nf4")
            _pool["threads"] = threads
        return _pool["executor"]


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
    if "libc" not in _state:
        _state["libc"] = ctypes.CDLL(None, use_errno=True)                  # the process's own C library
        _state["libc"].madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return end - start if _state["libc"].madvise(start, end - start, MADV_HUGEPAGE) == 0 else 0


def dequantize_blocks(out, packed, absmax, level):
    """out [R, C] fp32/bf16 ← level[code] · absmax, for packed [R, C/2] uint8 and absmax [R, C/bs] fp32, each
    with unit stride along its last dim (rows may be strided: a tile of columns of a weight), level [16] fp32.
    Whole blocks only; usable() must hold."""
    R, C = out.shape
    bs = C // absmax.shape[1]
    assert packed.shape == (R, C // 2) and absmax.shape[0] == R and C % bs == 0
    assert packed.stride(1) == absmax.stride(1) == out.stride(1) == 1, "rows must be contiguous"
    assert packed.dtype == torch.uint8 and absmax.dtype == torch.float32 and level.dtype == torch.float32
    f = kernel().nf4_dequantize_f32 if out.dtype == torch.float32 else kernel().nf4_dequantize_bf16
    level = level.contiguous()

    def rows(lo, hi):                                  # the kernel on rows [lo, hi)
        f(packed[lo].data_ptr(), packed.stride(0), absmax[lo].data_ptr(), absmax.stride(0), level.data_ptr(),
          out[lo].data_ptr(), out.stride(0), hi - lo, C // bs, bs)

    threads = max(1, min(torch.get_num_threads(), R * C // bs // MIN_BLOCKS_PER_THREAD, R))
    if R == 0:
        return out
    if threads == 1:
        rows(0, R)
        return out
    edges = [R * i // threads for i in range(threads + 1)]
    list(_executor(threads).map(lambda i: rows(edges[i], edges[i + 1]), range(threads)))
    return out
