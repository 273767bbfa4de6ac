"""LLaMA (Touvron et al. 2023) as OpenLLaMA 3B v2 uses it, in plain PyTorch.

Deltas from the original Transformer (Vaswani et al. 2017):
  - pre-norm: each sub-layer normalises its input, with RMSNorm (Zhang & Sennrich 2019), no mean, no bias
  - rotary position embeddings (Su et al. 2021) on queries and keys, in the "rotate-half" layout of the
    Hugging Face checkpoints (dims i and i + Dh/2 form a pair), instead of learned absolute positions
  - SwiGLU MLP (Shazeer 2020): down(silu(gate(x)) * up(x))
  - no biases anywhere; an output head (lm_head) untied from the token embedding

Module names are Hugging Face's, so `state_dict()` keys are the checkpoint's keys.

Shapes: B batch, T new tokens, S keys (cached + new), D hidden (3200), H heads (32), Hkv key/value
heads (32), Dh head dim (100), F MLP (8640), V vocab (32000).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model import block_cpu, decode_cpu
from model.config import LlamaConfig


class Linear(nn.Linear):
    """nn.Linear (the model's are bias-free): y = x Wᵀ. One row in bf16 on the CPU without gradients (a
    batch-1 decoding step) goes through model/decode_kernel.c, which streams W from memory at 25–28 GB/s where
    torch's bf16 matrix-vector product manages 17–18 (a decoding step reads every weight once); everything
    else is nn.Linear's own forward."""

    def forward(self, x):                                                 # [..., K]
        if self.bias is None and decode_cpu.usable(x, self.weight):
            return decode_cpu.linear_row(x, self.weight)                  # [..., N]
        return super().forward(x)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with its gradient written out (forward: the same operations as forward_reference, value
    for value).
        r = 1 / sqrt(mean(x²) + eps)  [..., 1] fp32      x̂ = x r  fp32      y = w ⊙ x̂ (x̂ rounded to x's dtype)
    backward, with g = (∂y ⊙ w) in fp32 (the rounding of x̂ is the identity for gradients, as autograd
    treats a cast), D the last dim:
        ∂x = r g − r³ x · Σ_d(g x) / D  = r (g − x̂ mean(g x̂))         ∂w = Σ over rows of ∂y ⊙ x̂
    It keeps x (alive anyway: the residual stream) and r, not the fp32 x̂ and x² that autograd through
    the composition keeps, and makes ∂x in four passes over [.., D] instead of autograd's dozen
    (bench shape, bf16 [1024, 512]: forward + backward 3.2 → 2.2 ms, 16 backward calls a step).
    On the CPU, forward and ∂x (the weight frozen) are one sweep each of model/block_kernel.c, the same
    formulas (model/block_cpu.py)."""

    @staticmethod
    def forward(ctx, x, weight, eps):                               # [..., D], [D]
        if block_cpu.usable(x, weight):
            y, r = block_cpu.rmsnorm_forward(x, weight, eps)        # [..., D], [..., 1]
            ctx.save_for_backward(x, weight, r)
            return y
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)     # [..., 1]
        ctx.save_for_backward(x, weight, r)
        return weight * (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):                                      # [..., D]
        x, weight, r = ctx.saved_tensors
        if not ctx.needs_input_grad[1] and block_cpu.usable(x, weight, grad_y):
            return block_cpu.rmsnorm_backward(x, weight, r, grad_y), None, None
        xf = x.float()                                              # [..., D]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g = (grad_y * weight).float()                           # [..., D]
            gx = torch.linalg.vecdot(g, xf).unsqueeze(-1)           # [..., 1] Σ_d g x
            grad_x = g.addcmul_(xf, r.square().mul_(gx).div_(-x.shape[-1])).mul_(r).to(x.dtype)
        if ctx.needs_input_grad[1]:                                 # a trained norm (toy/base.py)
            grad_w = (grad_y * (xf * r).to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, None


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · weight, computed in fp32 whatever the input dtype
    (forward_reference: the plain composition; forward: RMSNormFunction, the same values)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):                                           # [..., D]
        return RMSNormFunction.apply(x, self.weight, self.eps)

    def forward_reference(self, x):                                 # [..., D]
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """cos, sin [B, 1, T, Dh] for positions [B, T]: angle(p, i) = p · theta^(-2i/Dh), i < Dh/2,
    repeated twice along the last dim for the rotate-half layout. Computed in fp32."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    angles = position_ids.float()[..., None] * inv_freq                   # [B, T, Dh/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]                 # [B, 1, T, Dh]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x):                                                       # [..., Dh]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x, cos, sin):                                            # [B, H, T, Dh]
    return x * cos + rotate_half(x) * sin


class RotaryFunction(torch.autograd.Function):
    """[B, T, H, Dh] (a projection's output) → rotated, [B, H, T, Dh] contiguous (attention's layout):
        forward   apply_rotary(x.transpose(1, 2), cos, sin)            (rotate each pair by its angle)
        backward  apply_rotary(∂y, cos, −sin).transpose(1, 2)          (rotate back: a rotation's transpose)
    On the CPU both are one sweep of model/block_kernel.c (rotate and move in one pass, one rounding in
    bf16 where the torch composition rounds three times); elsewhere the torch code above."""

    @staticmethod
    def forward(ctx, x, cos, sin):                                        # [B, T, H, Dh], [B, 1, T, Dh] ×2
        ctx.save_for_backward(cos, sin)
        B, T, H, Dh = x.shape
        if block_cpu.usable(x, cos, sin):
            out = torch.empty(B, H, T, Dh, dtype=x.dtype, device=x.device)
            block_cpu.rotary(x, cos, sin, out.transpose(1, 2), 1.0)
            return out
        return apply_rotary(x.transpose(1, 2), cos, sin).contiguous()    # [B, H, T, Dh]

    @staticmethod
    def backward(ctx, grad_y):                                            # [B, H, T, Dh]
        cos, sin = ctx.saved_tensors
        B, H, T, Dh = grad_y.shape
        if block_cpu.usable(grad_y, cos, sin) and grad_y.stride(3) == 1:
            grad_x = torch.empty(B, T, H, Dh, dtype=grad_y.dtype, device=grad_y.device)
            return block_cpu.rotary(grad_y.transpose(1, 2), cos, sin, grad_x, -1.0), None, None
        return apply_rotary(grad_y, cos, -sin).transpose(1, 2), None, None


ATTENTION_BUDGET = 1 << 25   # bytes of [heads, T, T] buffers in CausalAttentionFunction.backward (kept: workspace)


class CausalAttentionFunction(torch.autograd.Function):
    """softmax(scale · q kᵀ + causal mask) v for q, k, v [B, H, T, Dh], scale = 1/√Dh: forward is SDPA's fused
    kernel; backward is written out (on the CPU, SDPA's fused backward takes 5–8x its forward: in the bench
    step, bf16 [4, 8, 256, 64], 8.3 ms a layer against ~5.5 here; in fp32 the two take the same time):
        s = q kᵀ,  p = softmax(scale · s)                   ∂v = pᵀ ∂y          ∂p = ∂y vᵀ
        ∂s = scale · p ⊙ (∂p − rowsum(p ⊙ ∂p))               ∂q = ∂s k           ∂k = ∂sᵀ q
    (rowsum(p ⊙ ∂p) = rowsum(∂y ⊙ y), FlashAttention's D). s and ∂p are products in fp32 (bf16 inputs are
    widened first, so p is as exact as SDPA's); p and ∂s are rounded to the compute dtype for the three products
    after them. The softmax and ∂s are one sweep of model/block_kernel.c. Heads go G at a time, G so that the
    [G, T, T] buffers fit in ATTENTION_BUDGET. Used on the CPU for plain causal attention with gradients
    (Attention.forward); tests/test_block_kernels.py holds it equal to SDPA's backward."""

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
        G = max(1, min(n, ATTENTION_BUDGET // (T * T * (8 if wide else 8 + 2 * q.element_size()))))
        fp32, low = ((G, T, T), torch.float32), ((G, T, T), q.dtype)
        s, dp, *pds = block_cpu.workspace(fp32, fp32) if wide else block_cpu.workspace(fp32, fp32, low, low)
        P, dS = pds or (s, dp)                                            # [G, T, T] ×4 (or ×2 in fp32)
        for a in range(0, n, G):
            g, m = slice(a, a + G), min(G, n - a)
            torch.bmm(q32[g], k32[g].transpose(1, 2), out=s[:m])          # s = q kᵀ
            torch.bmm(dy32[g], v32[g].transpose(1, 2), out=dp[:m])        # ∂p = ∂y vᵀ
            block_cpu.attention_softmax_backward(s[:m], dp[:m], P[:m], dS[:m], Dh ** -0.5)
            torch.bmm(P[:m].transpose(1, 2), dy[g], out=dv[g])            # ∂v = pᵀ ∂y
            torch.bmm(dS[:m], k[g], out=dq[g])                            # ∂q = ∂s k
            torch.bmm(dS[:m].transpose(1, 2), q[g], out=dk[g])            # ∂k = ∂sᵀ q
        return dq.view(B, H, T, Dh), dk.view(B, H, T, Dh), dv.view(B, H, T, Dh)


class KVCache:
    """Keys and values of the tokens seen so far, preallocated for `max_len` positions per layer."""

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)  # [B, Hkv, S, Dh]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.length = 0          # positions filled; advanced by Llama.forward after all layers ran

    def update(self, layer: int, k, v):                                  # k, v [B, Hkv, T, Dh]
        end = self.length + k.shape[2]
        if end > self.k[layer].shape[2]:
            raise ValueError(f"KV cache holds {self.k[layer].shape[2]} positions, {end} needed")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]      # [B, Hkv, S, Dh]


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads,
                                                        config.num_key_value_heads, config.head_dim)
        D = config.hidden_size
        self.q_proj = Linear(D, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(D, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(D, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, D, bias=False)

    def forward(self, x, cos, sin, mask, cache):                          # x [B, T, D]
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)                     # [B, T, H, Dh]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)                  # [B, T, Hkv, Dh]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
        q, k = RotaryFunction.apply(q, cos, sin), RotaryFunction.apply(k, cos, sin)    # [B, H(kv), T, Dh]
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                                      # [B, Hkv, S, Dh]
        if (mask is None and cache is None and self.n_kv_heads == self.n_heads and torch.is_grad_enabled()
                and block_cpu.usable(q, k, v)):
            y = CausalAttentionFunction.apply(q, k, v)                                 # [B, H, T, Dh]
        else:
            y = attention(q, k, v, mask, gqa=self.n_kv_heads != self.n_heads)          # [B, H, T, Dh]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def attention(q, k, v, mask, gqa=False, pad_head_dim=None):
    """softmax(q kᵀ / √Dh + mask) v through SDPA, for q [B, H, T, Dh] and k, v [B, Hkv, S, Dh].

    mask None: causal over the T new tokens when T > 1, all S keys when T = 1 (a decoding step without
    padding); this lets SDPA pick its fused kernels. Otherwise a boolean [B or 1, 1, T, S], True = may attend.
    With an explicit mask CUDA's only fused kernel is the memory-efficient one, which needs Dh to be a multiple
    of 8 (OpenLLaMA's is 100); without it SDPA falls back to its math kernel, which materialises fp32
    [B, H, T, S] scores (16 × 2048 harness rows: ~25 GB). So with a mask q, k, v are zero-padded to the next
    multiple of 8 with the scale of the true Dh kept: the padded columns add 0 to every q·k and give output
    columns of 0, which are cut off. Done on every device, so the CPU runs what CUDA runs (its cost there is
    three small copies). pad_head_dim: None = with a mask; True/False force it (the tests)."""
    Dh = q.shape[-1]
    if pad_head_dim is None:
        pad_head_dim = mask is not None
    if pad_head_dim and Dh % 8:
        q, k, v = (F.pad(t, (0, -Dh % 8)) for t in (q, k, v))                       # [.., Dh + pad]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=Dh ** -0.5, enable_gqa=gqa)
        return y[..., :Dh]                                                           # [B, H, T, Dh]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                          enable_gqa=gqa)                            # [B, H, T, Dh]


class SwiGLUFunction(torch.autograd.Function):
    """silu(g) ⊙ u, silu(g) = g σ(g), with its gradient written out:
        ∂g = ∂y ⊙ u ⊙ σ(g) (1 + g (1 − σ(g)))        ∂u = ∂y ⊙ silu(g)
    It keeps g and u (autograd through F.silu(g) * u keeps silu(g) as well). On the CPU, forward and backward
    are one sweep each of model/block_kernel.c (one rounding in bf16 where the composition rounds twice);
    elsewhere the torch code below."""

    @staticmethod
    def forward(ctx, gate, up):                                            # [..., F] ×2
        ctx.save_for_backward(gate, up)
        if block_cpu.usable(gate, up):
            return block_cpu.swiglu_forward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_y):                                             # [..., F]
        gate, up = ctx.saved_tensors
        if block_cpu.usable(gate, up, grad_y):
            return block_cpu.swiglu_backward(gate, up, grad_y)
        g, u, dy = gate.float(), up.float(), grad_y.float()
        s = torch.sigmoid(g)
        return (dy * u * s * (1 + g * (1 - s))).to(gate.dtype), (dy * g * s).to(up.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        D, Fw = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(D, Fw, bias=False)
        self.up_proj = Linear(D, Fw, bias=False)
        self.down_proj = Linear(Fw, D, bias=False)

    def forward(self, x):                                                 # [B, T, D]
        return self.down_proj(SwiGLUFunction.apply(self.gate_proj(x), self.up_proj(x)))  # [B, T, F] → [B, T, D]


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache=None):                     # [B, T, D]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack; named `model` inside Llama so keys read `model.layers.0...` as in the checkpoints."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False   # recompute each block in backward instead of storing it
        self.checkpoint_blocks = None         # with checkpointing: how many blocks, from the first, are
                                              # recomputed (None: all); the rest keep their activations

    def init_weights(self, seed: int = 0, std: float = 0.02):
        """Random initialisation for models trained from scratch (the tiny demo base): N(0, std²) for
        embeddings and projections, the residual outputs scaled by 1/sqrt(2L) (GPT-2), norms at 1."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                nn.init.ones_(p)
                continue
            s = std / math.sqrt(2 * self.config.num_hidden_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g, device="cpu") * s)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """Final normed hidden states [B, T, D] for input_ids [B, T].

        attention_mask [B, S] (1 = real token, 0 = padding) covers the cached tokens and the new ones.
        position_ids [B, T] default to the count of real tokens before each one, so a left-padded
        sequence gets the same positions as the unpadded one."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        S = past + T
        if attention_mask is not None and attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)}")
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, S, device=input_ids.device).expand(B, T)    # [B, T]
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # [B, T]
        x = self.model.embed_tokens(input_ids)                                            # [B, T, D]
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        mask = None                  # None: causal over the new tokens (T > 1), or all keys (T = 1)
        if attention_mask is not None or (past > 0 and T > 1):
            # Boolean [B, 1, T, S], True = may attend: key j is real and j <= query position (past + t).
            q_pos = torch.arange(past, S, device=input_ids.device)[:, None]               # [T, 1]
            k_pos = torch.arange(S, device=input_ids.device)[None, :]                     # [1, S]
            mask = (k_pos <= q_pos)[None, None]                                           # [1, 1, T, S]
            if attention_mask is not None:
                mask = mask & attention_mask.bool()[:, None, None, :]                     # [B, 1, T, S]
                # A padding query with no real key before it would attend to nothing (NaN in softmax);
                # let it see itself. Its output is never used.
                mask = mask | (k_pos == q_pos)[None, None]
        n_checkpointed = len(self.model.layers) if self.checkpoint_blocks is None else self.checkpoint_blocks
        for i, block in enumerate(self.model.layers):
            if self.gradient_checkpointing and i < n_checkpointed and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length = S
        return self.model.norm(x)                                                          # [B, T, D]

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """Logits [B, T, V] for input_ids [B, T]; see hidden_states for the optional arguments."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, cache))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, p.dtype, p.device)
