"""The frozen-lm_head loss on the CPU: the "loss" path of losses.py's chunked log-probabilities.

After z = h Wᵀ, the plain code widens a [C, V] chunk of logits to fp32, takes its log-softmax, gathers the
targets, exponentiates, subtracts the one-hot targets and narrows back for ∂h = −(p − onehot) W: several
passes over the chunk, each a fresh C × V buffer. Here the C kernel (cpu/losses.c) makes three sweeps per
row, each over a row that stays in cache, in place in one [C, V] logits buffer reused by every chunk (a
fresh buffer that size is fresh pages from the kernel each time, whose faults cost more than the work).
losses.py's _FrozenHeadTokenLogps is the plain code it is held to (tests/cpu/test_losses_cpu.py).
"""
import ctypes
import os

import torch

from cpu import build

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "losses.c")
_ARGS = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32,
         ctypes.c_int32]
KERNEL = build.Kernel(SOURCE, {"token_logp_grad_f32": _ARGS, "token_logp_grad_bf16": _ARGS})


def token_logp_grad(z, y, logp, write_grad: bool = True):
    """For logits z [n, V] (contiguous, fp32 or bf16) and targets y [n]: logp [n] fp32 ← log softmax(z)[y];
    with write_grad, z ← p − onehot(y) in place (in z's dtype). Returns logp."""
    n, V = z.shape
    assert z.is_contiguous() and logp.dtype == torch.float32 and logp.is_contiguous() and y.shape == (n,)
    y = y.to(torch.int64).contiguous()
    f = KERNEL.lib.token_logp_grad_f32 if z.dtype == torch.float32 else KERNEL.lib.token_logp_grad_bf16
    f(z.data_ptr(), y.data_ptr(), logp.data_ptr(), n, V, int(write_grad), min(build.threads(z.numel()), max(n, 1)))
    return logp


class FrozenHeadTokenLogps(torch.autograd.Function):
    """losses._FrozenHeadTokenLogps with the C kernel: the same values up to float rounding."""

    @staticmethod
    def forward(ctx, h, lm_head_weight, y, need_grad, chunk_size):            # [N, D], [V, D], [N]
        (N, D), V = h.shape, lm_head_weight.shape[0]
        C = max(1, min(chunk_size, N))
        z = h.new_empty(C, V)                                                 # [C, V] logits, then p − onehot
        token_logps = torch.empty(N, dtype=torch.float32, device=h.device)    # [N]
        dh = h.new_empty(N, D) if need_grad else None                         # [N, D] ∂ log p(y)/∂h
        for i in range(0, N, C):
            n = min(C, N - i)
            torch.mm(h[i:i + n], lm_head_weight.t(), out=z[:n])               # z = h Wᵀ in h's dtype
            token_logp_grad(z[:n], y[i:i + n], token_logps[i:i + n], need_grad)   # z ← p − onehot(y)
            if need_grad:
                torch.mm(z[:n], lm_head_weight, out=dh[i:i + n]).neg_()       # [n, D]
        ctx.save_for_backward(dh)
        return token_logps

    @staticmethod
    def backward(ctx, grad):                                                   # [N]
        (dh,) = ctx.saved_tensors                                              # [N, D]
        return (dh * grad[:, None]).to(dh.dtype), None, None, None, None       # [N, D]


def frozen_head_token_logps(h, lm_head_weight, y, need_grad: bool, chunk_size: int):
    """log p(y) [N] fp32 for h [N, D] and a frozen lm_head [V, D] of h's dtype (fp32 or bf16)."""
    return FrozenHeadTokenLogps.apply(h.contiguous(), lm_head_weight.contiguous(), y, need_grad, chunk_size)
