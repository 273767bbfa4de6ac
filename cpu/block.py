"""The "rms_norm", "rotary", "swiglu" and "attention" paths: four passes of a LLaMA block (model/llama.py), each
an autograd Function whose forward and backward are one sweep of cpu/block.c.

Why. In torch ops each of the first three is a chain of elementwise passes, each through a new buffer: RMSNorm
casts to fp32 and back around a reduction and a handful of products (and as many again in backward); rotary
embeddings make x·cos, a negated and concatenated copy of x, its product with sin and their sum, and then a
transposed copy for attention's layout; SwiGLU is silu and a product, and in backward silu's gradient and two
more products. On the CPU these passes are bound by memory traffic, so one sweep that reads each input once
and writes each output once replaces them all. Each Function also keeps less for backward than autograd through
the composition does. Causal attention's forward is SDPA's; SDPA's fused backward on the CPU is several times
slower than its forward in bf16, while written out it is three batched products around one sweep (the
softmax and ∂s), in buffers kept from call to call (workspace).

Values. Arithmetic in fp32; bf16 results are rounded once where the composition rounds several times, so the
paths equal model/llama.py's plain code up to float rounding (tests/cpu/test_block_kernels.py states each
tolerance). model/llama.py calls a path only where cpu.enabled says so (cpu/__init__.py: the switch
BEZOAR_C_KERNELS, CPU tensors in one dtype, fp32 or bf16, the library built); its plain code runs everywhere
else, so nothing here falls back to torch.

Shapes: B batch, T tokens, H heads, Dh head dim, D hidden, F MLP width; G heads at a time in attention.
"""
import ctypes
import math
import os
import threading

import torch
import torch.nn.functional as F

from cpu import build

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "block.c")
PTR, INT64, FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
THREADS = ctypes.c_int32
RMSNORM_FORWARD_ARGS = [PTR, PTR, PTR, PTR, INT64, INT64, FLOAT, THREADS]     # x, w, y, r, rows, D, eps
RMSNORM_BACKWARD_ARGS = [PTR, PTR, PTR, PTR, PTR, INT64, INT64, THREADS]      # x, w, r, ∂y, ∂x, rows, D
ROTARY_ARGS = [PTR, INT64, INT64, INT64, PTR, INT64, INT64, INT64,            # x and out with 3 strides each,
               PTR, PTR, INT64, INT64, INT64, INT64, FLOAT, THREADS]          # cos, sin, B, T, H, Dh, sign
SWIGLU_FORWARD_ARGS = [PTR, PTR, PTR, INT64, THREADS]                         # g, u, out, n
SWIGLU_BACKWARD_ARGS = [PTR, PTR, PTR, PTR, PTR, INT64, THREADS]              # g, u, ∂y, ∂g, ∂u, n
ATTENTION_SOFTMAX_BACKWARD_ARGS = [PTR, PTR, PTR, PTR, INT64, INT64, FLOAT, THREADS]  # s, ∂p, P, ∂s, rows, T, scale
KERNEL = build.Kernel(SOURCE, {
    "rmsnorm_forward_f32": RMSNORM_FORWARD_ARGS, "rmsnorm_forward_bf16": RMSNORM_FORWARD_ARGS,
    "rmsnorm_backward_f32": RMSNORM_BACKWARD_ARGS, "rmsnorm_backward_bf16": RMSNORM_BACKWARD_ARGS,
    "rotary_f32": ROTARY_ARGS, "rotary_bf16": ROTARY_ARGS,
    "swiglu_forward_f32": SWIGLU_FORWARD_ARGS, "swiglu_forward_bf16": SWIGLU_FORWARD_ARGS,
    "swiglu_backward_f32": SWIGLU_BACKWARD_ARGS, "swiglu_backward_bf16": SWIGLU_BACKWARD_ARGS,
    "attention_softmax_backward_f32": ATTENTION_SOFTMAX_BACKWARD_ARGS,
    "attention_softmax_backward_bf16": ATTENTION_SOFTMAX_BACKWARD_ARGS})
DTYPE_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
ATTENTION_WORKSPACE_BYTES = 1 << 25   # bytes of [G, T, T] buffers in CausalAttention.backward (G fits in it)


def kernel(name, dtype):
    return getattr(KERNEL.lib, f"{name}_{DTYPE_SUFFIX[dtype]}")


# --- the kernels ---------------------------------------------------------------------------------------

def rmsnorm_forward(x, weight, eps: float):
    """(y [..., D] in x's dtype, r [..., 1] fp32) for x [..., D] and weight [D] in the same dtype."""
    D = x.shape[-1]
    x = x.contiguous()
    y, r = torch.empty_like(x), torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
    rows = x.numel() // D if D else 0
    kernel("rmsnorm_forward", x.dtype)(x.data_ptr(), weight.data_ptr(), y.data_ptr(), r.data_ptr(), rows, D, eps,
                                       min(build.threads(x.numel()), max(rows, 1)))
    return y, r


def rmsnorm_backward(x, weight, r, grad_y):
    """∂x [..., D] in x's dtype (RMSNorm's docstring) for x, ∂y [..., D], weight [D] and r [..., 1] fp32."""
    D = x.shape[-1]
    x, grad_y, r = x.contiguous(), grad_y.contiguous(), r.contiguous()
    grad_x = torch.empty_like(x)
    rows = x.numel() // D if D else 0
    kernel("rmsnorm_backward", x.dtype)(x.data_ptr(), weight.data_ptr(), r.data_ptr(), grad_y.data_ptr(),
                                        grad_x.data_ptr(), rows, D, min(build.threads(x.numel()), max(rows, 1)))
    return grad_x


def rotate_pairs(x, cos, sin, out, sign: float):
    """Rotate x's pairs of dims (i, i + Dh/2) by sign · angle into out. x and out are [B, T, H, Dh] views with
    any strides but a contiguous last dim ([B, H, T, Dh] tensors are passed transposed), cos and sin
    [B or 1, 1, T, Dh]. Returns out."""
    B, T, H, Dh = x.shape
    assert x.stride(3) == out.stride(3) == 1
    cos, sin = cos.expand(B, 1, T, Dh).contiguous(), sin.expand(B, 1, T, Dh).contiguous()   # [B, 1, T, Dh]
    kernel("rotary", x.dtype)(x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), out.data_ptr(), out.stride(0),
                              out.stride(1), out.stride(2), cos.data_ptr(), sin.data_ptr(), B, T, H, Dh, sign,
                              min(build.threads(x.numel()), max(B * T, 1)))
    return out


def swiglu_forward(gate, up):
    """silu(gate) ⊙ up, a new tensor, for gate and up of one shape and dtype."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    kernel("swiglu_forward", gate.dtype)(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(),
                                         build.threads(gate.numel()))
    return out


def swiglu_backward(gate, up, grad_out):
    """(∂gate, ∂up) of silu(gate) ⊙ up."""
    gate, up, grad_out = gate.contiguous(), up.contiguous(), grad_out.contiguous()
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    kernel("swiglu_backward", gate.dtype)(gate.data_ptr(), up.data_ptr(), grad_out.data_ptr(), grad_gate.data_ptr(),
                                          grad_up.data_ptr(), gate.numel(), build.threads(gate.numel()))
    return grad_gate, grad_up


def attention_softmax_backward(s, dp, P, dS, scale: float):
    """Causal attention's softmax backward for heads [G, T, T]: from the fp32 scores s = q kᵀ (overwritten) and
    ∂p = ∂y vᵀ, writes P = softmax(scale · s) and dS = ∂(scale · s) in P's dtype, zero above the diagonal. All
    contiguous; P and dS may be s and dp (fp32)."""
    G, T, _ = s.shape
    assert s.dtype == dp.dtype == torch.float32 and all(t.is_contiguous() for t in (s, dp, P, dS))
    kernel("attention_softmax_backward", P.dtype)(s.data_ptr(), dp.data_ptr(), P.data_ptr(), dS.data_ptr(), G * T,
                                                  T, scale, min(build.threads(s.numel()), max(G * T, 1)))


_workspaces = threading.local()


def workspace(*specs):
    """Tensors of the given (shape, dtype) specs, laid out one after another in this thread's workspace: a
    buffer kept from call to call, grown when too small. Why: a fresh buffer above glibc's mmap threshold is
    fresh pages, and their faults cost more than the work done in them. Valid until the next call on the
    same thread."""
    sizes = [math.prod(shape) * torch.finfo(dtype).bits // 8 for shape, dtype in specs]
    buf = getattr(_workspaces, "buf", None)
    if buf is None or buf.numel() < sum(sizes):
        buf = _workspaces.buf = torch.empty(sum(sizes), dtype=torch.uint8, device="cpu")
    out, at = [], 0
    for (shape, dtype), size in zip(specs, sizes):
        out.append(buf[at:at + size].view(dtype).view(shape))
        at += size
    return out


# --- the autograd Functions ------------------------------------------------------------------------------

class FusedRMSNorm(torch.autograd.Function):
    """RMSNorm (model/llama.py) with its gradient written out, D the last dim:
        r = 1 / sqrt(mean(x²) + eps)  [..., 1] fp32      x̂ = x r  fp32      y = w ⊙ x̂ (x̂ rounded to x's dtype)
    backward, with g = (∂y ⊙ w) in fp32 (the rounding of x̂ is the identity for gradients, as autograd
    treats a cast):
        ∂x = r g − r³ x · Σ_d(g x) / D  = r (g − x̂ mean(g x̂))         ∂w = Σ over rows of ∂y ⊙ x̂
    It keeps x (alive anyway: the residual stream) and r, not the fp32 x̂ and x² that autograd through the
    composition keeps. Forward and ∂x are one kernel sweep each; ∂w, needed only where the norm trains
    (toy/base.py), is the torch product and sum above."""

    @staticmethod
    def forward(ctx, x, weight, eps):                                     # [..., D], [D]
        y, r = rmsnorm_forward(x, weight, eps)                            # [..., D], [..., 1]
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, grad_y):                                            # [..., D]
        x, weight, r = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = rmsnorm_backward(x, weight, r, grad_y)               # [..., D]
        if ctx.needs_input_grad[1]:
            x_hat = (x.float() * r).to(x.dtype)                           # [..., D]
            grad_w = (grad_y * x_hat).reshape(-1, x.shape[-1]).sum(0)     # [D]
        return grad_x, grad_w, None


def rms_norm(x, weight, eps: float):
    """y = weight ⊙ x / sqrt(mean(x²) + eps) [..., D] for x [..., D], weight [D] (FusedRMSNorm)."""
    return FusedRMSNorm.apply(x, weight, eps)


class FusedRotary(torch.autograd.Function):
    """[B, T, H, Dh] (a projection's output) → rotated, [B, H, T, Dh] contiguous (attention's layout):
        forward   y = apply_rotary(x.transpose(1, 2), cos, sin)        (rotate each pair by its angle)
        backward  ∂x = apply_rotary(∂y, cos, −sin).transpose(1, 2)     (rotate back: a rotation's transpose)
    Each is one kernel sweep that rotates and moves in one pass."""

    @staticmethod
    def forward(ctx, x, cos, sin):                                        # [B, T, H, Dh], [B, 1, T, Dh] ×2
        B, T, H, Dh = x.shape
        x = x if x.stride(3) == 1 else x.contiguous()
        ctx.save_for_backward(cos, sin)
        out = torch.empty(B, H, T, Dh, dtype=x.dtype, device=x.device)   # [B, H, T, Dh]
        rotate_pairs(x, cos, sin, out.transpose(1, 2), 1.0)
        return out

    @staticmethod
    def backward(ctx, grad_y):                                            # [B, H, T, Dh]
        cos, sin = ctx.saved_tensors
        B, H, T, Dh = grad_y.shape
        grad_y = grad_y if grad_y.stride(3) == 1 else grad_y.contiguous()
        grad_x = torch.empty(B, T, H, Dh, dtype=grad_y.dtype, device=grad_y.device)   # [B, T, H, Dh]
        return rotate_pairs(grad_y.transpose(1, 2), cos, sin, grad_x, -1.0), None, None


def rotary(x, cos, sin):
    """Rotary embeddings of x [B, T, H, Dh] as [B, H, T, Dh] contiguous, for cos, sin [B or 1, 1, T, Dh]."""
    return FusedRotary.apply(x, cos, sin)


class FusedSwiGLU(torch.autograd.Function):
    """y = silu(g) ⊙ u, silu(g) = g σ(g), with its gradient written out:
        ∂g = ∂y ⊙ u ⊙ σ(g) (1 + g (1 − σ(g)))        ∂u = ∂y ⊙ silu(g)
    It keeps g and u (autograd through F.silu(g) * u keeps silu(g) as well). Forward and backward are one
    kernel sweep each."""

    @staticmethod
    def forward(ctx, gate, up):                                           # [..., F] ×2
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, grad_y):                                            # [..., F]
        gate, up = ctx.saved_tensors
        return swiglu_backward(gate, up, grad_y)


def swiglu(gate, up):
    """silu(gate) ⊙ up [..., F] for gate, up [..., F] (FusedSwiGLU)."""
    return FusedSwiGLU.apply(gate, up)


class CausalAttention(torch.autograd.Function):
    """y = softmax(scale · q kᵀ + causal mask) v for q, k, v [B, H, T, Dh], scale = 1/√Dh: forward is SDPA's
    fused kernel; backward is written out:
        s = q kᵀ,  p = softmax(scale · s)                   ∂v = pᵀ ∂y          ∂p = ∂y vᵀ
        ∂s = scale · p ⊙ (∂p − rowsum(p ⊙ ∂p))               ∂q = ∂s k           ∂k = ∂sᵀ q
    (rowsum(p ⊙ ∂p) = rowsum(∂y ⊙ y), FlashAttention's D). s and ∂p are products in fp32 (bf16 inputs are
    widened first, so p is as exact as SDPA's); p and ∂s are rounded to the compute dtype for the three
    products after them. The softmax and ∂s are one kernel sweep. Heads go G at a time, G so that the
    [G, T, T] buffers fit in ATTENTION_WORKSPACE_BYTES."""

    @staticmethod
    def forward(ctx, q, k, v):                                            # [B, H, T, Dh] ×3
        ctx.save_for_backward(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)    # [B, H, T, Dh]

    @staticmethod
    def backward(ctx, grad_y):                                            # [B, H, T, Dh]
        q, k, v = ctx.saved_tensors
        B, H, T, Dh = q.shape
        n = B * H
        q, k, v, dy = (t.reshape(n, T, Dh) for t in (q, k, v, grad_y))   # [n, T, Dh]
        q32, k32, v32, dy32 = (t.float() for t in (q, k, v, dy))         # the same tensors in fp32
        dq, dk, dv = (torch.empty(n, T, Dh, dtype=q.dtype, device=q.device) for _ in range(3))
        wide = q.dtype == torch.float32                                   # p and ∂s written over s and ∂p
        G = max(1, min(n, ATTENTION_WORKSPACE_BYTES // (T * T * (8 if wide else 8 + 2 * q.element_size()))))
        fp32, low = ((G, T, T), torch.float32), ((G, T, T), q.dtype)
        s, dp, *pds = workspace(fp32, fp32) if wide else workspace(fp32, fp32, low, low)
        P, dS = pds or (s, dp)                                            # [G, T, T] ×4 (or ×2 in fp32)
        for a in range(0, n, G):
            g, m = slice(a, a + G), min(G, n - a)
            torch.bmm(q32[g], k32[g].transpose(1, 2), out=s[:m])          # s = q kᵀ
            torch.bmm(dy32[g], v32[g].transpose(1, 2), out=dp[:m])        # ∂p = ∂y vᵀ
            attention_softmax_backward(s[:m], dp[:m], P[:m], dS[:m], Dh ** -0.5)
            torch.bmm(P[:m].transpose(1, 2), dy[g], out=dv[g])            # ∂v = pᵀ ∂y
            torch.bmm(dS[:m], k[g], out=dq[g])                            # ∂q = ∂s k
            torch.bmm(dS[:m].transpose(1, 2), q[g], out=dk[g])            # ∂k = ∂sᵀ q
        return dq.view(B, H, T, Dh), dk.view(B, H, T, Dh), dv.view(B, H, T, Dh)


def causal_attention(q, k, v):
    """Causal self-attention [B, H, T, Dh] for q, k, v [B, H, T, Dh] (CausalAttention)."""
    return CausalAttention.apply(q, k, v)
