"""The CPU fast path of four LLaMA block passes: model/block_kernel.c (RMSNorm, rotary, SwiGLU, causal
attention's softmax backward), via ctypes.

Why. In the bench step (bench/bench_sft_step.py, bf16, batch 4 × 256, hidden 512) RMSNorm's forward and
backward in torch ops took ~66 ms a step (casts to fp32 and back, a reduction, five elementwise passes, each
a new buffer), rotary embeddings ~45 ms (x·cos, a negated and concatenated copy, ·sin, a sum, and as
many again in backward, then a transposed copy for attention) and SwiGLU's silu(g) ⊙ u ~30 ms (silu and a
multiply; in backward silu's gradient and two multiplies). Each is one sweep in C. Attention's backward
(model/llama.py's CausalAttentionFunction) needs the softmax and ∂s between its products: one sweep too.

model/llama.py's torch code is the reference and the path wherever the kernels are not used: not on the CPU,
a dtype other than fp32 / bf16, a trained RMSNorm weight (∂w: only toy/base.py), BEZOAR_C_KERNELS=0, or
no compiler (c_build.py builds and caches the library).
"""
import ctypes
import math
import os
import threading

import torch

import c_build

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "block_kernel.c")
_P, _I = ctypes.c_void_p, ctypes.c_int64
_T = ctypes.c_int32                   # threads
_NORM_F = [_P, _P, _P, _P, _I, _I, ctypes.c_float, _T]
_NORM_B = [_P, _P, _P, _P, _P, _I, _I, _T]
_ROT = [_P, _I, _I, _I, _P, _I, _I, _I, _P, _P, _I, _I, _I, _I, ctypes.c_float, _T]
_GLU_F, _GLU_B = [_P, _P, _P, _I, _T], [_P, _P, _P, _P, _P, _I, _T]
_ATT_B = [_P, _P, _P, _P, _I, _I, ctypes.c_float, _T]
KERNEL = c_build.Kernel(SOURCE, {"rmsnorm_forward_f32": _NORM_F, "rmsnorm_forward_bf16": _NORM_F,
                                 "rmsnorm_backward_f32": _NORM_B, "rmsnorm_backward_bf16": _NORM_B,
                                 "rotary_f32": _ROT, "rotary_bf16": _ROT,
                                 "swiglu_forward_f32": _GLU_F, "swiglu_forward_bf16": _GLU_F,
                                 "swiglu_backward_f32": _GLU_B, "swiglu_backward_bf16": _GLU_B,
                                 "attention_softmax_backward_f32": _ATT_B, "attention_softmax_backward_bf16": _ATT_B})
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def usable(*tensors) -> bool:
    """All on the CPU in one dtype the kernels take, and the library built."""
    dtype = tensors[0].dtype
    return (all(t.device.type == "cpu" and t.dtype == dtype for t in tensors) and dtype in _SUFFIX
            and KERNEL.lib is not None)


def _fn(name, dtype):
    return getattr(KERNEL.lib, f"{name}_{_SUFFIX[dtype]}")


def rmsnorm_forward(x, weight, eps: float):
    """(y [..., D] in x's dtype, r [..., 1] fp32) for contiguous x and weight [D] in the same dtype."""
    D = x.shape[-1]
    x = x.contiguous()
    y, r = torch.empty_like(x), torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
    rows = x.numel() // D if D else 0
    _fn("rmsnorm_forward", x.dtype)(x.data_ptr(), weight.data_ptr(), y.data_ptr(), r.data_ptr(), rows, D, eps,
                                    min(c_build.threads(x.numel()), max(rows, 1)))
    return y, r


def rmsnorm_backward(x, weight, r, grad_y):
    """∂x [..., D] in x's dtype (model/llama.py's RMSNormFunction.backward, the weight frozen)."""
    D = x.shape[-1]
    x, grad_y, r = x.contiguous(), grad_y.contiguous(), r.contiguous()
    grad_x = torch.empty_like(x)
    rows = x.numel() // D if D else 0
    _fn("rmsnorm_backward", x.dtype)(x.data_ptr(), weight.data_ptr(), r.data_ptr(), grad_y.data_ptr(),
                                     grad_x.data_ptr(), rows, D, min(c_build.threads(x.numel()), max(rows, 1)))
    return grad_x


def rotary(x, cos, sin, out, sign: float):
    """Rotate x's pairs of dims by sign · angle into out (model/block_kernel.c). x and out are [B, T, H, Dh]
    views (any strides but a contiguous last dim: [B, H, T, Dh] tensors are passed transposed), cos and sin
    [B, 1, T, Dh] contiguous. Returns out."""
    B, T, H, Dh = x.shape
    assert x.stride(3) == out.stride(3) == 1 and cos.is_contiguous() and sin.is_contiguous()
    cos, sin = cos.expand(B, 1, T, Dh).contiguous(), sin.expand(B, 1, T, Dh).contiguous()
    _fn("rotary", x.dtype)(x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), out.data_ptr(), out.stride(0),
                           out.stride(1), out.stride(2), cos.data_ptr(), sin.data_ptr(), B, T, H, Dh, sign,
                           min(c_build.threads(x.numel()), max(B * T, 1)))
    return out


def swiglu_forward(gate, up):
    """silu(gate) ⊙ up, a new tensor, for gate and up of one shape and dtype."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    _fn("swiglu_forward", gate.dtype)(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(),
                                      c_build.threads(gate.numel()))
    return out


def swiglu_backward(gate, up, grad_out):
    """(∂gate, ∂up) of silu(gate) ⊙ up."""
    gate, up, grad_out = gate.contiguous(), up.contiguous(), grad_out.contiguous()
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    _fn("swiglu_backward", gate.dtype)(gate.data_ptr(), up.data_ptr(), grad_out.data_ptr(), grad_gate.data_ptr(),
                                       grad_up.data_ptr(), gate.numel(), c_build.threads(gate.numel()))
    return grad_gate, grad_up


def attention_softmax_backward(s, dp, P, dS, scale: float):
    """Causal attention's softmax backward (model/block_kernel.c) for heads [G, T, T]: from the fp32 scores
    s = q kᵀ (overwritten) and ∂p = ∂y vᵀ, writes P = softmax(scale · s) and dS = ∂(scale · s) in P's dtype,
    zero above the diagonal. All contiguous; P and dS may be s and dp (fp32)."""
    G, T, _ = s.shape
    assert s.dtype == dp.dtype == torch.float32 and all(t.is_contiguous() for t in (s, dp, P, dS))
    _fn("attention_softmax_backward", P.dtype)(s.data_ptr(), dp.data_ptr(), P.data_ptr(), dS.data_ptr(), G * T, T,
                                               scale, min(c_build.threads(s.numel()), max(G * T, 1)))


_workspaces = threading.local()


def workspace(*specs):
    """Tensors of the given (shape, dtype) specs, laid out one after another in this thread's workspace: a
    buffer kept from call to call, grown when too small. Why: a fresh buffer above glibc's mmap threshold is
    fresh pages, and their faults cost more than the work done in them (attention's forward and backward at
    the bench shape, bf16: 12 ms a layer in fresh buffers, 7 in this one). Valid until the next call on the same thread."""
    sizes = [math.prod(shape) * torch.finfo(dtype).bits // 8 for shape, dtype in specs]
    buf = getattr(_workspaces, "buf", None)
    if buf is None or buf.numel() < sum(sizes):
        buf = _workspaces.buf = torch.empty(sum(sizes), dtype=torch.uint8, device="cpu")
    out, at = [], 0
    for (shape, dtype), size in zip(specs, sizes):
        out.append(buf[at:at + size].view(dtype).view(shape))
        at += size
    return out
