"""Checkpoint loading and saving: config spellings, dtypes, round trips, bad input, streaming memory.

Logits parity with transformers for every layout is in test_parity.py; here transformers is the oracle
only where a config spelling must be read the way it reads it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from lora.layers import Linear4bit
from model.config import LlamaConfig
from model.loading import (iter_checkpoint_tensors, load_pretrained, parameter_shapes, save_checkpoint,
                           save_pretrained)
from tests.tiny_checkpoints import (LAYOUTS, STORAGE_DTYPES, assert_close_on_real_tokens, batch, hf_logits,
                                    hf_state_dict, our_logits, tiny_hf_model, write_checkpoint)

REPO = Path(__file__).resolve().parents[1]
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def states_equal(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# --- config.json spellings ------------------------------------------------------------------------------

ROPE_SPELLINGS = {   # config.json edits (None deletes a key) → the theta both sides must use
    "rope_theta top-level (transformers 4.x)": ({"rope_parameters": None, "rope_theta": 500.0}, 500.0),
    "rope_parameters (transformers 5.x)": ({"rope_parameters": {"rope_theta": 500.0, "rope_type": "default"}}, 500.0),
    "absent (older files)": ({"rope_parameters": None, "rope_theta": None}, 10000.0),
}


@pytest.mark.parametrize("spelling", ROPE_SPELLINGS)
def test_every_rope_theta_spelling_is_read_as_transformers_reads_it(tmp_path, spelling):
    edits, theta = ROPE_SPELLINGS[spelling]
    folder = write_checkpoint(tiny_hf_model(), tmp_path, config_edits=edits)
    ours = load_pretrained(folder)
    theirs = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert ours.config.rope_theta == theta == theirs.config.rope_parameters["rope_theta"]
    ids, mask = batch()
    assert_close_on_real_tokens(our_logits(ours, ids, mask), hf_logits(theirs, ids, mask), mask)


def test_old_torch_dtype_spelling_and_dtype_none_give_the_storage_dtype(tmp_path):
    folder = write_checkpoint(tiny_hf_model(), tmp_path, dtype=torch.float16,
                              config_edits={"dtype": None, "torch_dtype": "float16"})
    model = load_pretrained(folder)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert model.config.torch_dtype == "float16"


def test_dtype_argument_sets_every_parameter_and_the_config(tmp_path):
    folder = write_checkpoint(tiny_hf_model(), tmp_path, dtype=torch.float16)
    model = load_pretrained(folder, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.torch_dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype is 'half'"):
        load_pretrained(folder, dtype="half")


def test_stray_inv_freq_buffers_are_ignored_in_safetensors_and_bin(tmp_path, capfd):
    hf_model = tiny_hf_model()
    inv_freq = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(8) for i in range(2)}
    clean = load_pretrained(write_checkpoint(hf_model, tmp_path / "clean")).state_dict()
    for layout in ("safetensors", "bin-sharded"):
        folder = write_checkpoint(hf_model, tmp_path / layout, layout, extra=inv_freq)
        assert states_equal(load_pretrained(folder).state_dict(), clean)
        assert "skipped 2 stored rotary_emb.inv_freq" in capfd.readouterr().err
        assert dict(iter_checkpoint_tensors(folder)).keys() == clean.keys()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_iter_checkpoint_tensors_yields_each_stored_tensor_exactly(tmp_path, layout):
    hf_model = tiny_hf_model()
    folder = write_checkpoint(hf_model, tmp_path, layout, torch.bfloat16)
    assert states_equal(dict(iter_checkpoint_tensors(folder)), hf_state_dict(hf_model, torch.bfloat16))


def test_quantize_accepts_only_none_and_nf4(tmp_path):
    folder = write_checkpoint(tiny_hf_model(), tmp_path)
    with pytest.raises(ValueError, match="quantize is 'int8'"):
        load_pretrained(folder, quantize="int8")


@pytest.mark.parametrize("layout", ["safetensors", "bin-sharded"])
def test_nf4_loading_quantizes_the_layer_projections_and_computes_like_their_dequantized_weights(tmp_path, layout):
    """Only q, k, v, o, gate, up, down become Linear4bit; a dense model holding each one's dequantized
    weight gives the same logits (fp32: the 4-bit error is in the weights, not in the loading)."""
    folder = write_checkpoint(tiny_hf_model(), tmp_path, layout, torch.float16)
    nf4 = load_pretrained(folder, dtype=torch.float32, quantize="nf4")
    dense = load_pretrained(folder, dtype=torch.float32)
    quantized = {name for name, m in nf4.named_modules() if isinstance(m, Linear4bit)}
    assert quantized == {f"model.layers.{i}.{p}" for i in range(2) for p in LINEARS}
    assert {p.dtype for p in nf4.parameters()} == {torch.float32}      # embeddings, norms, lm_head
    for name in sorted(set(dense.state_dict()) - set(nf4.state_dict())):
        assert name.removesuffix(".weight") in quantized
    for name in quantized:
        q = nf4.get_submodule(name)
        assert q.compute_dtype == torch.float32
        with torch.no_grad():
            dense.get_submodule(name).weight.copy_(q.dequantized_weight(torch.float32))
    ids, mask = batch()
    assert_close_on_real_tokens(our_logits(nf4, ids, mask), our_logits(dense, ids, mask), mask)


# --- saving ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", STORAGE_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_save_then_load_is_bit_identical(tmp_path, dtype):
    model = load_pretrained(write_checkpoint(tiny_hf_model(), tmp_path / "src"), dtype=dtype)
    save_pretrained(model, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    again = load_pretrained(tmp_path / "out")
    assert states_equal(again.state_dict(), model.state_dict())
    assert again.config == model.config


def test_saved_shards_respect_the_limit_carry_pt_metadata_and_a_complete_index(tmp_path):
    model = load_pretrained(write_checkpoint(tiny_hf_model(), tmp_path / "src"))
    limit = 70_000                              # bytes; the embeddings (96×64×4 = 24,576) fit, two MLPs don't
    save_pretrained(model, tmp_path / "out", max_shard_size=limit)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    total = 0
    for shard in shards:
        with safe_open(tmp_path / "out" / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
            assert sum(sizes) <= limit or len(sizes) == 1
            assert sorted(f.keys()) == sorted(k for k, v in index["weight_map"].items() if v == shard)
            total += sum(sizes)
    assert index["metadata"]["total_size"] == total == sum(p.nbytes for p in model.parameters())
    assert states_equal(load_pretrained(tmp_path / "out").state_dict(), model.state_dict())


def test_save_checkpoint_streams_tensors_in_any_order_from_a_generator(tmp_path):
    model = load_pretrained(write_checkpoint(tiny_hf_model(), tmp_path / "src"))
    state = model.state_dict()
    save_checkpoint(((k, state[k]) for k in reversed(list(state))), model.config, tmp_path / "out",
                    max_shard_size="100kB", dtype=torch.bfloat16)
    again = load_pretrained(tmp_path / "out")
    assert states_equal(again.state_dict(), {k: v.to(torch.bfloat16) for k, v in state.items()})


def test_saving_into_an_existing_folder_replaces_the_old_shards_and_keeps_other_files(tmp_path):
    model = load_pretrained(write_checkpoint(tiny_hf_model(), tmp_path / "src"))
    out = tmp_path / "out"
    save_pretrained(model, out, max_shard_size="50kB")
    (out / "tokenizer.model").write_bytes(b"kept")
    save_pretrained(model, out, dtype=torch.float16)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]     # no temporary folder left behind
    assert load_pretrained(out).model.embed_tokens.weight.dtype == torch.float16


def test_a_failed_save_leaves_nothing_behind(tmp_path):
    model = load_pretrained(write_checkpoint(tiny_hf_model(), tmp_path / "src"))
    state = model.state_dict()
    state.pop("model.norm.weight")
    with pytest.raises(ValueError, match="nothing given for model.norm.weight"):
        save_checkpoint(state, model.config, tmp_path / "out")
    state["model.layers.0.lora_A"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="cannot save model.layers.0.lora_A"):
        save_checkpoint(state, model.config, tmp_path / "out")
    state = model.state_dict()
    state["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \[3\], config implies \[64\]"):
        save_checkpoint(state, model.config, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["src"]


# --- bad input: a one-line ValueError naming the file and the problem ----------------------------------

def fails(fn, *words):
    with pytest.raises(ValueError) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message, message
    for w in words:
        assert str(w) in message, message


@pytest.fixture
def good(tmp_path):
    return Path(write_checkpoint(tiny_hf_model(), tmp_path / "good", "safetensors-sharded"))


def test_a_folder_without_config_json_is_named(good):
    (good / "config.json").unlink()
    fails(lambda: load_pretrained(good), good, "no config.json")


def test_a_config_missing_a_required_field_names_the_file_and_field(good):
    d = json.loads((good / "config.json").read_text())
    del d["hidden_size"]
    (good / "config.json").write_text(json.dumps(d))
    fails(lambda: load_pretrained(good), good / "config.json", "hidden_size")


def test_a_folder_without_weights_is_named(tmp_path):
    write_checkpoint(tiny_hf_model(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    fails(lambda: load_pretrained(tmp_path), tmp_path, "no weights")


def test_unexpected_and_missing_tensors_are_named_with_their_file(tmp_path):
    hf_model = tiny_hf_model()
    folder = write_checkpoint(hf_model, tmp_path / "extra", "bin", extra={"model.layers.0.bias": torch.zeros(3)})
    fails(lambda: load_pretrained(folder), Path(folder) / "pytorch_model.bin", "unexpected", "model.layers.0.bias")
    folder = write_checkpoint(hf_model, tmp_path / "untied", config_edits={"tie_word_embeddings": False})
    state = hf_state_dict(hf_model)
    del state["lm_head.weight"]
    save_file(state, Path(folder) / "model.safetensors", metadata={"format": "pt"})
    fails(lambda: load_pretrained(folder), folder, "lack lm_head.weight", "tie_word_embeddings false")


def test_a_shape_that_disagrees_with_config_names_key_file_and_both_shapes(tmp_path):
    folder = write_checkpoint(tiny_hf_model(), tmp_path, "bin-sharded", config_edits={"intermediate_size": 128})
    fails(lambda: load_pretrained(folder), Path(folder) / "pytorch_model-00001-of-00003.bin",
          "model.layers.0.mlp.gate_proj.weight has shape [160, 64], config.json implies [128, 64]")


def test_a_tensor_of_integer_dtype_is_named(tmp_path):
    hf_model = tiny_hf_model()
    folder = write_checkpoint(hf_model, tmp_path, "bin")
    state = hf_state_dict(hf_model)
    state["model.norm.weight"] = torch.ones(64, dtype=torch.int64)
    torch.save(state, Path(folder) / "pytorch_model.bin")
    fails(lambda: load_pretrained(folder), "pytorch_model.bin", "model.norm.weight is stored as torch.int64")


def test_truncated_or_corrupt_weight_files_are_named(tmp_path):
    hf_model = tiny_hf_model()
    for layout, file in (("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")):
        path = Path(write_checkpoint(hf_model, tmp_path / layout, layout)) / file
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        fails(lambda: load_pretrained(path.parent), path, "unreadable or corrupt")
    path = tmp_path / "safetensors" / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
    fails(lambda: load_pretrained(path.parent), path, "invalid JSON")
    path = tmp_path / "bin" / "pytorch_model.bin"
    path.write_bytes(b"<html>404</html>")
    fails(lambda: load_pretrained(path.parent), path, "not a torch.save file")


class NotATensor:
    pass


def test_a_bin_pickling_anything_but_tensors_is_refused_by_weights_only(tmp_path):
    folder = Path(write_checkpoint(tiny_hf_model(), tmp_path, "bin"))
    torch.save({"model.norm.weight": NotATensor()}, folder / "pytorch_model.bin")
    fails(lambda: load_pretrained(folder), folder / "pytorch_model.bin", "holds more than tensors", "NotATensor",
          "convert it to safetensors")
    with pytest.raises(ValueError) as e:                  # not torch's hint to load it with weights_only=False
        load_pretrained(folder)
    assert "weights_only" not in str(e.value) and "can still be loaded" not in str(e.value)
    torch.save({"model.norm.weight": 1.0}, folder / "pytorch_model.bin")
    fails(lambda: load_pretrained(folder), folder / "pytorch_model.bin", "expected a dict {tensor name: tensor}")


def test_index_problems_name_the_index_and_the_shard(good):
    index_path = good / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    (good / "model-00002-of-00003.safetensors").rename(good / "elsewhere.safetensors")
    fails(lambda: load_pretrained(good), index_path, "shard model-00002-of-00003.safetensors is missing")
    (good / "elsewhere.safetensors").rename(good / "model-00002-of-00003.safetensors")
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    fails(lambda: load_pretrained(good), index_path, "lists model.norm.weight in model-00001-of-00003.safetensors")
    index_path.write_text("{\"weight_map\": ")
    fails(lambda: load_pretrained(good), index_path, "not valid JSON")
    index_path.write_text("{\"metadata\": {}}")
    fails(lambda: load_pretrained(good), index_path, "weight_map")


# --- streaming: peak memory is one model, not two ---------------------------------------------------------

MEASURE = """
import json, sys, torch
from bench.machine import peak_rss_bytes, rss_bytes
from model.config import PRESETS
from model.llama import Llama
from model.loading import load_pretrained
with torch.device("meta"):    # first use of the meta device imports ~70 MB of torch, once: not the loader's
    Llama(PRESETS["tiny"])
before = rss_bytes()
model = load_pretrained(sys.argv[1], dtype=None if sys.argv[2] == "None" else sys.argv[2])
print(json.dumps({"growth": peak_rss_bytes() - before,
                  "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


@pytest.fixture(scope="module")
def mid_size_checkpoints(tmp_path_factory):
    """A ~270 MB fp32 model (4 layers, D 1024, F 2752, V 8000) as fp32 and fp16 safetensors and fp32 .bin,
    written by the streaming writer from random tensors made one at a time."""
    root = tmp_path_factory.mktemp("mid")
    config = LlamaConfig(vocab_size=8000, hidden_size=1024, intermediate_size=2752, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, torch_dtype="float32")
    g = torch.Generator().manual_seed(0)

    def tensors():
        for name, shape in parameter_shapes(config).items():
            yield name, torch.randn(shape, generator=g) * 0.02
    save_checkpoint(tensors(), config, root / "st32", max_shard_size="100MB")
    save_checkpoint(iter_checkpoint_tensors(root / "st32"), config, root / "st16", dtype=torch.float16)
    (root / "bin32").mkdir()
    (root / "bin32" / "config.json").write_bytes((root / "st32" / "config.json").read_bytes())
    torch.save(dict(iter_checkpoint_tensors(root / "st32")), root / "bin32" / "pytorch_model.bin")
    return root


@pytest.mark.parametrize("folder, dtype", [("st32", "None"), ("st16", "float32"), ("bin32", "None")])
def test_loading_peak_memory_grows_by_one_model_not_two(mid_size_checkpoints, folder, dtype):
    out = subprocess.run([sys.executable, "-c", MEASURE, str(mid_size_checkpoints / folder), dtype],
                         cwd=REPO, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    assert r["model_bytes"] > 250e6
    ratio = r["growth"] / r["model_bytes"]
    print(f"{folder} → {dtype}: peak RSS grew {ratio:.3f}× the model's {r['model_bytes'] / 1e6:.0f} MB")
    assert ratio <= 1.3, f"peak RSS grew {ratio:.2f}× the model"
