"""losses.py: SFT cross-entropy, sequence log-probs and the DPO / cDPO / IPO losses, checked against hand
arithmetic, independent formulas written here, gradcheck, and transformers' LLaMA on the same weights."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import transformers

from losses import (IGNORE_INDEX, dpo_loss, sequence_logps, sequence_logps_chunked, sft_loss, sft_loss_chunked,
                    shift_labels)
from model.config import PRESETS
from model.llama import Llama


def random_batch(B=3, T=9, V=11, D=6, seed=0, dtype=torch.float64):
    """hidden [B, T, D], lm_head weight [V, D], labels [B, T] with a prompt, a response and right padding
    per row (response lengths differ; row 1 has a response token at the last position, which predicts
    nothing)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=dtype)
    weight = torch.randn(V, D, generator=g, dtype=dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.full((B, T), IGNORE_INDEX)
    for b, (start, end) in enumerate([(2, 6), (4, T), (1, 3)][:B]):
        labels[b, start:end] = ids[b, start:end]
    return hidden, weight, labels


def loop_sequence_logps(logits, labels):
    """Independent formula, one token at a time: token labels[b, t] is scored by the logits at t − 1."""
    out = []
    for b in range(labels.shape[0]):
        s = 0.0
        for t in range(1, labels.shape[1]):
            if labels[b, t] != IGNORE_INDEX:
                s += torch.log_softmax(logits[b, t - 1].double(), -1)[labels[b, t]].item()
        out.append(s)
    return torch.tensor(out, dtype=torch.float64)


# --- sft_loss and sequence_logps ---

def test_sft_loss_equals_hand_computed_cross_entropy_of_a_two_token_response():
    """V = 3, T = 3, labels [-100, 1, 2]: position 0 predicts token 1, position 1 predicts token 2,
    position 2 predicts nothing.
      logits[0] = [0, 0, 0]        → p(1) = 1/3
      logits[1] = [0, 0, log 2]    → p(2) = 2 / (1 + 1 + 2) = 1/2
      logits[2] = [100, -100, 0]   → ignored (the last position has no next token)
    L = (log 3 + log 2) / 2 = log(6) / 2;  sequence_logps = log(1/3) + log(1/2) = −log 6."""
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, math.log(2)], [100.0, -100.0, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 2]])
    assert sft_loss(logits, labels).item() == pytest.approx(math.log(6) / 2, abs=1e-6)
    assert sequence_logps(logits, labels).item() == pytest.approx(-math.log(6), abs=1e-6)


def test_shift_labels_moves_labels_left_and_ignores_the_last_position():
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, 7]])
    assert shift_labels(labels).tolist() == [[5, 6, 7, IGNORE_INDEX]]


def test_sequence_logps_scores_token_t_plus_1_with_logits_at_t_as_a_per_token_loop_does():
    _, _, labels = random_batch()
    logits = torch.randn(3, 9, 11, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(sequence_logps(logits, labels).double(), loop_sequence_logps(logits, labels), atol=1e-5)
    # the unshifted pairing (logits at t scoring token t) gives a different answer: the shift matters
    unshifted = F.pad(labels, (1, 0), value=IGNORE_INDEX)[:, :-1]
    assert not torch.allclose(sequence_logps(logits, unshifted).double(), loop_sequence_logps(logits, labels),
                              atol=1e-2)


def test_sft_loss_equals_torch_cross_entropy_on_shifted_logits_and_labels():
    _, _, labels = random_batch()
    logits = torch.randn(3, 9, 11, generator=torch.Generator().manual_seed(2))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(sft_loss(logits, labels), expected, atol=1e-6)


def test_sft_loss_upcasts_bf16_logits_to_fp32_and_returns_fp32():
    _, _, labels = random_batch()
    logits = torch.randn(3, 9, 11, generator=torch.Generator().manual_seed(3)).bfloat16()
    loss = sft_loss(logits, labels)
    assert loss.dtype == torch.float32
    expected = F.cross_entropy(logits[:, :-1].float().reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_sequence_logps_of_a_row_without_response_tokens_is_zero():
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 2:] = torch.tensor([1, 2, 3])
    labels[1, 0] = 4            # a label at position 0 is never predicted: the row still has no target
    logps = sequence_logps(logits, labels)
    assert logps[1].item() == 0.0 and logps[0].item() < 0
    hidden, weight = torch.randn(2, 5, 3), torch.randn(7, 3)
    assert sequence_logps_chunked(hidden, weight, labels)[1].item() == 0.0


def test_sft_loss_raises_when_the_batch_has_no_response_tokens():
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[:, 0] = 3
    with pytest.raises(ValueError, match="no response tokens"):
        sft_loss(torch.randn(2, 5, 7), labels)
    with pytest.raises(ValueError, match="no response tokens"):
        sft_loss_chunked(torch.randn(2, 5, 3), torch.randn(7, 3), labels)


def test_shape_disagreements_raise_value_errors_naming_the_shapes():
    with pytest.raises(ValueError, match=r"labels has shape \(2, 4\) and logits \(2, 5, 7\)"):
        sequence_logps(torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels has shape \(2, 5\) and logits \(10, 7\)"):
        sft_loss(torch.randn(10, 7), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels has shape \(3, 5\) and hidden \(2, 5, 4\)"):
        sft_loss_chunked(torch.randn(2, 5, 4), torch.randn(7, 4), torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"hidden has shape \(2, 5, 4\) and lm_head_weight \(7, 3\)"):
        sequence_logps_chunked(torch.randn(2, 5, 4), torch.randn(7, 3), torch.zeros(2, 5, dtype=torch.long))


def test_labels_outside_the_vocabulary_or_not_integers_raise_value_errors():
    labels = torch.tensor([[IGNORE_INDEX, 3, 7]])
    with pytest.raises(ValueError, match=r"such as 7 .* \[0, 7\)"):
        sequence_logps(torch.randn(1, 3, 7), labels)
    with pytest.raises(ValueError, match=r"such as 7 .* \[0, 7\)"):
        sequence_logps_chunked(torch.randn(1, 3, 4), torch.randn(7, 4), labels)
    with pytest.raises(ValueError, match="integer dtype"):
        sft_loss(torch.randn(1, 3, 7), labels.float())


# --- chunked = plain ---

@pytest.mark.parametrize("chunk_size", [1, 4, 7, 256])
def test_chunked_sft_loss_and_sequence_logps_equal_plain_ones_with_equal_gradients(chunk_size):
    hidden, weight, labels = random_batch()
    for plain_fn, chunked_fn in [(sft_loss, sft_loss_chunked), (sequence_logps, sequence_logps_chunked)]:
        h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        plain = plain_fn(F.linear(h1, w1), labels)
        chunked = chunked_fn(h2, w2, labels, chunk_size=chunk_size)
        assert chunked.shape == plain.shape and chunked.dtype == torch.float64
        assert torch.allclose(chunked, plain, atol=1e-12)
        cotangent = torch.arange(1.0, plain.numel() + 1, dtype=plain.dtype).reshape(plain.shape)
        (plain * cotangent).sum().backward()
        (chunked * cotangent).sum().backward()
        assert torch.allclose(h2.grad, h1.grad, atol=1e-12)
        assert torch.allclose(w2.grad, w1.grad, atol=1e-12)


def test_chunked_equals_plain_in_bf16_and_returns_fp32():
    hidden, weight, labels = random_batch(dtype=torch.float32)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    plain = sequence_logps(F.linear(hidden, weight), labels)
    chunked = sequence_logps_chunked(hidden, weight, labels, chunk_size=3)
    assert chunked.dtype == plain.dtype == torch.float32
    assert torch.allclose(chunked, plain, atol=1e-2)   # bf16 logits may round differently per matmul shape


def test_chunked_gradcheck_in_float64():
    hidden, weight, labels = random_batch(B=2, T=5, V=4, D=3)
    hidden.requires_grad_(), weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w: sequence_logps_chunked(h, w, labels, chunk_size=2),
                                    (hidden, weight))
    assert torch.autograd.gradcheck(lambda h, w: sft_loss_chunked(h, w, labels, chunk_size=3), (hidden, weight))


def test_chunked_sequence_logps_runs_without_gradients_for_the_reference_pass():
    hidden, weight, labels = random_batch()
    with torch.no_grad():
        ref = sequence_logps_chunked(hidden, weight, labels, chunk_size=2)
    assert not ref.requires_grad
    assert torch.allclose(ref, sequence_logps(F.linear(hidden, weight), labels), atol=1e-12)


# --- parity with transformers ---

def test_sequence_logps_and_sft_loss_match_transformers_llama_on_the_same_weights():
    """A tiny random LlamaForCausalLM; its weights load into our Llama (same keys). Log-probs from HF's
    logits by an independent gather, and HF's own shifted loss, against ours (plain and chunked)."""
    cfg = replace(PRESETS["tiny"], vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False)).eval()
    with torch.no_grad():                      # larger than HF's 0.02 init, so logits are far from uniform
        for p in hf.parameters():
            p.copy_(p + 0.2 * torch.randn_like(p))
    ours = Llama(cfg)
    ours.load_state_dict(hf.state_dict())
    ours.eval()

    B, T = 3, 12
    input_ids = torch.randint(3, cfg.vocab_size, (B, T))
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, 9:] = 0                  # right padding
    attention_mask[2, 6:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX               # a 4-token prompt

    with torch.no_grad():
        out = hf(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        hf_logps = torch.log_softmax(out.logits[:, :-1].double(), -1)                 # [B, T-1, V]
        targets = labels[:, 1:]                                                       # [B, T-1]
        gathered = hf_logps.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)   # [B, T-1]
        expected = (gathered * (targets != IGNORE_INDEX)).sum(-1)                     # [B]

        hidden = ours.hidden_states(input_ids, attention_mask)
        logits = ours.lm_head(hidden)
        assert torch.allclose(sequence_logps(logits, labels).double(), expected, atol=1e-4)
        assert torch.allclose(sequence_logps_chunked(hidden, ours.lm_head.weight, labels, chunk_size=5).double(),
                              expected, atol=1e-4)
        assert torch.allclose(sft_loss(logits, labels), out.loss, atol=1e-5)
        assert torch.allclose(sft_loss_chunked(hidden, ours.lm_head.weight, labels), out.loss, atol=1e-5)


# --- dpo_loss ---

def logps_with_margins(margins, beta, dtype=torch.float64):
    """Four [B] log-prob tensors with β·h = margins: policy_chosen = −1 + m/β, the others −1."""
    m = torch.tensor(margins, dtype=dtype)
    other = torch.full_like(m, -1.0)
    return -1.0 + m / beta, other.clone(), other.clone(), other.clone()


def test_dpo_loss_equals_hand_computed_values_at_scaled_margins_0_1_2():
    """β = 0.1 and h = 0, 10, 20, so β·h = 0, 1, 2; L = −log σ(βh) = log(1 + e^(−βh)):
      βh = 0: log(1 + 1)       = log 2             ≈ 0.693147
      βh = 1: log(1 + e^(−1))  = log(1.367879)     ≈ 0.313262
      βh = 2: log(1 + e^(−2))  = log(1.135335)     ≈ 0.126928
    chosen reward = β(log πθ − log π_ref)(y_w) = 0.1 · h = 0, 1, 2; rejected reward = 0.
    IPO at the same inputs: (h − 1/(2β))² = (h − 5)² = 25, 25, 225."""
    beta = 0.1
    inputs = logps_with_margins([0.0, 1.0, 2.0], beta)
    losses, chosen_rewards, rejected_rewards = dpo_loss(*inputs, beta=beta)
    expected = [math.log(2), math.log(1 + math.exp(-1)), math.log(1 + math.exp(-2))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert chosen_rewards.tolist() == pytest.approx([0.0, 1.0, 2.0], abs=1e-12)
    assert rejected_rewards.tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)
    ipo_losses, _, _ = dpo_loss(*inputs, beta=beta, ipo=True)
    assert ipo_losses.tolist() == pytest.approx([25.0, 25.0, 225.0], abs=1e-9)


def test_dpo_loss_is_log2_when_policy_equals_reference():
    policy = torch.tensor([-12.0, -3.5]), torch.tensor([-7.0, -40.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(*policy, *policy, beta=0.5)
    assert torch.allclose(losses, torch.full((2,), math.log(2)))
    assert chosen_rewards.abs().max() == 0 and rejected_rewards.abs().max() == 0


def test_cdpo_with_label_smoothing_mixes_the_loss_of_the_flipped_label():
    """βh = 1, ε = 0.2: L = 0.8 · log(1 + e^(−1)) + 0.2 · log(1 + e^(1))."""
    inputs = logps_with_margins([1.0], beta=0.1)
    losses, _, _ = dpo_loss(*inputs, beta=0.1, label_smoothing=0.2)
    assert losses.item() == pytest.approx(0.8 * math.log(1 + math.exp(-1)) + 0.2 * math.log(1 + math.e), abs=1e-12)


def test_dpo_loss_gradient_at_zero_margin_is_minus_beta_over_2_for_the_chosen_logps():
    """dL/dh = −β·σ(−βh) = −β/2 at h = 0; dh/d log πθ(y_w|x) = 1 and dh/d log πθ(y_l|x) = −1."""
    beta = 0.3
    pc, pr, rc, rr = (torch.tensor([-5.0], dtype=torch.float64, requires_grad=True) for _ in range(4))
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-beta / 2, abs=1e-12)
    assert pr.grad.item() == pytest.approx(beta / 2, abs=1e-12)
    assert rc.grad.item() == pytest.approx(beta / 2, abs=1e-12)
    assert rr.grad.item() == pytest.approx(-beta / 2, abs=1e-12)


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"ipo": True}])
def test_dpo_loss_passes_gradcheck_in_float64(options):
    g = torch.Generator().manual_seed(0)
    inputs = tuple((-20 * torch.rand(5, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(4))
    assert torch.autograd.gradcheck(lambda *x: dpo_loss(*x, beta=0.2, **options)[0], inputs)


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.25}, {"ipo": True}])
def test_dpo_loss_equals_an_independent_implementation_of_the_formula(options):
    """h from probabilities as the IPO paper writes it, h = log[πθ(y_w) π_ref(y_l) / (πθ(y_l) π_ref(y_w))],
    σ written out as 1 / (1 + e^(−x))."""
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-3 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4))
    beta, eps = 0.7, options.get("label_smoothing", 0.0)
    h = torch.log(pc.exp() * rr.exp() / (pr.exp() * rc.exp()))
    sigma = lambda x: 1 / (1 + torch.exp(-x))  # noqa: E731
    if options.get("ipo"):
        expected = (h - 1 / (2 * beta)) ** 2
    else:
        expected = -(1 - eps) * torch.log(sigma(beta * h)) - eps * torch.log(sigma(-beta * h))
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=beta, **options)
    assert torch.allclose(losses, expected, atol=1e-12)
    assert torch.allclose(chosen_rewards, beta * (pc - rc)) and torch.allclose(rejected_rewards, beta * (pr - rr))


def test_dpo_rewards_are_detached_and_losses_are_per_pair():
    pc = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, torch.zeros(3), torch.zeros(3), torch.zeros(3), beta=0.1)
    assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == (3,)
    assert losses.requires_grad and not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_dpo_loss_rejects_bad_shapes_beta_and_options():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"shapes \[\(3,\), \(2,\), \(3,\), \(3,\)\]"):
        dpo_loss(x, torch.zeros(2), x, x, beta=0.1)
    with pytest.raises(ValueError, match="expected four equal"):
        dpo_loss(*(torch.zeros(2, 3),) * 4, beta=0.1)
    with pytest.raises(ValueError, match="beta is 0"):
        dpo_loss(x, x, x, x, beta=0)
    with pytest.raises(ValueError, match="label_smoothing is 0.5"):
        dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="not to IPO"):
        dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.1, ipo=True)


# --- the loss through a frozen lm_head ---


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 256])
def test_frozen_head_loss_and_its_gradient_equal_the_plain_loss(chunk_size):
    """lm_head weight without requires_grad: ∂h is made in forward. fp64, 1e-12."""
    hidden, weight, labels = random_batch()
    for plain_fn, chunked_fn in [(sft_loss, sft_loss_chunked), (sequence_logps, sequence_logps_chunked)]:
        h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
        plain = plain_fn(F.linear(h1, weight), labels)
        fast = chunked_fn(h2, weight, labels, chunk_size=chunk_size)
        assert fast.shape == plain.shape and fast.dtype == torch.float64
        torch.testing.assert_close(fast, plain, rtol=0, atol=1e-12)
        cotangent = torch.arange(1.0, plain.numel() + 1, dtype=plain.dtype).reshape(plain.shape)
        (plain * cotangent).sum().backward()
        (fast * cotangent).sum().backward()
        torch.testing.assert_close(h2.grad, h1.grad, rtol=0, atol=1e-12)


def test_frozen_head_loss_gradcheck_in_float64():
    hidden, weight, labels = random_batch(B=2, T=5, V=4, D=3)
    assert torch.autograd.gradcheck(lambda h: sequence_logps_chunked(h, weight, labels, chunk_size=2),
                                    (hidden.requires_grad_(),))


def test_frozen_head_loss_is_exact_where_the_target_probability_underflows():
    """A target 200 nats below the rest: softmax gives p = 0 in fp32, log p = −inf; the fallback returns
    z[y] − logsumexp(z), equal to the fp64 plain value to fp32 rounding."""
    hidden, weight, labels = random_batch(B=1, T=4, V=5, D=5, dtype=torch.float32)
    labels[0] = torch.tensor([IGNORE_INDEX, 2, 3, 1])
    hidden[0, 0] = 0
    hidden[0, 0, 2] = -200.0                                    # z = h Wᵀ with W = I: target 2 at −200
    weight = torch.eye(5)
    fast = sequence_logps_chunked(hidden.requires_grad_(), weight, labels)
    plain = sequence_logps(F.linear(hidden.double(), weight.double()), labels)
    assert torch.isfinite(fast).all() and fast.item() < -199
    torch.testing.assert_close(fast.double(), plain, rtol=1e-6, atol=0)


def test_frozen_head_loss_in_bf16_is_close_to_the_plain_loss_and_fp32():
    hidden, weight, labels = random_batch(dtype=torch.float32)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    plain = sequence_logps(F.linear(h1, weight), labels)
    fast = sequence_logps_chunked(h2, weight, labels, chunk_size=3)
    assert fast.dtype == torch.float32 and h2.dtype == torch.bfloat16
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)   # same bf16 logits, fp32 softmax
    plain.sum().backward()
    fast.sum().backward()
    assert h2.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h2.grad.float(), h1.grad.float(), rtol=2e-2, atol=2e-2)


