"""LLaMA (Touvron et al. 2023) as OpenLLaMA 3B v2 uses it, in plain PyTorch.

Deltas from the original Transformer (Vaswani et al. 2017):
  - pre-norm: each sub-layer normalises its input, with RMSNorm (Zhang & Sennrich 2019), no mean, no bias
  - rotary position embeddings (Su et al. 2021) on queries and keys, in the "rotate-half" layout of the
    Hugging Face checkpoints (dims i and i + Dh/2 form a pair), instead of learned absolute positions
  - SwiGLU MLP (Shazeer 2020): down(silu(gate(x)) * up(x))
  - no biases anywhere; an output head (lm_head) untied from the token embedding

Module names are Hugging Face's, so `state_dict()` keys are the checkpoint's keys.

On the CPU, RMSNorm may take a speed path of cpu/rmsnorm.py, one `if cpu.enabled(...)` line; the code after it
is what CUDA runs, and what the CPU runs with BEZOAR_C_KERNELS=0 (tests/cpu/test_rms_norm_kernel.py holds the
path to it).

Shapes: B batch, T new tokens, S keys (cached + new), D hidden (3200), H heads (32), Hkv key/value
heads (32), Dh head dim (100), F MLP (8640), V vocab (32000).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import cpu
from model.config import LlamaConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · weight, computed in fp32 whatever the input dtype; x / rms is rounded
    back to x's dtype before the weight multiplies it (as transformers' LlamaRMSNorm does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):                                                 # [..., D]
        if cpu.enabled("rms_norm", x, self.weight):
            return cpu.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)   # [..., D] / [..., 1]
        return self.weight * x.to(dtype)


def rotary_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """cos, sin [B, 1, T, Dh] for positions [B, T]: angle(p, i) = p · theta^(-2i/Dh), i < Dh/2,
    repeated twice along the last dim for the rotate-half layout. Computed in fp32."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    angles = position_ids.float()[..., None] * inv_freq                   # [B, T, Dh/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]                 # [B, 1, T, Dh]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x):                                                       # [..., Dh]
    x1, x2 = x.chunk(2, dim=-1)                                           # [..., Dh/2] ×2
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x, cos, sin):
    """Rotate each pair (x_i, x_{i+Dh/2}) of x [B, H, T, Dh] by its angle; cos, sin [B, 1, T, Dh] broadcast
    over heads."""
    return x * cos + rotate_half(x) * sin


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

    def keep_rows(self, rows):
        """Keep only the batch rows `rows` (an index tensor [B']), e.g. the sequences still being generated."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads,
                                                        config.num_key_value_heads, config.head_dim)
        D = config.hidden_size
        self.q_proj = nn.Linear(D, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, D, bias=False)

    def forward(self, x, cos, sin, mask, cache):                          # x [B, T, D]
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)                     # [B, T, H, Dh]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)                  # [B, T, Hkv, Dh]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
        q = apply_rotary(q.transpose(1, 2), cos, sin)                                  # [B, H, T, Dh]
        k = apply_rotary(k.transpose(1, 2), cos, sin)                                  # [B, Hkv, T, Dh]
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                                      # [B, Hkv, S, Dh]
        y = attention(q, k, v, mask, gqa=self.n_kv_heads != self.n_heads)              # [B, H, T, Dh]
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)              # [B, T, H·Dh]
        return self.o_proj(y)                                                          # [B, T, D]


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


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        D, Fw = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, Fw, bias=False)
        self.up_proj = nn.Linear(D, Fw, bias=False)
        self.down_proj = nn.Linear(Fw, D, bias=False)

    def forward(self, x):                                                 # [B, T, D]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))   # [B, T, F] → [B, T, D]


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
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
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
