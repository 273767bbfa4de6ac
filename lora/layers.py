"""LoRA (Hu et al. 2021) on a frozen base, dense or 4-bit NF4 (QLoRA, Dettmers et al. 2023).

    y = base(x) + dropout(x) · Aᵀ · Bᵀ · α/r

        x [..., in] ─────────────► base: W frozen, [out, in] (nn.Linear, or Linear4bit: NF4) ──► (+) ─► y [..., out]
            │                                                                                  ▲
            └─► dropout ─► lora_A: A [r, in] ─► lora_B: B [out, r] ─► · scaling = α / r ─────┘

A starts Kaiming-uniform (a = √5, as nn.Linear and PEFT), B starts at zero: the adapter begins as the
identity change, y = base(x). Only A and B train; W gets no gradient and no optimizer state. Gradients
reach A, B and x. The adapter runs in x's dtype; A and B are stored in `lora_dtype` (fp32 by default, the
optimizer's master copy) and cast on the way in, as autocast does.

Linear4bit keeps W as NF4 (lora/nf4.py) and dequantises it to the compute dtype for each product, in
forward and again in backward (nothing but the NF4 weight is kept). On the CPU it never materialises all
of W: it dequantises a tile of TILE values, multiplies, and moves on:
    forward   y[:, rows]  = x · W[rows, :]ᵀ      tiles of whole rows; each y element is one K-long dot product
    backward  ∂x[:, cols] = ∂y · W[:, cols]      tiles of whole columns; each ∂x element one N-long dot product
Each element is thus one matmul's dot product, as with the whole W (no partial sums rounded to bf16).
Why tiles (bench/bench_nf4.py, torch.profiler): a whole 8640 × 3200 W is a fresh 110 MB fp32 buffer each
time, and the kernel's first touch of fresh pages costs about as much as the dequantisation itself; a
16 MiB tile comes back from the allocator already mapped. Much smaller tiles mean many small operators and
matmuls that repack x each time. On CUDA, or when rows don't split into whole blocks, W is dequantised
whole (by bitsandbytes' kernel on CUDA, with the same values) and F.linear does the rest.
A W of at most KEEP_MAX_BYTES in the compute dtype is instead dequantised whole once in forward and kept
for backward: one dequantisation fewer per step, for a dense copy of small layers only. Under activation
checkpointing the copy lives from a block's recomputation to its backward (one block's worth at a time).

The fast path (LoRALinear.forward, when x is already in the compute dtype): base and adapter are one
autograd node, LoRAFunction, with its gradients written out (α = scaling / (1 − p'), m the keep mask):
    forward    h = (x ⊙ m) Aᵀ                    y = x Wᵀ + α h Bᵀ            (one addmm in place)
    backward   ∂B = α ∂yᵀ h      ∂h = ∂y B      ∂A = α ∂hᵀ (x ⊙ m)      ∂x = ∂y W + α (∂h A) ⊙ m
It keeps x ⊙ m and h, not x (∂W is not needed, so backward never uses x itself; nn.Dropout + two F.linear
would keep x, the mask and the dropped x, and cast A and B's gradients twice). The mask is counter-based
(lora/dropout.py): a function of one seed drawn from torch's generator per call and of each element's index,
so x ⊙ m is one pass of a C kernel on the CPU, and backward recomputes m from the seed instead of keeping it
(bench shape, bf16 [1024, 512]: 0.07 ms, against 0.9 ms to draw 16-bit uniforms from torch's generator,
compare and multiply). The readable composition, y = base(x) + F.linear(F.linear(dropout(x), A), B) · scaling,
is LoRALinear.forward_reference; tests/test_fast_paths.py holds the two equal (and the formula, gradcheck).

Shapes: M tokens (all leading dims of x flattened), K in_features, N out_features, r rank.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import c_build
from lora import dropout
from lora.nf4 import NF4Tensor, bitsandbytes_cuda_problem, quantize_nf4, to_bnb_quant_state

TILE = 1 << 22     # values of W dequantised at a time on the CPU (16 MiB in fp32)
KEEP_MAX_BYTES = 1 << 22   # a dequantised W up to this size (compute dtype) is kept from forward for backward


# --- the 4-bit base -----------------------------------------------------------------------------------

def _tiled(q: NF4Tensor, x) -> bool:
    return x.device.type == "cpu" and c_build.enabled() and len(q.shape) == 2 and q.shape[1] % q.block_size == 0


def _bitsandbytes(q: NF4Tensor) -> bool:
    """True where bitsandbytes' CUDA kernels run this weight (checked once per device: lora/nf4.py)."""
    return q.device.type == "cuda" and bitsandbytes_cuda_problem(q.device) is None


def _dequantize(q: NF4Tensor, dtype):
    if _bitsandbytes(q):
        import bitsandbytes.functional as bnbF
        return bnbF.dequantize_4bit(q.packed, to_bnb_quant_state(q, dtype))
    return q.dequantize(dtype)


def nf4_linear(x, q: NF4Tensor):
    """y = x Wᵀ for x [M, K] and the NF4 weight W [N, K]; y [M, N] in x's dtype."""
    N, K = q.shape
    if not _tiled(q, x):
        return F.linear(x, _dequantize(q, x.dtype))
    absmax = q.block_absmax()                                                 # [N·K / bs] fp32
    y = torch.empty(x.shape[0], N, dtype=x.dtype, device=x.device)
    step = max(1, TILE // K)
    for a in range(0, N, step):
        w = q.dequantize_tile(slice(a, a + step), slice(0, K), x.dtype, absmax)  # [R, K]
        torch.mm(x, w.t(), out=y[:, a:a + step])                              # [M, R]
    return y


def nf4_linear_grad_input(grad_y, q: NF4Tensor):
    """∂x = ∂y W for ∂y [M, N]; [M, K] in ∂y's dtype."""
    N, K = q.shape
    if not _tiled(q, grad_y):
        return grad_y @ _dequantize(q, grad_y.dtype)
    absmax = q.block_absmax()
    grad_x = torch.empty(grad_y.shape[0], K, dtype=grad_y.dtype, device=grad_y.device)
    bs = q.block_size
    step = max(4 * bs, TILE // N // bs * bs)                                  # whole blocks
    for c in range(0, K, step):
        cols = slice(c, min(c + step, K))
        w = q.dequantize_tile(slice(0, N), cols, grad_y.dtype, absmax)        # [N, C]
        torch.mm(grad_y, w, out=grad_x[:, cols])                              # [M, C]
    return grad_x


def keeps_dequantized(q: NF4Tensor, dtype) -> bool:
    """True if forward dequantises W whole and keeps it for backward (W at most KEEP_MAX_BYTES in dtype)."""
    return q.numel * torch.finfo(dtype).bits // 8 <= KEEP_MAX_BYTES


def base_forward(x, q: NF4Tensor, keep: bool):
    """(y = x Wᵀ [M, N], W [N, K] if kept else None) for x [M, K] in the compute dtype."""
    if keep:
        W = _dequantize(q, x.dtype)                                           # [N, K]
        return x @ W.t(), W
    return nf4_linear(x, q), None


def base_grad_input(grad_y, q: NF4Tensor, W):
    """∂x = ∂y W [M, K]: with the kept W, or dequantising W again."""
    return grad_y @ W if W is not None else nf4_linear_grad_input(grad_y, q)


class NF4Matmul(torch.autograd.Function):
    """x Wᵀ with W frozen in NF4: backward dequantises W again instead of keeping a dense copy, unless W
    is small (keeps_dequantized)."""

    @staticmethod
    def forward(ctx, x, q: NF4Tensor):                                        # x [M, K]
        ctx.q = q
        y, W = base_forward(x, q, ctx.needs_input_grad[0] and keeps_dequantized(q, x.dtype))
        ctx.save_for_backward(W)
        return y

    @staticmethod
    def backward(ctx, grad_y):                                                # [M, N]
        (W,) = ctx.saved_tensors
        grad_x = base_grad_input(grad_y.contiguous(), ctx.q, W) if ctx.needs_input_grad[0] else None
        return grad_x, None


class Linear4bit(nn.Module):
    """A bias-free linear layer whose frozen weight is stored in NF4.

    Built from one full-precision weight [out, in] (any device and float dtype), which it does not keep:
    a checkpoint loader can replace nn.Linear modules one tensor at a time. compute_dtype (default: the
    weight's dtype) is the dtype of the product; the output returns to the input's dtype. `.weight` is
    the NF4Tensor, not a Parameter: it is not in state_dict() and no optimizer sees it."""

    def __init__(self, weight: torch.Tensor, compute_dtype=None, block_size: int = 64, double_quant: bool = True):
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            got = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"Linear4bit: weight is {got}, expected a 2-D [out_features, in_features] tensor")
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype or weight.dtype
        self.weight = quantize_nf4(weight.detach(), block_size, double_quant)

    def forward(self, x):                                                     # [..., K]
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear4bit: input has {x.shape[-1]} features, expected {self.in_features}")
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)                                # [M, K]
        if x2.shape[0] == 1 and not (torch.is_grad_enabled() and x.requires_grad) and _bitsandbytes(self.weight):
            # One row without gradients (a decoding step): bitsandbytes' 4-bit matrix-vector kernel reads the
            # packed codes directly instead of dequantising all of W first.
            import bitsandbytes
            state = to_bnb_quant_state(self.weight, self.compute_dtype)
            y = bitsandbytes.matmul_4bit(x2, self.weight.packed.t(), state)                         # [1, N]
        else:
            y = NF4Matmul.apply(x2, self.weight)                                                     # [M, N]
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)          # [..., N]

    def _apply(self, fn, recurse=True):
        # .to(device) / .cuda() move the NF4 tensors too; dtype casts (.half()) leave them as they are.
        probe = fn(torch.empty(0, dtype=torch.uint8, device=self.weight.device))
        self.weight = self.weight.to(probe.device)
        return super()._apply(fn, recurse)

    def dequantized_weight(self, dtype=None):
        """W [out, in] in `dtype` (default: compute dtype)."""
        return self.weight.dequantize(dtype or self.compute_dtype)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4 block_size="
                f"{self.weight.block_size}, double_quant={self.weight.double_quant}, compute_dtype={self.compute_dtype}")


# --- LoRA --------------------------------------------------------------------------------------------

class LoRAFunction(torch.autograd.Function):
    """y = x Wᵀ + α ((x ⊙ m) Aᵀ) Bᵀ for x [M, K] (contiguous), the frozen W (NF4Tensor or dense [N, K]),
    A [r, K], B [N, r], the keep mask m of lora/dropout.py for (seed, p) (seed None: no dropout, m = 1),
    α = scaling / (1 − p'); in x's dtype except A, B (cast here, gradients returned in their dtype).
    Gradients as in the module docstring."""

    @staticmethod
    def forward(ctx, x, A, B, base, seed, p, alpha):
        A_, B_ = A.to(x.dtype), B.to(x.dtype)                                 # [r, K], [N, r]
        if isinstance(base, NF4Tensor):
            keep = ctx.needs_input_grad[0] and keeps_dequantized(base, x.dtype)   # W is needed again for ∂x only
            y, W = base_forward(x, base, keep)                                # [M, N]
        else:
            y, W = x @ base.t(), base
        xm = x if seed is None else dropout.select(x, seed, p)               # [M, K] x ⊙ m
        h = xm @ A_.t()                                                       # [M, r]
        y.addmm_(h, B_.t(), alpha=alpha)                                      # y += α h Bᵀ
        ctx.base, ctx.seed, ctx.p, ctx.alpha, ctx.A_dtype, ctx.B_dtype = base, seed, p, alpha, A.dtype, B.dtype
        ctx.save_for_backward(xm, h, A_, B_, W)
        return y

    @staticmethod
    def backward(ctx, grad_y):                                                # [M, N]
        xm, h, A_, B_, W = ctx.saved_tensors                                  # [M, K], [M, r]
        alpha = ctx.alpha
        grad_y = grad_y.contiguous()
        grad_h = grad_y @ B_                                                  # [M, r] ∂h / α
        grad_A = grad_B = grad_x = None
        if ctx.needs_input_grad[2]:
            grad_B = (grad_y.t() @ h).mul_(alpha).to(ctx.B_dtype)             # [N, r] α ∂yᵀ h
        if ctx.needs_input_grad[1]:
            grad_A = (grad_h.t() @ xm).mul_(alpha).to(ctx.A_dtype)            # [r, K] α ∂hᵀ (x ⊙ m)
        if ctx.needs_input_grad[0]:
            if isinstance(ctx.base, NF4Tensor):
                grad_x = base_grad_input(grad_y, ctx.base, W)                 # [M, K] ∂y W
            else:
                grad_x = grad_y @ W
            if ctx.seed is None:
                grad_x.addmm_(grad_h, A_, alpha=alpha)                        # + α ∂h A
            else:
                grad_hA = grad_h @ A_                                         # [M, K]
                grad_x.add_(dropout.select(grad_hA, ctx.seed, ctx.p, out=grad_hA), alpha=alpha)  # + α (∂h A) ⊙ m
        return grad_x, grad_A, grad_B, None, None, None, None


def check_lora_settings(r, alpha, dropout):
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r is {r!r}, expected a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0 < alpha < math.inf):
        raise ValueError(f"LoRA alpha is {alpha!r}, expected a positive number")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (0 <= dropout < 1):
        raise ValueError(f"LoRA dropout is {dropout!r}, expected a probability in [0, 1)")


class LoRALinear(nn.Module):
    """y = base(x) + dropout(x) Aᵀ Bᵀ · alpha / r around a frozen nn.Linear (bias-free) or Linear4bit.

    Submodule names are PEFT's: base_layer, lora_A, lora_B, lora_dropout, so state-dict keys end in
    `lora_A.weight` / `lora_B.weight` and PEFT's adapter keys are a prefix away. disabled=True turns the
    adapter off (y = base(x)); see adapters.disable_adapters."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, lora_dtype=torch.float32):
        super().__init__()
        if not isinstance(base, (nn.Linear, Linear4bit)) or getattr(base, "bias", None) is not None:
            raise ValueError(f"LoRALinear: base is {type(base).__name__}, expected a bias-free nn.Linear or Linear4bit")
        check_lora_settings(r, alpha, dropout)
        self.base_layer = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=lora_dtype)   # A [r, K]
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=lora_dtype)  # B [N, r]
        self.disabled = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def dropout_p(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def forward(self, x):                                                     # [..., K]
        base = self.base_layer
        dtype = base.compute_dtype if isinstance(base, Linear4bit) else base.weight.dtype
        if self.disabled or x.dtype != dtype or x.shape[-1] != self.in_features:
            return self.forward_reference(x)                  # (and the error for a wrong width)
        x2 = x.reshape(-1, self.in_features).contiguous()                    # [M, K]
        seed, p = None, self.dropout_p
        if self.training and p > 0:
            seed = dropout.draw_seed()
        alpha = self.scaling / (dropout.keep_probability(p) if seed is not None else 1.0)
        W = base.weight if isinstance(base, Linear4bit) else base.weight.detach()
        y = LoRAFunction.apply(x2, self.lora_A.weight, self.lora_B.weight, W, seed, p, alpha)
        return y.view(*x.shape[:-1], self.out_features)                      # [..., N]

    def forward_reference(self, x):                                           # [..., K]
        """The readable composition: base(x) + F.linear(F.linear(dropout(x), A), B) · scaling, with
        nn.Dropout's own mask (forward uses lora/dropout.py's)."""
        y = self.base_layer(x)                                                # [..., N]
        if self.disabled:
            return y
        A = self.lora_A.weight.to(x.dtype)                                    # [r, K]
        B = self.lora_B.weight.to(x.dtype)                                    # [N, r]
        h = F.linear(self.lora_dropout(x), A).reshape(-1, self.r)             # [M, r]
        # y + scaling · h Bᵀ in one addmm: no [M, N] temporaries for the product and the scaled product.
        y = torch.addmm(y.reshape(-1, self.out_features), h, B.t(), alpha=self.scaling)  # [M, N]
        return y.view(*x.shape[:-1], self.out_features)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = B A · alpha / r, [N, K], in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged_linear(self, dtype=None) -> nn.Linear:
        """A frozen nn.Linear (of the base's class if it is one) holding W + B A · alpha / r, summed in fp32,
        stored in `dtype` (default: the base's dtype; for a Linear4bit base, whose W is dequantised exactly
        first, its compute dtype)."""
        base = self.base_layer
        W = base.dequantized_weight(torch.float32) if isinstance(base, Linear4bit) else base.weight.detach()
        dtype = dtype or (base.compute_dtype if isinstance(base, Linear4bit) else W.dtype)
        cls = type(base) if isinstance(base, nn.Linear) else nn.Linear        # a dense base's own class
        merged = cls(self.in_features, self.out_features, bias=False, device=W.device, dtype=dtype)
        with torch.no_grad():
            merged.weight.copy_(W.float() + self.delta_weight().to(W.device))
        return merged.requires_grad_(False)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, disabled={self.disabled}"
