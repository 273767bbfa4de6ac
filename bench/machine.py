"""What the machine can do, measured in the same run as a benchmark: matmul rate and resident memory.

Each bench script reports these next to its own figures, so numbers from different machines can be read
against each other.

Peak memory is the kernel's high-water mark of this process's resident set (pages actually in RAM,
memory-mapped file pages included); it never goes down, so to measure one step on its own, run the step
in a child process that prints its own peak (run_json). On Linux that is VmHWM from /proc/self/status,
not getrusage's ru_maxrss: ru_maxrss starts from the parent's resident size at fork/exec, so even
`/bin/true` launched from a 1 GB process reports 1 GB.
"""
import json
import os
import resource
import subprocess
import sys
import time

import torch


def matmul_gflops(dtype=torch.float32, n: int = 2048, device="cpu", seconds: float = 1.0) -> float:
    """GFLOP/s of an n×n @ n×n matmul (2n³ flops) in `dtype`, best of repeated timings over ~`seconds`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b                                                                       # warm-up
    sync()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end or best == float("inf"):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _status_kib(field: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's own peak resident memory so far, in bytes."""
    peak = _status_kib("VmHWM")
    if peak is not None:
        return peak
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024                  # macOS counts bytes, others KiB


def rss_bytes() -> int:
    """This process's resident memory now, in bytes (where /proc is missing: the peak, an upper bound)."""
    now = _status_kib("VmRSS")
    return now if now is not None else peak_rss_bytes()


def run_json(argv: list) -> dict:
    """Run a child process (stderr passes through) whose last stdout line is a JSON object; return it.
    A measuring child prints its own peak_rss_bytes() there."""
    out = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv))}: exit status {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_child(script: str, *args) -> dict:
    """run_json on `python script --child args...`: a bench script measuring one case in a fresh process."""
    return run_json([sys.executable, os.path.abspath(script), "--child", *map(str, args)])


def describe() -> str:
    """One line: CPU count, torch threads, fp32 and bf16 matmul GFLOP/s."""
    return (f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"matmul fp32 {matmul_gflops(torch.float32):.1f} GFLOP/s, bf16 {matmul_gflops(torch.bfloat16):.1f} GFLOP/s")
