"""LoRA (Hu et al. 2021) on a frozen base, dense or 4-bit NF4 (QLoRA, Dettmers et al. 2023).

    y = base(x) + dropout(x) · Aᵀ · Bᵀ · α/r

        x [..., in] ─────────────► base: W frozen, [out, in] (nn.Linear, or Linear4bit: NF4) ──► (+) ─► y [..., out]
            │                                                                                  ▲
            └─► dropout ─► lora_A: A [r, in] ─► lora_B: B [out, r] ─► · scaling = α / r ─────┘

A starts Kaiming-uniform (a = √5, as nn.Linear and PEFT), B starts at zero: the adapter begins as the
identity change, y = base(x). Only A and B train; W gets no gradient and no optimizer state. Gradients
reach A, B and x. The adapter runs in x's dtype; A and B are stored in `lora_dtype` (fp32 by default, the
optimizer's master copy) and cast on the way in, as autocast does.

QLoRA's base, Linear4bit, stores W in NF4 (lora/nf4.py, about 4.13 bits a weight) and dequantises it to the
compute dtype for each product (NF4Matmul):
    forward   W' = dequantize(W_nf4)  [N, K]      y = x W'ᵀ
    backward  W' = dequantize(W_nf4)  again       ∂x = ∂y W'            (W is frozen: no ∂W)
Keeping W' from forward for backward would hold a dense copy of every layer's weight (in bf16 about 4× its NF4
size) from forward to backward: the memory QLoRA quantises W to save. Dequantising again costs one more pass
over the 4-bit weight per step instead. On CUDA bitsandbytes' kernel dequantises (the same values: checked
once per device, lora/nf4.py), and a one-row product without gradients (a decoding step) is bitsandbytes'
4-bit matrix-vector kernel, which reads the packed codes without dequantising all of W first.

On the CPU two speed paths replace the plain code here, one line each (cpu/; the switch BEZOAR_C_KERNELS):
"nf4" takes the 4-bit product a tile of W at a time (cpu/nf4.py), and "lora" runs base and adapter as one
autograd node with a counter-based dropout mask (cpu/lora.py). Either gives this code's values up to float
rounding (tests/cpu/test_fast_paths.py); with the switch off the CPU runs exactly what CUDA runs.

Shapes: M tokens (all leading dims of x flattened), K in_features, N out_features, r rank.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import cpu
from lora.nf4 import NF4Tensor, bitsandbytes_cuda_problem, quantize_nf4, to_bnb_quant_state


# --- the 4-bit base -----------------------------------------------------------------------------------

def on_bitsandbytes(q: NF4Tensor) -> bool:
    """True where bitsandbytes' CUDA kernels run this weight (checked once per device: lora/nf4.py)."""
    return q.device.type == "cuda" and bitsandbytes_cuda_problem(q.device) is None


def dequantize(q: NF4Tensor, dtype) -> torch.Tensor:
    """W [N, K] in dtype: bitsandbytes' kernel on CUDA, NF4Tensor.dequantize elsewhere (the same values)."""
    if on_bitsandbytes(q):
        import bitsandbytes.functional as bnbF
        return bnbF.dequantize_4bit(q.packed, to_bnb_quant_state(q, dtype))
    return q.dequantize(dtype)


class NF4Matmul(torch.autograd.Function):
    """y = x Wᵀ [M, N] for x [M, K] and W [N, K] frozen in NF4; backward dequantises W again instead of
    keeping a dense copy (the module docstring)."""

    @staticmethod
    def forward(ctx, x, q: NF4Tensor):                                        # x [M, K]
        ctx.q = q
        if cpu.enabled("nf4", x):
            y, W = cpu.nf4_linear(x, q, keep=ctx.needs_input_grad[0])         # W: None, or a small W kept
            ctx.save_for_backward(W)
            return y
        return F.linear(x, dequantize(q, x.dtype))                            # [M, N]

    @staticmethod
    def backward(ctx, grad_y):                                                # [M, N]
        if not ctx.needs_input_grad[0]:
            return None, None
        if cpu.enabled("nf4", grad_y):
            return cpu.nf4_linear_grad_input(grad_y, ctx.q, *ctx.saved_tensors), None
        return grad_y @ dequantize(ctx.q, grad_y.dtype), None                 # [M, K] ∂x = ∂y W


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
        if x2.shape[0] == 1 and not (torch.is_grad_enabled() and x.requires_grad) and on_bitsandbytes(self.weight):
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
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the base's product (a Linear4bit's compute dtype, a dense base's weight dtype)."""
        base = self.base_layer
        return base.compute_dtype if isinstance(base, Linear4bit) else base.weight.dtype

    @property
    def dropout_p(self) -> float:
        """The dropout probability in effect: 0 without dropout or in eval mode."""
        d = self.lora_dropout
        return d.p if isinstance(d, nn.Dropout) and d.training else 0.0

    def forward(self, x):                                                     # [..., K]
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LoRALinear: input has {x.shape[-1]} features, expected {self.in_features}")
        if self.disabled:
            return self.base_layer(x)
        if x.dtype == self.compute_dtype and cpu.enabled("lora", x):
            return cpu.lora_linear(x, self.base_layer.weight, self.lora_A.weight, self.lora_B.weight,
                                   self.scaling, self.dropout_p)
        y = self.base_layer(x)                                                # [..., N]
        A = self.lora_A.weight.to(x.dtype)                                    # [r, K]
        B = self.lora_B.weight.to(x.dtype)                                    # [N, r]
        h = F.linear(self.lora_dropout(x), A).reshape(-1, self.r)             # [M, r]
        # y + scaling · h Bᵀ in one addmm: no [M, N] temporaries for the product and the scaled product.
        y = torch.addmm(y.reshape(-1, self.out_features), h, B.t(), alpha=self.scaling)  # [M, N]
        return y.view(*x.shape[:-1], self.out_features)                      # [..., N]

    def delta_weight(self) -> torch.Tensor:
        """ΔW = B A · alpha / r, [N, K], in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged_linear(self, dtype=None) -> nn.Linear:
        """A frozen nn.Linear (of the base's class if it is one) holding W + B A · alpha / r, summed in fp32,
        stored in `dtype` (default: the base's dtype; for a Linear4bit base, whose W is dequantised exactly
        first, its compute dtype)."""
        base = self.base_layer
        W = base.dequantized_weight(torch.float32) if isinstance(base, Linear4bit) else base.weight.detach()
        dtype = dtype or self.compute_dtype
        cls = type(base) if isinstance(base, nn.Linear) else nn.Linear        # a dense base's own class
        merged = cls(self.in_features, self.out_features, bias=False, device=W.device, dtype=dtype)
        with torch.no_grad():
            merged.weight.copy_(W.float() + self.delta_weight().to(W.device))
        return merged.requires_grad_(False)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, disabled={self.disabled}"
