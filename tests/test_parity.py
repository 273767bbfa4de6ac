"""Logits parity with transformers.LlamaForCausalLM for every checkpoint layout, both ways.

Both sides load the same files, in fp32: for 16-bit storage both upcast the same 16-bit values, so the
logits must agree to float32 rounding (1e-4) whatever the storage dtype.
"""
import pytest
import torch
import transformers

from model.loading import load_pretrained, save_pretrained
from tests.tiny_checkpoints import (LAYOUTS, STORAGE_DTYPES, assert_close_on_real_tokens, batch, hf_logits,
                                    hf_state_dict, our_logits, tiny_hf_model, write_checkpoint)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_equal_transformers_for_every_layout_and_storage_dtype(tmp_path, layout, dtype):
    hf_model = tiny_hf_model()
    folder = write_checkpoint(hf_model, tmp_path / layout, layout, dtype)
    ours = load_pretrained(folder, dtype=torch.float32)
    theirs = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # Every tensor is the stored value, upcast exactly: bit for bit.
    for name, t in hf_state_dict(hf_model, dtype).items():
        assert torch.equal(ours.state_dict()[name], t.float()), name
    ids, mask = batch()
    assert_close_on_real_tokens(our_logits(ours, ids, mask), hf_logits(theirs, ids, mask), mask)


def test_tied_embeddings_are_tied_and_logits_equal_transformers(tmp_path):
    hf_model = tiny_hf_model(tie_word_embeddings=True)
    folder = write_checkpoint(hf_model, tmp_path, "safetensors")   # no lm_head.weight in the file
    ours = load_pretrained(folder)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids, mask = batch()
    theirs = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert_close_on_real_tokens(our_logits(ours, ids, mask), hf_logits(theirs, ids, mask), mask)


def test_legacy_format_bin_loads_with_a_warning_and_equals_transformers(tmp_path):
    hf_model = tiny_hf_model()
    folder = write_checkpoint(hf_model, tmp_path, "bin", torch.float16, legacy=True)
    with pytest.warns(UserWarning, match="legacy torch.save format"):
        ours = load_pretrained(folder, dtype=torch.float32)
    theirs = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids, mask = batch()
    assert_close_on_real_tokens(our_logits(ours, ids, mask), hf_logits(theirs, ids, mask), mask)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_a_folder_we_save_loads_in_transformers_with_the_same_logits(tmp_path, dtype):
    """Saved sharded (a 40 kB limit gives several shards and an index) in each storage dtype; transformers
    reads our config.json and files unchanged and computes our logits."""
    ours = load_pretrained(write_checkpoint(tiny_hf_model(), tmp_path / "src"), dtype=dtype)
    save_pretrained(ours, tmp_path / "out", max_shard_size="40kB")
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids, mask = batch()
    ours = load_pretrained(tmp_path / "out", dtype=torch.float32)
    assert_close_on_real_tokens(our_logits(ours, ids, mask), hf_logits(theirs, ids, mask), mask)
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").dtype == dtype


def test_a_tied_model_we_save_loads_in_transformers_with_the_same_logits(tmp_path):
    ours = load_pretrained(write_checkpoint(tiny_hf_model(tie_word_embeddings=True), tmp_path / "src"))
    save_pretrained(ours, tmp_path / "out")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    ids, mask = batch()
    assert_close_on_real_tokens(our_logits(ours, ids, mask), hf_logits(theirs, ids, mask), mask)
