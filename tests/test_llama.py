"""The LLaMA architecture, piece by piece, against independent formulas (parity with transformers'
whole model is in test_parity.py)."""
from dataclasses import replace

import pytest
import torch

from model.config import PRESETS, LlamaConfig, config_from_dict
from model.llama import Llama, RMSNorm, apply_rotary, attention, rotary_cos_sin
from model.packed import tree_mask

CFG = replace(PRESETS["tiny"], vocab_size=50, num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
              num_key_value_heads=4, intermediate_size=64)


def tiny(seed=0, **kw):
    m = Llama(replace(CFG, **kw))
    m.init_weights(seed=seed, std=0.2)
    return m


def test_rmsnorm_divides_by_root_mean_square_then_scales():
    norm = RMSNorm(4, eps=1e-6)
    norm.weight.data = torch.tensor([1.0, 2.0, 0.5, -1.0])
    x = torch.tensor([[3.0, -4.0, 0.0, 0.0]])          # mean of squares = 25/4, rms = 2.5
    expected = torch.tensor([[3 / 2.5, 2 * -4 / 2.5, 0.0, 0.0]])
    assert torch.allclose(norm(x), expected, atol=1e-5)


def test_rotary_rotate_half_equals_complex_rotation_of_paired_dims():
    """Pair (x_i, x_{i+Dh/2}) as a complex number z; rotary multiplies z by e^{i·p·θ^(-2i/Dh)}."""
    Dh, theta = 8, 10000.0
    x = torch.randn(1, 1, 5, Dh)
    pos = torch.arange(5)[None]
    cos, sin = rotary_cos_sin(pos, Dh, theta, torch.float32)
    ours = apply_rotary(x, cos, sin)
    z = torch.complex(x[..., :Dh // 2], x[..., Dh // 2:])
    freqs = theta ** (-torch.arange(0, Dh, 2).float() / Dh)
    rot = torch.polar(torch.ones(5, Dh // 2), pos[0, :, None].float() * freqs)
    w = z * rot
    assert torch.allclose(ours, torch.cat([w.real, w.imag], dim=-1), atol=1e-5)


def test_future_tokens_do_not_change_earlier_logits():
    m = tiny().eval()
    a = torch.randint(0, 50, (1, 10))
    b = a.clone()
    b[0, 6:] = torch.randint(0, 50, (4,))
    with torch.no_grad():
        assert torch.allclose(m(a)[0, :6], m(b)[0, :6], atol=1e-6)
        assert not torch.allclose(m(a)[0, 6:], m(b)[0, 6:], atol=1e-3)


def test_left_padding_gives_the_unpadded_logits():
    m = tiny().eval()
    x = torch.randint(3, 50, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    with torch.no_grad():
        assert torch.allclose(m(padded, attention_mask=mask)[:, 3:], m(x), atol=1e-5)


def test_right_padding_gives_the_unpadded_logits():
    m = tiny().eval()
    x = torch.randint(3, 50, (1, 7))
    padded = torch.cat([x, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 7 + [0, 0, 0]])
    with torch.no_grad():
        assert torch.allclose(m(padded, attention_mask=mask)[:, :7], m(x), atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    """None, every block, or the first of the two (checkpoint_blocks = 1)."""
    x = torch.randint(0, 50, (2, 9))
    grads = []
    for ckpt, blocks in ((False, None), (True, None), (True, 1)):
        m = tiny(seed=4).train()
        m.gradient_checkpointing, m.checkpoint_blocks = ckpt, blocks
        m(x).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for g0, g1, g2 in zip(*grads):
        assert torch.allclose(g0, g1, atol=1e-6) and torch.allclose(g0, g2, atol=1e-6)


def test_grouped_query_attention_repeats_each_kv_head_for_its_query_heads():
    m = tiny(num_key_value_heads=2).eval()
    full = tiny(num_key_value_heads=4).eval()
    sd = m.state_dict()
    Dh = CFG.head_dim
    for i in range(CFG.num_hidden_layers):     # expand k/v heads [2·Dh, D] → [4·Dh, D]: heads 0,0,1,1
        for n in ("k_proj", "v_proj"):
            w = sd[f"model.layers.{i}.self_attn.{n}.weight"].view(2, Dh, -1)
            sd[f"model.layers.{i}.self_attn.{n}.weight"] = w.repeat_interleave(2, dim=0).reshape(4 * Dh, -1)
    full.load_state_dict(sd)
    x = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        assert torch.allclose(m(x), full(x), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_close_to_fp32(dtype):
    m = tiny().eval()
    x = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        ref = m(x)
        low = m.to(dtype)(x)
    assert low.dtype == dtype
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_openllama_preset_has_the_published_shape():
    c = PRESETS["openllama-3b-v2"]
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
            c.max_position_embeddings, c.rms_norm_eps, c.rope_theta, c.tie_word_embeddings) == \
        (32000, 3200, 26, 32, 8640, 2048, 1e-6, 10000.0, False)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id, c.head_dim) == (1, 2, 0, 100)
    with torch.device("meta"):                                           # shapes only, no memory
        n = sum(p.numel() for p in Llama(replace(c, num_hidden_layers=1)).parameters())
    per_layer = 4 * 3200 * 3200 + 3 * 3200 * 8640 + 2 * 3200
    assert n == 2 * 32000 * 3200 + 3200 + per_layer
    assert 3.4e9 < 2 * 32000 * 3200 + 3200 + 26 * per_layer < 3.5e9   # "≈3.43 B parameters"


@pytest.mark.parametrize("spelling", [{"rope_theta": 5e5}, {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, {}])
def test_config_reads_rope_theta_in_every_spelling(spelling):
    d = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, **spelling)
    assert config_from_dict(d).rope_theta == (5e5 if spelling else 10000.0)


def test_config_errors_name_the_file_and_field():
    with pytest.raises(ValueError, match=r"^x/config.json: missing required field\(s\) hidden_size"):
        config_from_dict(dict(vocab_size=10, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2), "x/config.json")
    with pytest.raises(ValueError, match="field num_hidden_layers is '2', expected int"):
        config_from_dict(dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers="2", num_attention_heads=2))
    with pytest.raises(ValueError, match="rope scaling 'linear' is not supported"):
        config_from_dict(dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                              num_attention_heads=2, rope_scaling={"type": "linear", "factor": 2.0}))
    with pytest.raises(ValueError, match="not a multiple"):
        LlamaConfig(hidden_size=10, num_attention_heads=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_the_head_dim_padded_to_a_multiple_of_8_equals_it_unpadded(dtype):
    """Explicit masks (model/llama.py attention): q, k, v zero-padded from Dh 100 to 104, the scale 1/√100 kept,
    so that CUDA's memory-efficient kernel takes them; values and gradients equal the unpadded call."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 100, generator=g).to(dtype).requires_grad_() for _ in range(3))
    segment = torch.tensor([[0, 0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 1, -1, -1]])
    mask = tree_mask(segment)                                                  # [2, 1, 7, 7]
    out = {}
    for pad in (False, True):
        y = attention(q, k, v, mask, pad_head_dim=pad)
        assert y.shape == (2, 3, 7, 100)
        grads = torch.autograd.grad(y, (q, k, v), torch.ones_like(y))
        out[pad] = (y.detach(), *grads)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, **tol)
    assert torch.equal(attention(q, k, v, mask), out[True][0])   # a mask: padded by default


def test_a_decoding_step_without_padding_attends_to_every_cached_key_without_a_mask():
    """T = 1 with a cache and no padding: no mask is built (SDPA's fused kernels), and the step equals the one
    with the explicit all-keys mask and the uncached forward."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 1, 16, generator=g)
    k, v = torch.randn(2, 4, 9, 16, generator=g), torch.randn(2, 4, 9, 16, generator=g)
    every = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    torch.testing.assert_close(attention(q, k, v, None), attention(q, k, v, every), rtol=1e-6, atol=1e-6)
    model = Llama(replace(PRESETS["tiny"], vocab_size=50, num_hidden_layers=2, hidden_size=32,
                          num_attention_heads=2, num_key_value_heads=2, intermediate_size=64))
    model.init_weights(seed=3)
    ids = torch.randint(0, 50, (2, 6), generator=g)
    with torch.no_grad():
        cache = model.new_cache(2, 6)
        model(ids[:, :5], cache=cache)
        step = model(ids[:, 5:], cache=cache)[:, -1]
        full = model(ids)[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_packed_rows_checkpoint_the_blocks_that_checkpoint_blocks_names(monkeypatch):
    """model/packed.py follows Llama.checkpoint_blocks as hidden_states does: with 1 of 2 blocks checkpointed,
    one block is recomputed, and the gradients are those of no checkpointing."""
    import model.packed as packed
    m = tiny(seed=4).train()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    segment = torch.tensor([[0, 0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 1, -1, -1]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 3, 4], [0, 1, 2, 3, 4, 0, 0]])
    calls = []
    real = packed.checkpoint
    monkeypatch.setattr(packed, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    grads = {}
    for ckpt, blocks in ((False, None), (True, 1), (True, None)):
        m.gradient_checkpointing, m.checkpoint_blocks = ckpt, blocks
        m.zero_grad()
        packed.hidden_states_packed(m, ids, positions, packed.tree_mask(segment)).square().sum().backward()
        grads[ckpt, blocks] = [p.grad.clone() for p in m.parameters() if p.grad is not None]   # (not lm_head)
    assert len(calls) == 1 + 2                                  # one block, then both
    for g in (grads[True, 1], grads[True, None]):
        assert len(g) == len(grads[False, None]) > 0
        for a, b in zip(g, grads[False, None]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
