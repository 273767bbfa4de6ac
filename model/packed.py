"""Packed rows: one shared context and several continuations in a single row, each continuation seeing the
context and itself only (a tree-shaped attention mask), so the context is computed once for all of them.

    row         c c c c | a a | b b b | d          context, then continuations a, b, d
    positions   0 1 2 3   4 5   4 5 6   4          every continuation goes on from the context
    segment     0 0 0 0   1 1   2 2 2   3          0 = context; -1 marks padding
    a token attends to key k  ⇔  k is not after it, and k is context or in its own segment

Llama.hidden_states derives its mask from a key-padding mask, which cannot keep b from seeing a; this
runs the same decoder stack (embed → blocks → final norm) with the mask and positions given.
"""
import torch
from torch.utils.checkpoint import checkpoint

from model.llama import rotary_cos_sin


def tree_mask(segment):
    """Boolean [B, 1, T, T] attention mask (True = may attend) for segment ids [B, T] as drawn above.
    A padding query attends to itself only, so its softmax is defined; its output is never used."""
    T = segment.shape[1]
    idx = torch.arange(T, device=segment.device)
    causal = idx[:, None] >= idx[None, :]                                          # [T, T]
    same = (segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == 0)  # [B, T, T]
    real = segment >= 0                                                            # [B, T]
    mask = causal & same & real[:, :, None] & real[:, None, :]
    return (mask | torch.eye(T, dtype=torch.bool, device=segment.device))[:, None]  # [B, 1, T, T]


def hidden_states_packed(model, input_ids, position_ids, mask):
    """Final normed hidden states [B, T, D] of a Llama for input_ids and position_ids [B, T] under an
    explicit boolean mask [B, 1, T, T]; no KV cache. Activation checkpointing as in Llama.hidden_states
    (checkpoint_blocks included)."""
    x = model.model.embed_tokens(input_ids)                                        # [B, T, D]
    cos, sin = rotary_cos_sin(position_ids, model.config.head_dim, model.config.rope_theta, x.dtype)
    n_checkpointed = len(model.model.layers) if model.checkpoint_blocks is None else model.checkpoint_blocks
    for i, block in enumerate(model.model.layers):
        if model.gradient_checkpointing and i < n_checkpointed and model.training and torch.is_grad_enabled():
            x = checkpoint(block, x, cos, sin, mask, None, use_reentrant=False)
        else:
            x = block(x, cos, sin, mask)
    return model.model.norm(x)                                                     # [B, T, D]
