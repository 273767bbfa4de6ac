"""CPU speed paths: C kernels and the code that exists only to feed them, all in this package.

The core (model/llama.py, lora/, losses.py) is plain PyTorch and is what runs on CUDA. Where a CPU path pays
for its reading cost (bench/README.md: what each one buys), the core calls it in one visible line:

    if cpu.enabled("rms_norm", x, self.weight):
        return cpu.rms_norm(x, self.weight, self.eps)
    ...the plain code...

Each path gives the plain code's values up to float rounding; its tests (tests/cpu/) hold it to that code.
BEZOAR_C_KERNELS=0 turns every path off (read at every call: cpu/build.py), and the CPU then runs exactly the
code CUDA runs; the test suite runs both ways. Deleting this package and those lines leaves a working,
slower bezoar.

    build.py    builds cpu/*.c once per machine (cached), loads them with ctypes; the switch
    kernels.h   what the kernels share: bf16 conversion, a vectorised exp
    rmsnorm.*   RMSNorm forward and backward, one sweep each
    losses.*    the frozen-lm_head loss's softmax pass
    nf4.*       NF4 dequantisation, and the tiled 4-bit matmuls built on it
    dropout.*   counter-based dropout (a mask recomputed from a seed, not stored)
    lora.py     LoRA's base + adapter product as one autograd node, on that dropout
"""
import torch

from cpu import build, dropout, losses, nf4, rmsnorm
from cpu.losses import token_logps_chunk
from cpu.lora import lora_linear
from cpu.nf4 import dequantize_nf4, nf4_linear, nf4_linear_grad_input
from cpu.rmsnorm import rms_norm

DTYPES = (torch.float32, torch.bfloat16)     # what the kernels compute in

# path name → the C kernel it needs (its library must have built here)
KERNELS = {"rms_norm": rmsnorm.KERNEL, "loss": losses.KERNEL, "nf4": nf4.KERNEL, "lora": dropout.KERNEL}


def enabled(path: str, *tensors) -> bool:
    """True where the CPU path `path` runs for these tensors: the switch leaves it on, they are all on the CPU
    in one dtype, fp32 or bf16, and its kernel built (else the core runs its plain code)."""
    dtypes = {t.dtype for t in tensors}
    return (build.enabled(path) and all(t.device.type == "cpu" for t in tensors) and len(dtypes) <= 1
            and dtypes <= set(DTYPES) and KERNELS[path].lib is not None)
