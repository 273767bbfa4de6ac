"""The losses of both training stages: sft_loss (SFT), sequence_logps and dpo_loss (DPO).

Conventions shared by every function here:
  - labels [B, T] has the shape of input_ids; prompt and padding positions hold IGNORE_INDEX (-100),
    response positions hold the token id. Callers pass labels unshifted.
  - The shift happens inside, as in transformers: the logits at position t predict token t+1, so the
    target of position t is labels[:, t+1] and the last position predicts nothing (see shift_labels).
  - Precision: logits are computed in the model's dtype (as lm_head computes them), then upcast to
    fp32 (fp64 stays fp64) for the log-softmax. Results are fp32 (fp64 for fp64 inputs).
  - Sum against mean: sequence_logps sums over a sequence's response tokens (log π(y|x) of the DPO paper);
    sft_loss averages over all response tokens of the batch.

Two ways to compute the same numbers:
  plain    from logits [B, T, V]: sft_loss, sequence_logps.
  chunked  from final hidden states [B, T, D] and lm_head's weight [V, D]: sft_loss_chunked,
           sequence_logps_chunked. The B × T × V fp32 logits never exist at once: only the N positions
           whose target is a response token are kept (prompt and padding rows of hidden are dropped
           before the lm_head), and their logits are made C rows at a time under torch.utils.checkpoint,
           so backward recomputes each chunk's logits instead of storing them. Equal to the plain
           functions up to float rounding, gradients included (tests/test_losses.py).
           Peak memory is a few C × V fp32 buffers (≈ C/2 MiB each at V = 32000) instead of a few
           B × T × V ones.
           Frozen lm_head (QLoRA, DPO: only ∂/∂hidden is needed): each chunk's gradient is taken in the
           forward pass instead, while its logits exist, and kept as [C, D]:
               ∂ log p(y)/∂h = (onehot(y) − softmax(z)) · W,   z = h Wᵀ
           so backward is one multiply by the incoming gradient and the logits are never recomputed:
           two lm_head matmuls per position (forward, ∂h) instead of three. Same numbers up to float
           rounding (tests/test_losses.py). Without gradients (a reference pass) no ∂h is made.
           On the CPU, cpu.token_logps_chunk does each chunk's softmax pass in C (cpu/losses.py).

Shapes: B batch, T tokens, D hidden, V vocab, N response tokens in the batch, C chunk rows.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import cpu

IGNORE_INDEX = -100


def shift_labels(labels):                                                  # [B, T] → [B, T]
    """targets[:, t] = labels[:, t+1]; the last position gets IGNORE_INDEX (it predicts nothing).
    (shift_labels(labels) != IGNORE_INDEX).sum() counts the response tokens of a batch."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)               # [B, T]


def _check_labels(labels, other, other_name, vocab_size):
    """ValueError unless labels is an integer [B, T] matching other's [B, T, ·] and its ids are < V."""
    if labels.dim() != 2 or other.dim() != 3 or labels.shape != other.shape[:2]:
        raise ValueError(f"labels has shape {tuple(labels.shape)} and {other_name} {tuple(other.shape)}; "
                         f"expected labels [B, T] and {other_name} [B, T, ·] with the same B, T")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels has dtype {labels.dtype}, expected an integer dtype (token ids)")
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
    if bad.any():
        raise ValueError(f"labels hold {bad.sum().item()} value(s) such as {labels[bad][0].item()} that are "
                         f"neither {IGNORE_INDEX} nor a token id in [0, {vocab_size})")


def _token_logps(logits, targets):                                        # [..., V], [...] → [...]
    """log softmax(logits)[target] = logits[target] − logsumexp(logits), in at least fp32.
    targets must all be valid ids (masked positions are filled with 0 by the callers)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # [..., V]
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)  # [...]


# --- plain: from logits [B, T, V] ---

def sequence_logps(logits, labels):
    """Summed response-token log-probabilities per sequence: log πθ(y|x), the DPO building block.
        targets[b, t] = labels[b, t+1]                         (logits at t predict token t+1)
        logps[b] = Σ_{t : targets[b, t] ≠ −100} log softmax(logits[b, t])[targets[b, t]]
    logits [B, T, V], labels [B, T] → logps [B]. A row with no response token gets 0 (an empty sum)."""
    _check_labels(labels, logits, "logits", logits.shape[-1])
    targets = shift_labels(labels)                                        # [B, T]
    mask = targets != IGNORE_INDEX                                        # [B, T]
    token_logps = _token_logps(logits, targets.masked_fill(~mask, 0))     # [B, T]
    return torch.where(mask, token_logps, 0.0).sum(-1)                    # [B]


def sft_loss(logits, labels):
    """Token cross-entropy over response tokens, averaged over the response tokens of the batch:
        L = −(1/N) Σ_b Σ_{t : targets[b, t] ≠ −100} log softmax(logits[b, t])[targets[b, t]]
          = −(1/N) Σ_b sequence_logps(logits, labels)[b],     N = number of response tokens in the batch
    with targets = labels shifted left by one (see sequence_logps); transformers' causal-LM loss is the same.
    logits [B, T, V], labels [B, T] → scalar. ValueError if the batch holds no response token at all.

    Gradient accumulation over micro-batches with unequal token counts: the mean of per-micro-batch
    means is not the batch mean; use −sequence_logps(...).sum() / N_total instead."""
    total = sequence_logps(logits, labels).sum()                          # checks shapes
    n = (shift_labels(labels) != IGNORE_INDEX).sum()
    if n == 0:
        raise ValueError("sft_loss: the batch has no response tokens (every shifted label is -100)")
    return -total / n


# --- chunked: from hidden states [B, T, D] and lm_head.weight [V, D] ---

def _linear_token_logps(h, lm_head_weight, y):                            # [C, D], [V, D], [C] → [C]
    return _token_logps(F.linear(h, lm_head_weight), y)                   # logits [C, V]


class _FrozenHeadTokenLogps(torch.autograd.Function):
    """log p(y) of N positions through a frozen lm_head, C rows at a time; ∂/∂h is computed in forward
    (see the module docstring) and scaled by the incoming gradient in backward.

    One log-softmax gives both: log p = log_softmax(z) in at least fp32, log p(y) = (log p)[y] (exact even
    where p(y) underflows in fp32), and, exponentiated in place, p − onehot(y) = −∂ log p(y)/∂z. No step
    looks at values on the host, so on a GPU the chunks queue without waiting."""

    @staticmethod
    def forward(ctx, h, lm_head_weight, y, need_grad, chunk_size):            # [N, D], [V, D], [N]
        wide = torch.promote_types(h.dtype, torch.float32)                    # softmax dtype, ≥ fp32
        token_logps = torch.empty(h.shape[0], dtype=wide, device=h.device)    # [N]
        dh = torch.empty_like(h) if need_grad else None                       # [N, D] ∂ log p(y)/∂h
        fast = cpu.enabled("loss", h, lm_head_weight)
        for i in range(0, h.shape[0], chunk_size):
            rows, yc = slice(i, i + chunk_size), y[i:i + chunk_size, None]    # [C, 1]
            if fast:   # the same pass as one C sweep per row (cpu/losses.py)
                token_logps[rows], p_minus_onehot = cpu.token_logps_chunk(h[rows], lm_head_weight, yc[:, 0],
                                                                                   need_grad)
            else:
                logp = F.linear(h[rows], lm_head_weight).to(wide).log_softmax(-1)  # [C, V] log p
                token_logps[rows] = logp.gather(-1, yc).squeeze(-1)            # [C] log p(y)
                if need_grad:
                    p_minus_onehot = logp.exp_().scatter_add_(-1, yc, torch.full_like(yc, -1, dtype=wide))
            if need_grad:
                dh[rows] = -(p_minus_onehot.to(h.dtype) @ lm_head_weight)      # [C, D]
        ctx.save_for_backward(dh)
        return token_logps

    @staticmethod
    def backward(ctx, grad):                                                   # [N]
        (dh,) = ctx.saved_tensors                                              # [N, D]
        return (dh * grad[:, None]).to(dh.dtype), None, None, None, None       # [N, D]


def _response_token_logps_chunked(hidden, lm_head_weight, labels, chunk_size):
    """log p(target) of every response token, [N] in row-major order, and its batch row [N]."""
    if lm_head_weight.dim() != 2 or hidden.dim() != 3 or hidden.shape[-1] != lm_head_weight.shape[1]:
        raise ValueError(f"hidden has shape {tuple(hidden.shape)} and lm_head_weight "
                         f"{tuple(lm_head_weight.shape)}; expected [B, T, D] and [V, D] with the same D")
    if chunk_size < 1:
        raise ValueError(f"chunk_size is {chunk_size}, expected a positive number of positions")
    _check_labels(labels, hidden, "hidden", lm_head_weight.shape[0])
    targets = shift_labels(labels)                                        # [B, T]
    mask = targets != IGNORE_INDEX                                        # [B, T]
    rows = mask.nonzero()[:, 0]                                           # [N] batch row of each token
    h, y = hidden[mask], targets[mask]                                    # [N, D], [N]
    if not (lm_head_weight.requires_grad and torch.is_grad_enabled()):     # frozen head: ∂h in forward
        need_grad = h.requires_grad and torch.is_grad_enabled()
        return _FrozenHeadTokenLogps.apply(h, lm_head_weight.detach(), y, need_grad, chunk_size), rows  # [N], [N]
    # ∂W too: recompute each chunk in backward. One empty chunk when N = 0, so the (empty) result stays
    # connected to hidden's graph.
    starts = range(0, max(y.shape[0], 1), chunk_size)
    pieces = [checkpoint(_linear_token_logps, h[i:i + chunk_size], lm_head_weight, y[i:i + chunk_size],
                         use_reentrant=False) for i in starts]            # [C]
    return torch.cat(pieces), rows                                        # [N], [N]


def sequence_logps_chunked(hidden, lm_head_weight, labels, chunk_size=256):
    """sequence_logps(F.linear(hidden, lm_head_weight), labels), without the [B, T, V] logits: only
    response positions reach the lm_head, chunk_size of them at a time, recomputed in backward.
    hidden [B, T, D] (model.hidden_states), lm_head_weight [V, D], labels [B, T] → logps [B]."""
    token_logps, rows = _response_token_logps_chunked(hidden, lm_head_weight, labels, chunk_size)  # [N]
    return token_logps.new_zeros(labels.shape[0]).index_add(0, rows, token_logps)                # [B]


def sft_loss_chunked(hidden, lm_head_weight, labels, chunk_size=256):
    """sft_loss(F.linear(hidden, lm_head_weight), labels), without the [B, T, V] logits (see
    sequence_logps_chunked): L = −mean of the N response-token log-probs. ValueError if N = 0."""
    token_logps, _ = _response_token_logps_chunked(hidden, lm_head_weight, labels, chunk_size)     # [N]
    if token_logps.numel() == 0:
        raise ValueError("sft_loss_chunked: the batch has no response tokens (every shifted label is -100)")
    return -token_logps.mean()


# --- DPO ---

def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0, ipo=False):
    """DPO loss (Rafailov et al. 2023, eq. 7), one value per preference pair.
        h = [log πθ(y_w|x) − log π_ref(y_w|x)] − [log πθ(y_l|x) − log π_ref(y_l|x)]
        L = −log σ(β·h)                                                   DPO, eq. 7
        L = −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)                           cDPO, label_smoothing = ε
        L = (h − 1/(2β))²                                                 IPO, ipo=True
    cDPO (conservative DPO, Mitchell 2023) assumes each preference label is flipped with probability ε,
    0 ≤ ε < 0.5 (at 0.5 the loss is constant). IPO is Azar et al. 2023, eq. 17, with their τ as β; it is
    not combined with label smoothing.

    Inputs: four [B] log-probs, each a sum over the response tokens (sequence_logps), as in the DPO and
    IPO papers, where π(y|x) is the probability of the whole response. The same sums feed IPO here, as in
    the DPO authors' reference code; TRL instead divides each sequence's log-prob by its response length
    for IPO (a per-token h). To get that, pass sequence_logps / response-token count; β must then be
    chosen for a per-token scale.
    Returns losses, chosen_rewards, rejected_rewards, all [B]; reward = β(log πθ − log π_ref), detached."""
    shapes = [tuple(t.shape) for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                       ref_rejected_logps)]
    if len(set(shapes)) != 1 or len(shapes[0]) != 1:
        raise ValueError(f"dpo_loss: policy_chosen, policy_rejected, ref_chosen, ref_rejected logps have "
                         f"shapes {shapes}; expected four equal [B]")
    if not beta > 0:
        raise ValueError(f"dpo_loss: beta is {beta}, expected > 0")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing is {label_smoothing}, expected 0 <= ε < 0.5")
    if ipo and label_smoothing:
        raise ValueError("dpo_loss: label_smoothing applies to the sigmoid loss, not to IPO")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps              # [B] log πθ(y_w|x) − log π_ref(y_w|x)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps        # [B] log πθ(y_l|x) − log π_ref(y_l|x)
    h = chosen_logratios - rejected_logratios                              # [B]
    if ipo:
        losses = (h - 1 / (2 * beta)) ** 2                                 # IPO, eq. 17
    else:
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h)          # eq. 7 when ε = 0
                  - label_smoothing * F.logsigmoid(-beta * h))
    chosen_rewards = beta * chosen_logratios.detach()                      # [B]
    rejected_rewards = beta * rejected_logratios.detach()                  # [B]
    return losses, chosen_rewards, rejected_rewards
