"""What the C-kernel tests share: one computation under several torch thread counts, and a kernel library
built for a baseline CPU (the plain-C loops that CPUs without AVX-512 run) swapped in for a while."""
import contextlib
import platform

import pytest
import torch

from cpu import build as c_build

# A test of a CPU speed path itself (a C kernel against its formula, its threads, its build). The suite runs
# twice (Makefile `test`): with the speed paths on, where these run, and with BEZOAR_C_KERNELS=0, where the
# rest of the suite tests the torch code alone and these are skipped.
needs_kernels = pytest.mark.skipif(not c_build.enabled(), reason="a CPU speed path's own test: runs in the pass "
                                   "with BEZOAR_C_KERNELS on")


def at_thread_counts(fn, counts=(1, 3)):
    """[fn() under torch.set_num_threads(n) for n in counts] (3 threads: uneven shares); the count restored."""
    prev = torch.get_num_threads()
    try:
        results = []
        for n in counts:
            torch.set_num_threads(n)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(prev)


@contextlib.contextmanager
def portable_build(kernel, monkeypatch, tmp_path):
    """Inside the block, `kernel` (a c_build.Kernel) runs a build without -march=native: for x86-64-v2 on
    x86-64, the compiler's default target elsewhere; cached under tmp_path."""
    native = kernel.lib, kernel.status
    monkeypatch.setenv("BEZOAR_CACHE", str(tmp_path))
    march = ["-march=x86-64-v2"] if platform.machine() == "x86_64" else []
    monkeypatch.setattr(kernel, "flags", [f for f in c_build.FLAGS if f != "-march=native"] + march)
    lib, status = kernel.build()
    assert lib is not None, status
    kernel.set(lib, status)
    try:
        yield
    finally:
        kernel.set(*native)
