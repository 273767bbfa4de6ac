"""Text generation with a KV cache: greedy, temperature, top-p (nucleus, Holtzman et al. 2019).

Prompts of different lengths are left-padded into one batch: every prompt's last token sits in the
last column, so each step appends one column for all rows. Positions are counted over real tokens
only (see Llama.hidden_states), so a padded prompt is continued exactly as it would be alone.

Each step feeds only the newest token and reuses the cached keys and values of all earlier ones;
`use_cache=False` recomputes the whole sequence instead (the slow reference the tests compare with).
"""
from collections import deque
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


class StopStringWatch:
    """Tells, token by token, when a row's decoded text first contains one of stop_strings, decoding only a
    window of the row's newest tokens rather than its whole answer (which made each token cost the answer's
    length, and an answer its square).

    Why the window is enough. SentencePiece's text is its pieces' texts joined, with two context effects:
    the first piece loses its leading space, and consecutive byte-fallback pieces decode together as UTF-8
    (bytes that make no character give U+FFFD each).
    - A stop string that was not in the text one token ago can only appear at its end: the new token
      appends its piece, or its byte completes a character begun by the last 3 byte pieces. So the stop
      string's own L characters reach the newest token.
    - L characters come from at most 4·L tokens that show text on their own: a piece has at least one
      character, a character at most 4 byte pieces. Tokens that decode to nothing on their own (BOS, EOS
      and pad, which Tokenizer.decode drops, control pieces, a bare "▁") are not counted: any number of
      them may sit in between, and the window takes in all of them.
    - The window starts one counted token earlier, 4·L + 1 counted tokens in all (L of the longest stop
      string), so the stop string begins after the window's first token. Only that first token can decode
      differently from the full text: it loses its leading space, or, cut from the start of its UTF-8
      character, gives U+FFFD up to the next character, from where both decodes agree.
    So the window's text holds every stop string new to the full text. A hit is confirmed on the full
    text (once per row: the row stops there), so a U+FFFD made by the cut can never stop a row early.
    The result equals searching the whole decoded answer after every token."""

    def __init__(self, stop_strings, tokenizer, batch_size: int):
        self.stop_strings = tuple(stop_strings)
        self.tokenizer = tokenizer
        self.window = 4 * max(len(s) for s in self.stop_strings) + 1
        # Per row, the positions of its newest `window` tokens that show text on their own.
        self.shown = [deque(maxlen=self.window) for _ in range(batch_size)]
        self.shows_text = {}                                                     # token id -> bool, cached

    def found(self, tokens) -> bool:
        text = self.tokenizer.decode(tokens)
        return any(s in text for s in self.stop_strings)

    def hit(self, i: int, tokens: list) -> bool:
        """Whether row i's answer `tokens` (its newest token last) now contains a stop string, given that
        it did not one token ago."""
        t = tokens[-1]
        if t not in self.shows_text:
            self.shows_text[t] = self.tokenizer.decode([t]) != ""
        if self.shows_text[t]:
            self.shown[i].append(len(tokens) - 1)
        start = self.shown[i][0] if len(self.shown[i]) == self.window else 0
        return self.found(tokens[start:]) and (start == 0 or self.found(tokens))


@torch.no_grad()
def generate(model, prompts: list, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             eos_id: int | None = None, stop_strings=(), tokenizer=None, generator=None,
             use_cache: bool = True) -> list:
    """Continue each prompt (a list of token ids) by up to max_new_tokens; returns one Completion each.

    Stops a row at eos_id, or once its decoded text contains one of stop_strings (needs tokenizer).
    Finished rows are dropped from the batch once a quarter of it has finished (see the loop)."""
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
    stops = StopStringWatch(stop_strings, tokenizer, B) if stop_strings else None
    # Without padding the prompt needs no explicit mask: SDPA then runs its fused causal kernel.
    # Decided from the prompts' lengths on the host, not from the mask on the device (a sync).
    padded = any(len(p) < T0 for p in prompts)
    if padded:
        # Every generated token is real, so the mask over the whole run is the prompt's followed by ones:
        # fill it once, and pass each step a view of its first columns instead of growing it.
        full_mask = torch.ones((B, T0 + max_new_tokens), dtype=mask.dtype, device=device)
        full_mask[:, :T0] = mask
    # Finished rows leave the batch: rows[j] is the prompt index of the batch's row j. Dropping them costs a
    # copy of the cache, so it waits until a quarter of the rows have finished; until then they are fed on
    # (their outputs ignored) to keep the batch rectangular. Answers of mixed lengths then cost about the sum
    # of their lengths rather than the batch size times the longest.
    rows = list(range(B))
    step_ids = ids                                                               # tokens fed this step
    for k in range(max_new_tokens):
        seen = full_mask[:, :T0 + k] if padded else None                         # [b, T0 + k] or None
        if use_cache:
            hidden = model.hidden_states(step_ids, attention_mask=seen, cache=cache)   # [b, t, D]
        else:
            hidden = model.hidden_states(ids, attention_mask=seen)                     # [b, T, D]
        logits = model.lm_head(hidden[:, -1])                                    # [b, V] last position only
        nxt = sample_next(logits, temperature, top_p, generator)                # [b]
        # The step's one device→host transfer, for the whole batch: reading the rows one by one
        # (int(nxt[j])) would stall a GPU once per row per token.
        for i, t in zip(rows, nxt.tolist()):
            if reason[i] is not None:
                continue
            if eos_id is not None and t == eos_id:
                reason[i] = "eos"
                continue
            new[i].append(t)
            if stops is not None and stops.hit(i, new[i]):
                reason[i] = "stop"
        running = [j for j, i in enumerate(rows) if reason[i] is None]
        if not running:
            break
        if len(running) <= 3 * len(rows) // 4:
            keep = torch.tensor(running, device=device)                         # [b']
            rows = [rows[j] for j in running]
            nxt, ids = nxt[keep], ids[keep]
            if padded:
                full_mask = full_mask[keep]
            if use_cache:
                cache.keep_rows(keep)
        step_ids = nxt[:, None]                                                  # [b, 1]
        if not use_cache:  # the full recomputation needs every token; the cached path only the newest
            ids = torch.cat([ids, step_ids], dim=1)                              # [b, T+1]
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
