"""The project's small C kernels (lora/*_kernel.c): built once per machine, loaded with ctypes, run on threads.

Build. The system C compiler (cc, or $CC) with -O3 -march=native, no OpenMP (threads come from Python: a
ctypes call releases the GIL, so torch.get_num_threads() threads each take a share of the work). A library is
cached in $BEZOAR_CACHE or ~/.cache/bezoar under a name that hashes its source, the flags, the compiler's
version and the CPU's flags, so a build for one CPU never runs on another; it is written to a temporary file
and renamed into place (concurrent builds are safe). Building takes about a second, once per source.

Every kernel has a torch reference beside it that computes the same values and runs wherever the kernel
cannot: BEZOAR_C_KERNELS=0, no compiler, another device or dtype.
"""
import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c11"]
# Values per thread below which a kernel runs on the calling thread alone. Handing work to Python threads
# costs tens of microseconds a call (the pool's queue, GIL hand-offs) and competes with torch's OpenMP
# threads: with a threshold of 128K-256K values, the bench SFT step (bench/bench_sft_step.py, bf16, ~500
# kernel calls on tensors of 0.3-1.4M values) took 0.67-0.73 s; with every in-step call on one thread,
# 0.52-0.55 s. Large work (a whole 8640 × 3200 weight: 27.6M values) still splits.
MIN_PER_THREAD = 1 << 21

_lock = threading.Lock()
_pool = {"threads": 0, "executor": None}


def _after_fork_in_child():
    """A forked child has none of its parent's threads: a fresh lock and pool (else the first map() waits
    forever for workers that do not exist)."""
    global _lock
    _lock = threading.Lock()
    _pool.update(threads=0, executor=None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build(source: str, signatures: dict, flags=None) -> tuple:
    """(ctypes library or None, status line) for the C file `source`; signatures: {function: argtypes}
    (every function returns void)."""
    flags = FLAGS if flags is None else flags
    name = os.path.splitext(os.path.basename(source))[0]
    if os.environ.get("BEZOAR_C_KERNELS", "1") == "0":
        return None, "disabled by BEZOAR_C_KERNELS=0; using the torch path"
    cc = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"no C compiler ({cc}: {e.__class__.__name__}); using the torch path"
    with open(source, "rb") as f:
        text = f.read()
    key = hashlib.sha256(text + " ".join(flags).encode() + version.encode() + cpu_flags().encode()).hexdigest()
    cache = os.environ.get("BEZOAR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bezoar")
    path = os.path.join(cache, f"{name}-{key[:16]}.so")
    if not os.path.exists(path):
        try:
            os.makedirs(cache, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
            os.close(fd)
            done = subprocess.run([cc, *flags, source, "-o", tmp], capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                os.unlink(tmp)
                first = (done.stderr.strip().splitlines() or ["?"])[0]
                return None, f"{cc} failed on {source}: {first}; using the torch path"
            os.replace(tmp, path)
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"could not build {source} into {cache} ({e}); using the torch path"
    lib = ctypes.CDLL(path)
    for function, argtypes in signatures.items():
        getattr(lib, function).argtypes = argtypes
        getattr(lib, function).restype = None
    return lib, f"C kernel {path}"


class Kernel:
    """One C file's library, built on first use (thread-safe); .lib is None where it is not available and
    .status says why."""

    def __init__(self, source: str, signatures: dict):
        self.source, self.signatures = source, signatures
        self.flags = None                  # None: FLAGS (tests build other variants)
        self._lib, self._status = None, None

    def build(self) -> tuple:
        return build(self.source, self.signatures, self.flags)

    @property
    def lib(self):
        with _lock:
            if self._status is None:
                self._lib, self._status = self.build()
            return self._lib

    @property
    def status(self) -> str:
        self.lib
        return self._status

    def set(self, lib, status):
        """Use this library (tests: another build of the same source)."""
        self._lib, self._status = lib, status


def executor(threads: int) -> ThreadPoolExecutor:
    """A pool of `threads` worker threads (made again when the count changes)."""
    with _lock:
        if _pool["threads"] != threads:
            _pool["executor"] = ThreadPoolExecutor(threads, thread_name_prefix="bezoar-c")
            _pool["threads"] = threads
        return _pool["executor"]


def split(n: int, min_per_thread: int, run, align: int = 1):
    """run(lo, hi) over [0, n) in torch.get_num_threads() shares of at least min_per_thread items each, the
    edges on multiples of `align`: the first share on this thread, the others on the pool's; all of it on
    this thread when one share is enough."""
    threads = max(1, min(torch.get_num_threads(), n // max(1, min_per_thread)))
    if n == 0:
        return
    if threads == 1:
        run(0, n)
        return
    edges = [min(n, n * i // threads // align * align) for i in range(threads)] + [n]
    others = [executor(threads - 1).submit(run, edges[i], edges[i + 1]) for i in range(1, threads)]
    run(edges[0], edges[1])                                # the first share on this thread
    for f in others:
        f.result()
