"""The CPU fast path of the frozen-lm_head loss's softmax: losses_kernel.c, through ctypes.

Why. After z = h Wᵀ, the torch code of losses._FrozenHeadTokenLogps widens a [C, V] chunk of bf16 logits to
fp32 (a 32 MB copy at C = 256), takes its softmax, gathers and logs the targets' probabilities, subtracts the
one-hot targets and narrows back to bf16 for ∂h = −(p − onehot) W: five passes over the chunk, ~11 ms a
chunk in the bench step (bench/bench_sft_step.py, bf16). The kernel makes three sweeps per row, each over a
row that stays in cache. losses.py's torch code is the reference (tests/test_losses_cpu.py) and the path
wherever the kernel is not used: not on the CPU, logits neither fp32 nor bf16, BEZOAR_C_KERNELS=0, no compiler.
"""
import ctypes
import os

import torch

import c_build

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "losses_kernel.c")
_ARGS = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32,
         ctypes.c_int32]
KERNEL = c_build.Kernel(SOURCE, {"token_logp_grad_f32": _ARGS, "token_logp_grad_bf16": _ARGS})


def usable(z) -> bool:
    return z.device.type == "cpu" and z.dtype in (torch.float32, torch.bfloat16) and KERNEL.lib is not None


def token_logp_grad(z, y, logp, write_grad: bool = True):
    """For logits z [n, V] (contiguous, fp32 or bf16) and targets y [n]: logp [n] fp32 ← log softmax(z)[y];
    with write_grad, z ← p − onehot(y) in place (in z's dtype). Returns logp."""
    n, V = z.shape
    assert z.is_contiguous() and logp.dtype == torch.float32 and logp.is_contiguous() and y.shape == (n,)
    y = y.to(torch.int64).contiguous()
    f = KERNEL.lib.token_logp_grad_f32 if z.dtype == torch.float32 else KERNEL.lib.token_logp_grad_bf16
    f(z.data_ptr(), y.data_ptr(), logp.data_ptr(), n, V, int(write_grad), min(c_build.threads(z.numel()), max(n, 1)))
    return logp
