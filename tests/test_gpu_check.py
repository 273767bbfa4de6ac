"""bench/gpu_check.py without a GPU: its CPU half runs, its checks pass, and it says in one line that it stopped there.

The CPU half is what keeps `make gpu-check` working between GPU runs: the references the GPU half compares with,
bitsandbytes' CPU quantize_4bit / dequantize_4bit against ours, and one tiny SFT step and one tiny packed DPO
step through the functions the GPU half's children call. CUDA_VISIBLE_DEVICES is emptied, so that on a machine
with a GPU this test still runs the CPU half only (the GPU half takes minutes).
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA_LINE = "gpu-check: no CUDA device here; ran the CPU half only"


def test_cpu_half_runs_its_checks_and_exits_0():
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")   # BEZOAR_C_KERNELS passes through
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stdout
    assert lines[0].startswith("versions: torch "), out.stdout
    assert sum(line.startswith(NO_CUDA_LINE) for line in lines) == 1 and lines[-1].startswith(NO_CUDA_LINE), out.stdout
    assert not [line for line in lines if line.startswith("FAIL")], out.stdout
    ok = [line for line in lines if line.startswith("ok  ")]
    for what in ("sft_loss_chunked against sft_loss on cpu", "bitsandbytes dequantize_4bit on cpu",
                 "bitsandbytes quantize_4bit on cpu", "tiny SFT step on cpu", "tiny packed DPO step on cpu"):
        assert any(what in line for line in ok), f"no ok line for {what!r}:\n{out.stdout}"
