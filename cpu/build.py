"""Builds the CPU speed paths' C kernels (cpu/*.c, sharing cpu/kernels.h) once per machine, loads them with
ctypes, runs them on torch's threads; and the switch that turns the paths off.

Build. The system C compiler (cc, or $CC) with -O3 -march=native and -fopenmp ($BEZOAR_MARCH replaces native:
BEZOAR_MARCH=x86-64-v3 builds for AVX2 without AVX-512, to see on a newer CPU what an older one runs). The kernels split their loops
with OpenMP, and the library they link by name, libgomp.so.1, is the one torch's CPU wheels bring and have
already loaded, so the dynamic loader hands them torch's own runtime: the same thread pool, the same
OMP_WAIT_POLICY, no second set of threads. (Before this, Python threads took the shares: each call cost tens
of microseconds of queueing and GIL hand-offs, and the bench SFT step was faster with every kernel call on one
thread.) Where -fopenmp does not build, the library is built without it and runs on the calling thread.
A library is cached in $BEZOAR_CACHE or ~/.cache/bezoar under a name that hashes its source (with the headers
it includes), the flags, the compiler's version and the CPU's flags, so a build for one CPU never runs on another; it is written to a
temporary file and renamed into place (concurrent builds are safe). Building takes about a second, once per
source.

Like every torch operator, a kernel called with more than one thread in a process forked after its parent ran
parallel work would wait forever on threads that fork did not copy (GNU OpenMP's rule); forked workers set
torch.set_num_threads(1), as torch's DataLoader workers do.

Every kernel replaces plain PyTorch code of the core (model/llama.py, lora/, losses.py), which computes the
same values and runs wherever the kernel cannot: BEZOAR_C_KERNELS=0, no compiler, another device or dtype.
"""
import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
import threading

import torch

FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c11", "-fopenmp"]
# Values below which a kernel runs on the calling thread alone: starting a parallel region costs a few
# microseconds with OpenMP's threads awake, tens when they sleep (OMP_WAIT_POLICY=PASSIVE).
MIN_PARALLEL = 1 << 16

_lock = threading.Lock()


def enabled(path: str = None) -> bool:
    """The one switch for the CPU speed paths, BEZOAR_C_KERNELS, read at every use (not at import), so a test
    or a user can flip it in a running process:
        unset or 1      every path on
        0               every path off: the CPU runs exactly the plain PyTorch code that CUDA runs
        -name,-name     every path on but the named ones (bench/bench_fast_paths.py measures each path so)
    path None: whether any path may run."""
    value = os.environ.get("BEZOAR_C_KERNELS", "1").strip()
    if value == "0":
        return False
    if value in ("", "1") or path is None:
        return True
    off = {name.strip().lstrip("-") for name in value.split(",")}
    return path not in off


def threads(n: int) -> int:
    """How many threads a kernel call over n values gets: torch's intra-op count, or 1 for small work."""
    return torch.get_num_threads() if n >= MIN_PARALLEL else 1


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def source_text(source: str) -> bytes:
    """The bytes of a C file and of the project headers it includes (#include "..."), for the cache key: a
    change to kernels.h rebuilds every kernel that includes it."""
    with open(source, "rb") as f:
        text = f.read()
    for name in re.findall(rb'^\s*#include\s+"([^"]+)"', text, flags=re.M):
        text += source_text(os.path.join(os.path.dirname(source), name.decode()))
    return text


def build(source: str, signatures: dict, flags=None) -> tuple:
    """(ctypes library or None, status line) for the C file `source`; signatures: {function: argtypes}
    (every function returns void)."""
    if flags is None:
        march = os.environ.get("BEZOAR_MARCH", "native")
        flags = [f"-march={march}" if f == "-march=native" else f for f in FLAGS]
    name = os.path.splitext(os.path.basename(source))[0]
    cc = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"no C compiler ({cc}: {e.__class__.__name__}); using the torch path"
    text = source_text(source)
    key = hashlib.sha256(text + " ".join(flags).encode() + version.encode() + cpu_flags().encode()).hexdigest()
    cache = os.environ.get("BEZOAR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bezoar")
    path = os.path.join(cache, f"{name}-{key[:16]}.so")
    if not os.path.exists(path):
        try:
            os.makedirs(cache, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
            os.close(fd)
            done = subprocess.run([cc, *flags, source, "-o", tmp], capture_output=True, text=True, timeout=120)
            if done.returncode != 0 and "-fopenmp" in flags:               # no OpenMP here: one thread
                serial = [f for f in flags if f != "-fopenmp"] + ["-Wno-unknown-pragmas"]
                done = subprocess.run([cc, *serial, source, "-o", tmp], capture_output=True, text=True, timeout=120)
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
        """The library, or None where it is not available or the switch is off (enabled())."""
        if not enabled():
            return None
        with _lock:
            if self._status is None:
                self._lib, self._status = self.build()
            return self._lib

    @property
    def status(self) -> str:
        if not enabled():
            return "disabled by BEZOAR_C_KERNELS=0; using the torch path"
        self.lib
        return self._status

    def set(self, lib, status):
        """Use this library (tests: another build of the same source)."""
        self._lib, self._status = lib, status
