"""The "rms_norm" path: RMSNorm (model/llama.py) as an autograd Function whose forward and ∂x are one sweep each
of cpu/rmsnorm.c.

Why. In torch ops RMSNorm is a chain of elementwise passes, each through a new buffer: it casts to fp32 and
back around a reduction and a handful of products, and as many again in backward. On the CPU these passes
are bound by memory traffic, so one sweep that reads each input once and writes each output once replaces
them, and the Function keeps less for backward than autograd through the composition does.

Values. Arithmetic in fp32, rounded where the plain code rounds, so the path equals model/llama.py's RMSNorm
up to float rounding (tests/cpu/test_rms_norm_kernel.py states the tolerance). model/llama.py calls it only
where cpu.enabled says so (cpu/__init__.py: the switch BEZOAR_C_KERNELS, CPU tensors in one dtype, fp32 or
bf16, the library built); its plain code runs everywhere else, so nothing here falls back to torch.

Shapes: D hidden; "..." any leading dims.
"""
import ctypes
import os

import torch

from cpu import build

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rmsnorm.c")
PTR, INT64, FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
THREADS = ctypes.c_int32
FORWARD_ARGS = [PTR, PTR, PTR, PTR, INT64, INT64, FLOAT, THREADS]     # x, w, y, r, rows, D, eps
BACKWARD_ARGS = [PTR, PTR, PTR, PTR, PTR, INT64, INT64, THREADS]      # x, w, r, ∂y, ∂x, rows, D
KERNEL = build.Kernel(SOURCE, {
    "rmsnorm_forward_f32": FORWARD_ARGS, "rmsnorm_forward_bf16": FORWARD_ARGS,
    "rmsnorm_backward_f32": BACKWARD_ARGS, "rmsnorm_backward_bf16": BACKWARD_ARGS})
DTYPE_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


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


# --- the autograd Function -------------------------------------------------------------------------------

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
