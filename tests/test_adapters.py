"""Adapters on the whole model: PEFT's files both ways, disabling, merging (dense, NF4, into a checkpoint)."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lora import (Linear4bit, LoRALinear, apply_lora, disable_adapters, load_adapter, lora_modules, merge,
                  merge_drift, merge_into_checkpoint, save_adapter)
from model.config import config_from_dict
from model.llama import Llama
from model.loading import iter_checkpoint_tensors, load_pretrained
from tests.tiny_checkpoints import tiny_hf_model, write_checkpoint

TOL = 1e-4
QKV = ["q_proj", "k_proj", "v_proj"]


def ids(seed=1, vocab_size=96):
    return torch.randint(3, vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))   # [B, T]


def ours_from(hf):
    """Our Llama with the transformers model's weights: the state-dict keys are the same."""
    model = Llama(config_from_dict(hf.config.to_dict()))
    model.load_state_dict(hf.state_dict())
    return model.eval()


def randomize_lora(named_params, seed=2):
    """Nonzero A and B (a fresh adapter has B = 0 and would hide a misplaced tensor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def assert_close(a, b, tol=TOL):
    diff = (a - b).abs().max().item()
    assert diff <= tol, f"max |Δlogit| {diff:.2e} > {tol}"


def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    hf = tiny_hf_model()
    base = logits(hf, ids())
    ours = apply_lora(ours_from(hf), r=4, alpha=8, dropout=0.05, targets="q_proj,k_proj,v_proj").eval()
    randomize_lora(ours.named_parameters())
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert_close(logits(ours, ids()), logits(theirs, ids()))
    assert (logits(theirs, ids()) - base).abs().max() > 1e-2         # the adapter does change the logits
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["target_modules"]) == (4, 8, 0.05, sorted(QKV))


def test_a_peft_adapter_loads_here_with_the_same_logits(tmp_path):
    hf = tiny_hf_model()
    ours = ours_from(hf)                                   # before PEFT wraps hf's modules
    base = logits(ours, ids())
    theirs = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=QKV)).eval()
    randomize_lora(theirs.named_parameters())
    theirs.save_pretrained(tmp_path / "peft")
    load_adapter(ours, tmp_path / "peft")
    assert sorted({n.rpartition(".")[2] for n, _ in lora_modules(ours)}) == sorted(QKV)
    assert_close(logits(ours, ids()), logits(theirs, ids()))
    assert (logits(ours, ids()) - base).abs().max() > 1e-2           # the adapter does change the logits


def test_all_linear_adapters_round_trip_through_peft(tmp_path):
    hf = tiny_hf_model()
    ours = ours_from(hf)
    theirs = get_peft_model(hf, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")).eval()
    randomize_lora(theirs.named_parameters(), seed=3)
    theirs.save_pretrained(tmp_path / "peft")
    load_adapter(ours, tmp_path / "peft")
    assert len(lora_modules(ours)) == 2 * 7                          # 7 projections a layer, lm_head left out
    assert_close(logits(ours, ids()), logits(theirs, ids()))


def test_disable_adapters_gives_the_base_logits_and_then_restores_them():
    ours = ours_from(tiny_hf_model())
    base = logits(ours, ids())
    apply_lora(ours, r=4, alpha=4, targets=QKV)
    randomize_lora(ours.named_parameters())
    adapted = logits(ours, ids())
    with disable_adapters(ours):
        assert torch.equal(logits(ours, ids()), base)
    assert torch.equal(logits(ours, ids()), adapted)


def test_apply_lora_freezes_the_base_and_trains_only_A_and_B():
    ours = apply_lora(ours_from(tiny_hf_model()), r=4, alpha=8, targets=QKV)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 3 * 2 and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in trainable)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in trainable


def test_merge_with_a_dense_base_equals_the_unmerged_logits_and_restores_checkpoint_keys():
    hf = tiny_hf_model()
    ours = apply_lora(ours_from(hf), r=4, alpha=8, targets="all-linear")
    randomize_lora(ours.named_parameters())
    unmerged = logits(ours, ids())
    assert merge(ours) is None
    assert_close(logits(ours, ids()), unmerged)
    assert set(ours.state_dict()) == set(hf.state_dict()) and not lora_modules(ours)


def test_merge_into_checkpoint_streams_the_stage_weights_and_equals_the_adapter(tmp_path):
    """The recipe's merge between SFT stages: 16/32-bit weights from disk, a merged HF folder out."""
    hf = tiny_hf_model()
    for dtype in (torch.float32, torch.float16):
        base_dir = write_checkpoint(hf, tmp_path / f"base-{dtype}", "safetensors-sharded", dtype)
        adapted = apply_lora(load_pretrained(base_dir, dtype=torch.float32), r=4, alpha=8, targets=QKV)
        randomize_lora(adapted.named_parameters())
        save_adapter(adapted, tmp_path / "adapter")
        for source in (adapted, tmp_path / "adapter"):
            out = tmp_path / f"merged-{dtype}"
            assert merge_into_checkpoint(source, base_dir, out) == 2 * 3
            stored = dict(iter_checkpoint_tensors(base_dir))
            for name, t in iter_checkpoint_tensors(out):
                assert t.dtype == dtype
                m = dict(lora_modules(adapted)).get(name.removesuffix(".weight"))
                expected = stored[name] if m is None else (stored[name].float() + m.delta_weight()).to(dtype)
                assert torch.equal(t, expected), name                 # one rounding of the fp32 sum
            if dtype == torch.float32:
                assert_close(logits(load_pretrained(out), ids()), logits(adapted.eval(), ids()))


def test_merging_into_nf4_requantizes_only_with_its_drift_measured(tmp_path):
    hf = tiny_hf_model()
    folder = write_checkpoint(hf, tmp_path / "base", "safetensors")
    model = load_pretrained(folder, dtype=torch.float32, quantize="nf4")
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    apply_lora(model, r=4, alpha=8, targets=QKV)
    randomize_lora(model.named_parameters())
    held_out = ids(seed=9)
    with pytest.raises(ValueError, match="pass drift_tokens"):
        merge(model, requantize=True)
    adapter_logits = logits(model, held_out)

    dense_copy = load_pretrained(folder, dtype=torch.float32, quantize="nf4")
    apply_lora(dense_copy, r=4, alpha=8, targets=QKV)
    dense_copy.load_state_dict(model.state_dict())
    merge(dense_copy)                                    # dequantise + add: exact, layers become dense
    assert_close(logits(dense_copy, held_out), adapter_logits)

    drift = merge(model, requantize=True, drift_tokens=held_out)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    again = merge_drift(adapter_logits, logits(model, held_out))
    assert drift == pytest.approx(again) and drift["max_abs_dlogit"] > TOL and drift["kl"] > 0
    print(f"\nNF4 in-memory merge drift (tiny model, r=4, alpha=8, q/k/v): {drift}")


def test_targets_that_match_nothing_list_the_names_that_exist():
    ours = ours_from(tiny_hf_model())
    with pytest.raises(ValueError, match=r"match no linear layer; the model's linear layers are named "
                                         r"down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        apply_lora(ours, r=4, alpha=8, targets=["query", "value"])
    assert not lora_modules(ours)


@pytest.mark.parametrize("r, alpha, message", [(0, 8, "rank r is 0"), (-1, 8, "rank r is -1"),
                                                (4, 0, "alpha is 0"), (4, -2.0, "alpha is -2.0")])
def test_bad_rank_or_alpha_fails_before_touching_the_model(r, alpha, message):
    ours = ours_from(tiny_hf_model())
    with pytest.raises(ValueError, match=message):
        apply_lora(ours, r=r, alpha=alpha)
    assert not lora_modules(ours) and all(p.requires_grad for p in ours.parameters())


def test_an_adapter_whose_config_disagrees_with_its_tensors_is_refused(tmp_path):
    ours = apply_lora(ours_from(tiny_hf_model()), r=4, alpha=8, targets=QKV)
    save_adapter(ours, tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    for edit, message in [({"r": 8}, r"k_proj has lora_A \[4, 64\] and lora_B \[64, 4\], but adapter_config.json says r = 8"),
                          ({"target_modules": ["q_proj", "k_proj"]}, "v_proj is not among adapter_config.json's target_modules"),
                          ({"lora_alpha": 0}, "lora_alpha is 0, expected a positive number"),
                          ({"use_dora": True}, "use_dora is True; not supported")]:
        path.write_text(json.dumps({**config, **edit}))
        with pytest.raises(ValueError, match=message):
            load_adapter(ours_from(tiny_hf_model()), tmp_path / "a")
    path.write_text(json.dumps(config))
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="adapter_model.safetensors: unreadable safetensors file"):
        load_adapter(ours_from(tiny_hf_model()), tmp_path / "a")


def test_an_adapter_for_another_base_shape_is_refused(tmp_path):
    small = apply_lora(ours_from(tiny_hf_model(hidden_size=32, num_attention_heads=2, num_key_value_heads=2)),
                       r=4, alpha=8, targets=QKV)
    save_adapter(small, tmp_path / "small")
    with pytest.raises(ValueError, match=r"self_attn.k_proj.lora_A.weight is \[4, 32\], the model.s .*k_proj "
                                         r"\(in 64, out 64\) needs \[4, 64\]"):
        load_adapter(ours_from(tiny_hf_model()), tmp_path / "small")
    deeper = apply_lora(ours_from(tiny_hf_model(num_hidden_layers=3)), r=4, alpha=8, targets=QKV)
    save_adapter(deeper, tmp_path / "deeper")
    with pytest.raises(ValueError, match="the model has no linear layer model.layers.2.self_attn.k_proj"):
        load_adapter(ours_from(tiny_hf_model()), tmp_path / "deeper")
