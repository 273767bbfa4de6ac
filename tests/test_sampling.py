"""Sampling with a KV cache: cached decoding equals recomputing the whole sequence each step."""
from dataclasses import replace

import pytest
import torch

from model.config import PRESETS
from model.llama import Llama
from model.sampling import generate, left_pad, sample_next


class CharTokenizer:
    """Decodes id i as the letter chr(97 + i % 26): enough to exercise stop strings."""

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Llama(replace(PRESETS["tiny"], vocab_size=64, num_hidden_layers=2, hidden_size=64,
                      num_attention_heads=4, num_key_value_heads=4, intermediate_size=128))
    m.init_weights(seed=1, std=0.3)  # large weights: a peaked, prompt-dependent next-token distribution
    return m.eval()


PROMPTS = [[1, 5, 9, 33, 2, 7], [1, 40], [1, 3, 3, 3, 11, 12, 13, 14, 15]]


def test_cached_greedy_decoding_equals_full_recomputation(model):
    cached = generate(model, PROMPTS, 12)
    full = generate(model, PROMPTS, 12, use_cache=False)
    assert [c.tokens for c in cached] == [c.tokens for c in full]
    assert all(len(c.tokens) == 12 and c.finish_reason == "length" for c in cached)


def test_cached_sampling_equals_full_recomputation_with_the_same_seed(model):
    kw = dict(temperature=0.9, top_p=0.9)
    cached = generate(model, PROMPTS, 10, generator=torch.Generator().manual_seed(3), **kw)
    full = generate(model, PROMPTS, 10, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert [c.tokens for c in cached] == [c.tokens for c in full]


def test_left_padded_batch_continues_each_prompt_as_if_alone(model):
    batch = generate(model, PROMPTS, 8)
    for p, c in zip(PROMPTS, batch):
        assert generate(model, [p], 8)[0].tokens == c.tokens


def test_greedy_tokens_are_the_argmax_of_the_full_forward(model):
    tokens = generate(model, [PROMPTS[0]], 5)[0].tokens
    seq = list(PROMPTS[0])
    for t in tokens:
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0, -1]
        assert t == int(logits.argmax())
        seq.append(t)


def test_eos_ends_a_row_and_is_not_returned(model):
    first = generate(model, [PROMPTS[0]], 1)[0].tokens[0]
    out = generate(model, [PROMPTS[0], PROMPTS[1]], 6, eos_id=first)
    assert out[0].tokens == [] and out[0].finish_reason == "eos"
    assert first not in out[1].tokens and out[1].finish_reason in ("eos", "length")


def test_stop_string_ends_a_row_and_cuts_the_text(model):
    tok = CharTokenizer()
    free = generate(model, [PROMPTS[2]], 10, tokenizer=tok)[0]
    stop = free.text[3:5]                      # a string the free-running text is known to contain
    out = generate(model, [PROMPTS[2]], 10, tokenizer=tok, stop_strings=[stop])[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[:free.text.index(stop)]
    assert stop in tok.decode(out.tokens) and stop not in tok.decode(out.tokens[:-1])


def test_top_p_keeps_only_the_smallest_prefix_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: with top_p 0.7 the nucleus is {0, 1} (0.5 < 0.7 <= 0.8)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(400, 4)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_p=0.7, generator=g)
    assert set(draws.tolist()) == {0, 1}
    # renormalised nucleus: P(0) = 0.5 / 0.8 = 0.625; 400 draws put the count within ±5σ (σ ≈ 9.7)
    assert abs(int((draws == 0).sum()) - 250) < 50
    assert set(sample_next(logits, 1.0, 0.5, g).tolist()) == {0}


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 17)
    assert torch.equal(sample_next(logits, 0.0, 1.0), logits.argmax(-1))


def test_left_pad_right_aligns_prompts():
    ids, mask = left_pad([[4, 5, 6], [7]], pad_id=0, device="cpu")
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_bad_arguments_are_refused(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 3)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 3, top_p=0.0)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, [[1]], 3, stop_strings=["x"])
