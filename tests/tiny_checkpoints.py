"""Tiny random Hugging Face LLaMA checkpoints in every layout the OpenLLaMA and OpenBezoar releases use.

The files are written with safetensors and torch.save directly, as transformers and the releases wrote
them, never with model/loading.py (which they test). transformers is the test-only oracle. Also here: a
left-padded batch and the logits comparison the parity tests share.
"""
import json
import os

import torch
import transformers
from safetensors.torch import save_file

LAYOUTS = ("safetensors", "safetensors-sharded", "bin", "bin-sharded")
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tiny_hf_model(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    """A 2-layer LlamaForCausalLM with random weights large enough that a misplaced tensor shows in the
    logits: matrices N(0, 0.1²) (embeddings N(0, 1)), norm weights 1 + N(0, 0.1²)."""
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    kw.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(0.1 * noise)
    return model


def hf_state_dict(model, dtype=torch.float32) -> dict:
    """The tensors transformers stores: lm_head.weight left out when tied to the embeddings."""
    state = {k: v.detach().to(dtype).contiguous().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


def write_config(model, folder, dtype=torch.float32, edits=None):
    """config.json as transformers 5.x writes it ("dtype", "rope_parameters"); `edits` sets keys, and a
    value of None deletes the key (to write older spellings by hand)."""
    d = model.config.to_dict()
    d["dtype"] = str(dtype).removeprefix("torch.")
    for k, v in (edits or {}).items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(d, f, indent=2)


def _shard_names(state):
    """Three shards: embeddings and layer 0; the other layers; final norm and head."""
    first = [k for k in state if "embed_tokens" in k or k.startswith("model.layers.0.")]
    last = [k for k in state if k in ("model.norm.weight", "lm_head.weight")]
    middle = [k for k in state if k not in first and k not in last]
    return [first, middle, last]


def write_checkpoint(model, folder, layout="safetensors", dtype=torch.float32, config_edits=None,
                     extra=None, legacy=False) -> str:
    """Write `model` to `folder` in `layout` (one of LAYOUTS) with `dtype` storage. `extra` adds tensors
    (e.g. stray rotary_emb.inv_freq buffers); legacy=True uses torch's pre-1.6 .bin format."""
    os.makedirs(folder, exist_ok=True)
    state = hf_state_dict(model, dtype)
    state.update(extra or {})
    write_config(model, folder, dtype, config_edits)
    if layout == "safetensors":
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    elif layout == "bin":
        torch.save(state, os.path.join(folder, "pytorch_model.bin"), _use_new_zipfile_serialization=not legacy)
    elif layout in ("safetensors-sharded", "bin-sharded"):
        shards = _shard_names(state)
        weight_map = {}
        for i, names in enumerate(shards):
            part = {k: state[k] for k in names}
            if layout == "safetensors-sharded":
                file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(part, os.path.join(folder, file), metadata={"format": "pt"})
            else:
                file = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
                torch.save(part, os.path.join(folder, file), _use_new_zipfile_serialization=not legacy)
            weight_map.update({k: file for k in names})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": weight_map}
        name = "model.safetensors.index.json" if layout == "safetensors-sharded" else "pytorch_model.bin.index.json"
        with open(os.path.join(folder, name), "w") as f:
            json.dump(index, f, indent=2)
    else:
        raise ValueError(f"unknown layout {layout!r}, expected one of {LAYOUTS}")
    return str(folder)


# --- comparing logits ------------------------------------------------------------------------------------

TOL = 1e-4    # fp32: both sides compute from the same fp32 values; only summation order differs


def batch(vocab_size=96, seed=1):
    """Two sequences of 12 tokens, the second left-padded by 3: ids, mask [2, 12]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


def hf_logits(hf, ids, mask):
    """transformers' logits with the positions our Llama gives a left-padded row (real tokens from 0)."""
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits


def our_logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask)


def assert_close_on_real_tokens(ours, theirs, mask):
    real = mask.bool()                                   # padding positions' outputs are never used
    diff = (ours[real] - theirs[real]).abs().max().item()
    assert diff <= TOL, f"max |Δlogit| {diff:.2e} > {TOL}"
