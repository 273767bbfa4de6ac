"""The "lora" path: LoRALinear's base + adapter product (lora/layers.py) as one autograd node, LoRAFunction, with
its gradients written out and cpu/dropout.py's counter-based mask (α = scaling / (1 − p'), m the keep mask):
    forward    h = (x ⊙ m) Aᵀ                    y = x Wᵀ + α h Bᵀ            (one addmm in place)
    backward   ∂B = α ∂yᵀ h      ∂h = ∂y B      ∂A = α ∂hᵀ (x ⊙ m)      ∂x = ∂y W + α (∂h A) ⊙ m

Why. The plain composition, base(x) + F.linear(F.linear(nn.Dropout(x), A), B) · scaling, keeps x, the mask and
the dropped x for backward, and casts A's and B's gradients twice. This node keeps x ⊙ m and h only (∂W is not
needed, so backward never uses x itself). Its mask is a function of one seed drawn from torch's CPU generator
per call and of each element's index, so x ⊙ m is one pass of a C kernel, and backward recomputes m from the
seed instead of keeping it; nn.Dropout's mask is several passes (draw uniforms, compare, multiply) and is kept.
The two masks differ (another generator), with the same law up to p' = round(p · 2¹⁶) / 2¹⁶ for p; both replay
under torch.manual_seed and activation checkpointing's RNG restore.

An NF4 base takes the "nf4" path's tiles and kept small W (cpu/nf4.py) where that path is on, else the plain
dequantisation, again in backward. tests/cpu/test_fast_paths.py holds this node to the plain composition,
to the formula with its own mask, and to finite differences (gradcheck).

Shapes: M tokens (all leading dims of x flattened), K in_features, N out_features, r rank.
"""
import torch

import cpu                     # (cpu/__init__.py imports this module: cpu.enabled is looked up at call time)
from cpu import dropout, nf4


def base_forward(x, W, keep: bool):
    """(x Wᵀ [M, N], what backward needs of W) for x [M, K] and the frozen W: a dense [N, K] tensor (itself),
    or an NF4Tensor (a dequantised W kept for backward, or None: dequantised again)."""
    if isinstance(W, torch.Tensor):
        return x @ W.t(), W
    if cpu.enabled("nf4", x):
        return nf4.nf4_linear(x, W, keep)
    return x @ W.dequantize(x.dtype).t(), None


def base_grad_input(grad_y, W, kept):
    """∂x = ∂y W [M, K] for ∂y [M, N]; kept: what base_forward returned for backward."""
    if isinstance(W, torch.Tensor):
        return grad_y @ W
    if kept is not None or cpu.enabled("nf4", grad_y):
        return nf4.nf4_linear_grad_input(grad_y, W, kept)
    return grad_y @ W.dequantize(grad_y.dtype)


class LoRAFunction(torch.autograd.Function):
    """y = x Wᵀ + α ((x ⊙ m) Aᵀ) Bᵀ for x [M, K] (contiguous), the frozen W (NF4Tensor or dense [N, K]),
    A [r, K], B [N, r], the keep mask m of cpu/dropout.py for (seed, p) (seed None: no dropout, m = 1),
    α = scaling / (1 − p'); in x's dtype except A, B (cast here, gradients returned in their dtype).
    Gradients as in the module docstring."""

    @staticmethod
    def forward(ctx, x, A, B, W, seed, p, alpha):
        A_, B_ = A.to(x.dtype), B.to(x.dtype)                                 # [r, K], [N, r]
        y, kept = base_forward(x, W, keep=ctx.needs_input_grad[0])           # [M, N]; W is needed for ∂x only
        xm = x if seed is None else dropout.select(x, seed, p)               # [M, K] x ⊙ m
        h = xm @ A_.t()                                                       # [M, r]
        y.addmm_(h, B_.t(), alpha=alpha)                                      # y += α h Bᵀ
        ctx.W, ctx.seed, ctx.p, ctx.alpha, ctx.A_dtype, ctx.B_dtype = W, seed, p, alpha, A.dtype, B.dtype
        ctx.save_for_backward(xm, h, A_, B_, kept)
        return y

    @staticmethod
    def backward(ctx, grad_y):                                                # [M, N]
        xm, h, A_, B_, kept = ctx.saved_tensors                               # [M, K], [M, r]
        alpha = ctx.alpha
        grad_y = grad_y.contiguous()
        grad_h = grad_y @ B_                                                  # [M, r] ∂h / α
        grad_A = grad_B = grad_x = None
        if ctx.needs_input_grad[2]:
            grad_B = (grad_y.t() @ h).mul_(alpha).to(ctx.B_dtype)             # [N, r] α ∂yᵀ h
        if ctx.needs_input_grad[1]:
            grad_A = (grad_h.t() @ xm).mul_(alpha).to(ctx.A_dtype)            # [r, K] α ∂hᵀ (x ⊙ m)
        if ctx.needs_input_grad[0]:
            grad_x = base_grad_input(grad_y, ctx.W, kept)                     # [M, K] ∂y W
            if ctx.seed is None:
                grad_x.addmm_(grad_h, A_, alpha=alpha)                        # + α ∂h A
            else:
                grad_hA = grad_h @ A_                                         # [M, K]
                grad_x.add_(dropout.select(grad_hA, ctx.seed, ctx.p, out=grad_hA), alpha=alpha)  # + α (∂h A) ⊙ m
        return grad_x, grad_A, grad_B, None, None, None, None


def lora_linear(x, W, A, B, scaling: float, p: float = 0.0):
    """y [..., N] = x Wᵀ + dropout(x) Aᵀ Bᵀ · scaling for x [..., K], the frozen W (a dense [N, K] tensor or an
    NF4Tensor, in x's dtype once dequantised), A [r, K], B [N, r] (cast to x's dtype); p: the dropout
    probability in effect (0 in eval mode). One seed is drawn from torch's CPU generator where p > 0."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()                              # [M, K]
    seed = dropout.draw_seed() if p > 0 else None
    alpha = scaling / dropout.keep_probability(p)                             # 1 / (1 − p'): inverted dropout
    W = W.detach() if isinstance(W, torch.Tensor) else W
    y = LoRAFunction.apply(x2, A, B, W, seed, p, alpha)                       # [M, N]
    return y.view(*x.shape[:-1], y.shape[-1])                                 # [..., N]
