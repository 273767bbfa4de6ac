"""The "nf4" path's C kernel (cpu/nf4.c via cpu/nf4.py) against the plain code of lora/nf4.py, bit for bit: whole
weights and the tiles of W the 4-bit product uses; and the build and fallback rules of cpu/build.py."""
import ctypes
import os
import platform
import shutil

import pytest
import torch

from cpu import build as c_build
import cpu
from cpu import nf4 as cpu_nf4
from kernel_checks import at_thread_counts, needs_kernels, portable_build
from lora.nf4 import BLOCK_SIZES, NF4_CODE, quantize_nf4

pytestmark = needs_kernels


def reference(q, dtype, monkeypatch):
    """NF4Tensor.dequantize's plain code (the "nf4" path off)."""
    with monkeypatch.context() as m:
        m.setenv("BEZOAR_C_KERNELS", "-nf4")
        assert not cpu.enabled("nf4", torch.empty(0, dtype=dtype))
        return q.dequantize(dtype)


def usable(dtype, device="cpu"):
    return cpu.enabled("nf4", torch.empty(0, dtype=dtype, device=device))


def test_the_kernel_builds_wherever_there_is_a_c_compiler():
    assert shutil.which("cc"), "CI machines have a C compiler; without one the torch path is the only path"
    assert cpu_nf4.KERNEL.lib is not None, cpu_nf4.KERNEL.status
    assert cpu_nf4.KERNEL.status.startswith("C kernel ")
    assert usable(torch.float32) and usable(torch.bfloat16)
    assert not usable(torch.float16) and not usable(torch.float32, "meta")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_kernel_equals_the_torch_path_bit_for_bit(dtype, block_size, monkeypatch):
    torch.manual_seed(block_size)
    for shape in [(96, 320), (37, 129), (5000,), (3, 7)]:   # whole blocks; a short last block; odd counts
        w = torch.randn(shape) * torch.logspace(-3, 3, shape[-1])       # absmax over six decades
        for double_quant in (True, False):
            q = quantize_nf4(w, block_size=block_size, double_quant=double_quant)
            got, want = q.dequantize(dtype), reference(q, dtype, monkeypatch)
            assert got.dtype == dtype and got.shape == w.shape
            assert torch.equal(got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                               want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_huge_and_zero_blocks_round_as_torch_does(dtype, monkeypatch):
    w = torch.randn(8, 64)
    w[0] = 0                                        # a zero block: absmax clamped, every value 0
    w[1] *= 1e-38                                   # subnormal products
    w[2] *= 1e38                                    # near fp32's top
    w[3, 5] = 3.4e38
    w[4] = torch.tensor([1.0, -1.0] * 32) * (1 + 2**-9)   # products on bf16 rounding ties
    q = quantize_nf4(w, block_size=64, double_quant=False)
    got, want = q.dequantize(dtype), reference(q, dtype, monkeypatch)
    assert torch.equal(got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def test_blocks_split_between_threads_give_the_same_result(monkeypatch):
    torch.manual_seed(0)
    q = quantize_nf4(torch.randn(512, 1024))        # 8192 blocks
    monkeypatch.setattr(c_build, "MIN_PARALLEL", 1000)
    one, three = at_thread_counts(lambda: q.dequantize(torch.float32))   # 3: uneven shares of 512 rows
    assert torch.equal(one, three) and torch.equal(one, reference(q, torch.float32, monkeypatch))


def test_disabled_or_without_a_compiler_the_torch_path_is_used(monkeypatch, tmp_path):
    monkeypatch.setenv("BEZOAR_CACHE", str(tmp_path))
    monkeypatch.setenv("BEZOAR_C_KERNELS", "0")                   # read at every use: off at once, on again after
    assert cpu_nf4.KERNEL.lib is None and "BEZOAR_C_KERNELS=0" in cpu_nf4.KERNEL.status
    assert not usable(torch.float32)
    monkeypatch.setenv("BEZOAR_C_KERNELS", "-nf4")                # this path off, the others on
    assert not usable(torch.float32) and cpu.enabled("lora", torch.empty(0))
    monkeypatch.delenv("BEZOAR_C_KERNELS")
    assert usable(torch.float32)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    lib, status = cpu_nf4.KERNEL.build()
    assert lib is None and "no C compiler" in status and "torch path" in status
    assert list(tmp_path.iterdir()) == []


def test_a_build_is_cached_under_a_key_of_source_flags_compiler_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("BEZOAR_CACHE", str(tmp_path))
    lib, status = cpu_nf4.KERNEL.build()
    assert lib is not None, status
    built = sorted(p.name for p in tmp_path.iterdir())
    assert len(built) == 1 and built[0].startswith("nf4-") and built[0].endswith(".so")
    mtime = (tmp_path / built[0]).stat().st_mtime_ns
    cpu_nf4.KERNEL.build()                          # a second build reuses the file
    assert sorted(p.name for p in tmp_path.iterdir()) == built
    assert (tmp_path / built[0]).stat().st_mtime_ns == mtime
    monkeypatch.setattr(c_build, "cpu_flags", lambda: "flags : another cpu")
    cpu_nf4.KERNEL.build()                          # another CPU: another build beside it
    assert len(list(tmp_path.iterdir())) == 2
    if platform.machine() == "x86_64":              # BEZOAR_MARCH: a build for another target, beside them
        monkeypatch.setenv("BEZOAR_MARCH", "x86-64-v3")
        lib, status = cpu_nf4.KERNEL.build()
        assert lib is not None, status
        assert len(list(tmp_path.iterdir())) == 3


def test_a_change_to_an_included_header_rebuilds_the_kernel(monkeypatch, tmp_path):
    """The cache key covers the project headers a source includes (kernels.h), not the .c file alone."""
    monkeypatch.setenv("BEZOAR_CACHE", str(tmp_path / "cache"))
    (tmp_path / "k.h").write_text("static inline int one(void) { return 1; }\n")
    (tmp_path / "k.c").write_text('#include "k.h"\nvoid f(int *out) { *out = one(); }\n')
    kernel = c_build.Kernel(str(tmp_path / "k.c"), {"f": [ctypes.c_void_p]})
    assert kernel.build()[0] is not None
    (tmp_path / "k.h").write_text("static inline int one(void) { return 2; }\n")
    lib, status = kernel.build()
    out = ctypes.c_int(0)
    lib.f(ctypes.byref(out))
    assert out.value == 2 and len(list((tmp_path / "cache").iterdir())) == 2
    assert b"exp_poly" in c_build.source_text(cpu_nf4.SOURCE)                  # via kernels.h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_portable_c_path_equals_the_torch_path_too(dtype, monkeypatch, tmp_path):
    """The plain-C loop that CPUs without AVX-512 run, built here for a baseline x86-64 (or this machine's
    default target elsewhere)."""
    torch.manual_seed(1)
    q = quantize_nf4(torch.randn(70, 300) * torch.logspace(-3, 3, 300))
    want = reference(q, dtype, monkeypatch)
    with portable_build(cpu_nf4.KERNEL, monkeypatch, tmp_path):
        got = q.dequantize(dtype)
    assert torch.equal(got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiles_of_rows_and_of_columns_equal_the_torch_path(dtype, monkeypatch):
    """dequantize_tile (the 4-bit product's forward and backward tiles) reads strided rows in place."""
    torch.manual_seed(2)
    q = quantize_nf4(torch.randn(48, 384))
    absmax = q.block_absmax()
    for rows, cols in [(slice(0, 48), slice(0, 384)), (slice(5, 29), slice(0, 384)),
                       (slice(0, 48), slice(128, 320)), (slice(7, 8), slice(64, 128))]:
        got = cpu_nf4.dequantize_tile(q, rows, cols, dtype, absmax)
        assert got.dtype == dtype and torch.equal(got, reference(q, dtype, monkeypatch)[rows, cols])


def test_tiles_follow_the_formula_level_times_absmax():
    """As tests/test_nf4.py writes the formula out: unpack nibbles (high first), look up levels, scale by the
    double-quantised block absmax; each tile one rounding of the fp32 product to bf16."""
    w = torch.randn(40, 192, generator=torch.Generator().manual_seed(2)) * 0.02
    q = quantize_nf4(w, double_quant=True)
    codes = torch.stack([q.packed.view(-1) >> 4, q.packed.view(-1) & 15], dim=1).view(-1)   # [n]
    nb = q.absmax.numel()                                           # absmax j is in nested block j // 256
    absmax = q.nested_code[q.absmax.long()] * q.nested_absmax.repeat_interleave(256)[:nb] + q.offset
    expected = (NF4_CODE[codes.long()].view(-1, 64) * absmax[:, None]).view(w.shape)
    for rows, cols in [(slice(0, 40), slice(0, 192)), (slice(3, 17), slice(64, 192)), (slice(39, 40), slice(0, 64))]:
        assert torch.equal(cpu_nf4.dequantize_tile(q, rows, cols, torch.bfloat16), expected[rows, cols].bfloat16())


def test_huge_pages_are_asked_for_the_aligned_inside_of_large_cpu_tensors_only():
    import sys
    small, big = torch.empty(1000), torch.empty(10 << 20)                   # 4 KB, 40 MiB
    assert cpu_nf4.advise_huge_pages(small) == 0
    advised = cpu_nf4.advise_huge_pages(big)
    if sys.platform.startswith("linux"):
        h = cpu_nf4.HUGE_PAGE
        assert advised % h == 0 and big.numel() * 4 - 2 * h <= advised <= big.numel() * 4
    else:
        assert advised == 0
    big.fill_(1.5)                                                           # still ordinary memory
    assert big.sum().item() == 1.5 * big.numel()


def test_the_kernels_run_on_torchs_own_openmp_runtime():
    """Built with -fopenmp, each library links libgomp.so.1 by name, and the loader hands it the copy torch
    already loaded: no second libgomp.so.1 (say, the system's) is mapped, so the kernels' parallel loops run
    on torch's thread pool (Linux with torch's GNU OpenMP). Other wheels may bring their own renamed copies
    (sentencepiece's libgomp-<hash>.so.1): those are theirs, under another name."""
    import sys
    from cpu import dropout, losses, rmsnorm
    for kernel in (cpu_nf4.KERNEL, dropout.KERNEL, rmsnorm.KERNEL, losses.KERNEL):
        assert kernel.lib is not None, kernel.status
    if not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("the runtime check reads /proc/self/maps and applies to torch built with GNU OpenMP")
    with open("/proc/self/maps") as f:
        runtimes = {line.split()[-1] for line in f if line.split()[-1].rsplit("/", 1)[-1].startswith("libgomp.so")}
    assert len(runtimes) == 1 and os.path.dirname(os.path.realpath(torch.__file__)) in runtimes.pop(), runtimes


def test_a_forked_child_with_one_thread_dequantizes_after_its_parent_ran_threads(monkeypatch):
    """GNU OpenMP's threads do not survive fork(), for torch's operators and these kernels alike; a forked
    worker that sets one thread (as torch's DataLoader workers do) runs every kernel on its own thread.

    The child hands back bytes, not a tensor: torch's pickler would copy a tensor into shared memory with an
    OpenMP loop of the parent's thread count."""
    import multiprocessing as mp
    monkeypatch.setattr(c_build, "MIN_PARALLEL", 16)
    torch.manual_seed(3)
    q = quantize_nf4(torch.randn(64, 1024))
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = q.dequantize(torch.float32)                      # the parent's OpenMP threads now exist
        ctx = mp.get_context("fork")
        with ctx.Pool(1) as pool:
            got = pool.apply_async(_dequantize_in_child, (q,)).get(timeout=60)
    finally:
        torch.set_num_threads(prev)
    assert got == want.numpy().tobytes()


def _dequantize_in_child(q):
    torch.set_num_threads(1)
    return q.dequantize(torch.float32).numpy().tobytes()
