"""Text generation with a KV cache: greedy, temperature, top-p (nucleus, Holtzman et al. 2019).

Prompts of different lengths are left-padded into one batch: every prompt's last token sits in the
last column, so each step appends one column for all rows. Positions are counted over real tokens
only (see Llama.hidden_states), so a padded prompt is continued exactly as it would be alone.

Each step feeds only the newest token and reuses the cached keys and values of all earlier ones;
`use_cache=False` recomputes the whole sequence instead (the slow reference the tests compare with).
"""
from dataclasses import dataclass

import torch


@dataclass
class Completion:
    tokens: list          # new token ids, without the EOS that ended them
    text: str | None      # decoded and cut before the first stop string (None without a tokenizer)
    finish_reason: str    # "eos", "stop" (a stop string appeared) or "length"


def sample_next(logits, temperature: float, top_p: float, generator=None):
    """Next token ids [B] from last-position logits [B, V]."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)                 # [B, V]
    if top_p < 1.0:
        p_sorted, idx = probs.sort(dim=-1, descending=True)                      # [B, V]
        # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it does.
        drop = p_sorted.cumsum(-1) - p_sorted >= top_p
        p_sorted = p_sorted.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, p_sorted)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: list, pad_id: int, device):
    """input_ids, attention_mask [B, T] with each prompt right-aligned."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), T), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
            mask[i, T - len(p):] = 1
    return ids, mask


@torch.no_grad()
def generate(model, prompts: list, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             eos_id: int | None = None, stop_strings=(), tokenizer=None, generator=None,
             use_cache: bool = True) -> list:
    """Continue each prompt (a list of token ids) by up to max_new_tokens; returns one Completion each.

    Stops a row at eos_id, or once its decoded text contains one of stop_strings (needs tokenizer).
    Rows that finished keep being fed (their outputs are ignored) so the batch stays rectangular."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: temperature {temperature} must be >= 0 and top_p {top_p} in (0, 1]")
    if stop_strings and tokenizer is None:
        raise ValueError("generate: stop_strings need a tokenizer to decode with")
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    pad_id = model.config.pad_token_id
    ids, mask = left_pad(prompts, pad_id, device)                                 # [B, T0]
    B, T0 = ids.shape
    limit = model.config.max_position_embeddings
    max_new_tokens = min(max_new_tokens, max(0, limit - T0))
    cache = model.new_cache(B, T0 + max_new_tokens) if use_cache else None

    new = [[] for _ in range(B)]
    reason = [None] * B
    step_ids = ids                                                               # tokens fed this step
    # Without padding the prompt needs no explicit mask: SDPA then runs its fused causal kernel.
    padded = not bool(mask.all())
    for _ in range(max_new_tokens):
        if use_cache:
            hidden = model.hidden_states(step_ids, attention_mask=mask if padded else None, cache=cache)  # [B, t, D]
        else:
            hidden = model.hidden_states(ids, attention_mask=mask if padded else None)                     # [B, T, D]
        logits = model.lm_head(hidden[:, -1])                                    # [B, V] last position only
        nxt = sample_next(logits, temperature, top_p, generator)                # [B]
        for i in range(B):
            if reason[i] is not None:
                continue
            t = int(nxt[i])
            if eos_id is not None and t == eos_id:
                reason[i] = "eos"
                continue
            new[i].append(t)
            if stop_strings and any(s in tokenizer.decode(new[i]) for s in stop_strings):
                reason[i] = "stop"
        if all(r is not None for r in reason):
            break
        step_ids = nxt[:, None]                                                  # [B, 1]
        ids = torch.cat([ids, step_ids], dim=1)                                  # [B, T+1]
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
    model.train(was_training)

    out = []
    for i in range(B):
        text = None
        if tokenizer is not None:
            text = tokenizer.decode(new[i])
            for s in stop_strings:
                text = text.split(s)[0]
        out.append(Completion(new[i], text, reason[i] or "length"))
    return out
