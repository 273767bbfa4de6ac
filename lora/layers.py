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

Shapes: M tokens (all leading dims of x flattened), K in_features, N out_features, r rank.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora.nf4 import NF4Tensor, quantize_nf4, to_bnb_quant_state

TILE = 1 << 22     # values of W dequantised at a time on the CPU (16 MiB in fp32)


# --- the 4-bit base -----------------------------------------------------------------------------------

def _tiled(q: NF4Tensor, x) -> bool:
    return x.device.type == "cpu" and len(q.shape) == 2 and q.shape[1] % q.block_size == 0


def _dequantize(q: NF4Tensor, dtype):
    if q.device.type == "cuda":
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


class NF4Matmul(torch.autograd.Function):
    """x Wᵀ with W frozen in NF4: backward dequantises W again instead of keeping a dense copy."""

    @staticmethod
    def forward(ctx, x, q: NF4Tensor):                                        # x [M, K]
        ctx.q = q
        return nf4_linear(x, q)

    @staticmethod
    def backward(ctx, grad_y):                                                # [M, N]
        grad_x = nf4_linear_grad_input(grad_y.contiguous(), ctx.q) if ctx.needs_input_grad[0] else None
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
        y = NF4Matmul.apply(x.reshape(-1, self.in_features).to(self.compute_dtype), self.weight)   # [M, N]
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

    def forward(self, x):                                                     # [..., K]
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
        """A frozen nn.Linear holding W + B A · alpha / r, summed in fp32, stored in `dtype` (default: the
        base's dtype; for a Linear4bit base, whose W is dequantised exactly first, its compute dtype)."""
        base = self.base_layer
        W = base.dequantized_weight(torch.float32) if isinstance(base, Linear4bit) else base.weight.detach()
        dtype = dtype or (base.compute_dtype if isinstance(base, Linear4bit) else W.dtype)
        merged = nn.Linear(self.in_features, self.out_features, bias=False, device=W.device, dtype=dtype)
        with torch.no_grad():
            merged.weight.copy_(W.float() + self.delta_weight().to(W.device))
        return merged.requires_grad_(False)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, disabled={self.disabled}"
