"""The frozen-lm_head loss on the CPU: the "loss" path of losses.py's chunked log-probabilities.

After z = h Wᵀ, the plain code widens a [C, V] chunk of logits to fp32, takes its log-softmax, gathers the
targets, exponentiates, subtracts the one-hot targets and narrows back for ∂h = −(p − onehot) W: several
passes over the chunk, each a fresh C × V buffer. Here the C kernel (cpu/losses.c) makes three sweeps per
row, each over a row that stays in cache, in place in one [C, V] logits buffer reused by every chunk (a
fresh buffer that size is fresh pages from the kernel each time, whose faults cost more than the work).
losses.py's _FrozenHeadTokenLogps calls it per chunk; its plain branch is the code this is held to
(tests/cpu/test_losses_cpu.py).
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


_buffers = {}   # dtype → the [C, V] logits buffer every chunk reuses (fresh pages would cost more than the work)


def token_logps_chunk(h, lm_head_weight, y, need_grad: bool):
    """One chunk of losses._FrozenHeadTokenLogps.forward: for h [n, D], lm_head [V, D] (one dtype, fp32 or
    bf16) and targets y [n], returns log p(y) [n] fp32 and, with need_grad, p − onehot(y) [n, V] in h's
    dtype (a view of a buffer the next call overwrites). z = h Wᵀ goes straight into that buffer."""
    (n, D), V = h.shape, lm_head_weight.shape[0]
    z = _buffers.get(h.dtype)
    if z is None or z.shape[0] < n or z.shape[1] != V:
        z = _buffers[h.dtype] = h.new_empty(n, V)
    z = z[:n]                                                             # [n, V]
    torch.mm(h, lm_head_weight.t(), out=z)                                # z = h Wᵀ in h's dtype
    logp = token_logp_grad(z, y, torch.empty(n, dtype=torch.float32), need_grad)   # z ← p − onehot(y)
    return logp, z
