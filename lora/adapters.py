"""Adapters on a whole model: apply_lora, disable_adapters, merge, and PEFT-format files.

apply_lora wraps the model's linear layers named in `targets` (OpenBezoar: q_proj, k_proj, v_proj) in
LoRALinear and freezes everything else. The model's module names are Hugging Face's, so PEFT's adapter
files map onto ours by a prefix:
    our parameter   model.layers.0.self_attn.q_proj.lora_A.weight
    PEFT's file     base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
A PEFT adapter folder is adapter_config.json (peft_type LORA, r, lora_alpha, lora_dropout, target_modules,
...) and adapter_model.safetensors (A [r, in] and B [out, r] per module, nothing else).

Merging folds ΔW = B A · alpha / r into W. Between SFT stages the recipe merges into the 16/32-bit weights
of the checkpoint the stage started from (merge_into_checkpoint, one tensor at a time) and the next stage
quantises the merged checkpoint afresh. Merging in memory into an NF4 base can dequantise (exact, the
layer becomes dense) or requantise (back to 4-bit, which moves the weights: the drift is measured on
held-out tokens and returned, never silent).
"""
import json
import os
import re
from contextlib import contextmanager

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from files import atomic_write, write_text_atomic
from lora.layers import Linear4bit, LoRALinear, check_lora_settings

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"     # PEFT's spelling: every linear layer but the output head
OPENBEZOAR_TARGETS = ("q_proj", "k_proj", "v_proj")


def lora_modules(model: nn.Module):
    """[(name, LoRALinear)] of the model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def _linear_names(model):
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Linear4bit))]


def _matches(name: str, targets) -> bool:
    """PEFT's rule: a list matches a module whose name is, or ends in ".", a listed key; a string is a
    regular expression the whole name must match; "all-linear" matches all but lm_head."""
    if targets == ALL_LINEAR:
        return name.rpartition(".")[2] != "lm_head"
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _as_targets(targets):
    """A string of plain names ("q_proj,k_proj,v_proj", "q_proj") is a list of names; any other string
    is "all-linear" or a regular expression, as in PEFT's target_modules."""
    if isinstance(targets, str):
        if targets != ALL_LINEAR and re.fullmatch(r"[\w.\s]+(,[\w.\s]+)*", targets):
            return [t.strip() for t in targets.split(",") if t.strip()]
        return targets
    return list(targets)


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float = 0.0, targets=OPENBEZOAR_TARGETS,
               lora_dtype=torch.float32) -> nn.Module:
    """Freeze every parameter and wrap each linear layer matched by `targets` in a LoRALinear, in place.

    targets: module names or name endings (["q_proj", "k_proj", "v_proj"], or "q_proj,k_proj,v_proj"),
    a regular expression over full names, or "all-linear". Returns the model."""
    targets = _as_targets(targets)
    if lora_modules(model):
        raise ValueError("apply_lora: the model already has LoRA adapters (merge them first)")
    names = [n for n in _linear_names(model) if _matches(n, targets)]
    if not names:
        existing = sorted({n.rpartition(".")[2] for n in _linear_names(model)})
        raise ValueError(f"apply_lora: targets {targets!r} match no linear layer; the model's linear "
                         f"layers are named {', '.join(existing) or '(none)'}")
    check_lora_settings(r, alpha, dropout)                # fail before changing anything
    model.requires_grad_(False)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), r, alpha, dropout, lora_dtype))
    return model


@contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes with its base weights only (the DPO reference model)."""
    modules = [m for _, m in lora_modules(model)]
    before = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, state in zip(modules, before):
            m.disabled = state


# --- merging ---------------------------------------------------------------------------------------------

def merge_drift(logits_before: torch.Tensor, logits_after: torch.Tensor) -> dict:
    """How far merging moved the model, on the same tokens; logits [..., V].
        max_abs_dlogit = max |z_after - z_before|
        kl = mean over tokens of KL(p_before ‖ p_after) = Σ_v p_before (log p_before - log p_after)"""
    before, after = logits_before.float(), logits_after.float()
    logp, logq = before.log_softmax(-1), after.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    return {"max_abs_dlogit": (after - before).abs().max().item(), "kl": kl.item()}


@torch.no_grad()
def merge(model: nn.Module, requantize: bool = False, drift_tokens=None):
    """Fold every adapter into its base layer, in place: W ← W + B A · alpha / r, and the LoRALinear is
    replaced by the merged layer (state-dict keys are the checkpoint's again).

    Dense base: a dense layer of the base's dtype; with fp32 weights logits move by float rounding only.
    NF4 base, requantize=False: W is dequantised (exactly) to the compute dtype and the layer stays dense.
    NF4 base, requantize=True: the merged W is quantised to NF4 again. That moves the weights, so
    drift_tokens (input ids [B, T], held out from training) are required: the logits on them before and
    after are compared and {"max_abs_dlogit", "kl"} returned (see merge_drift). Otherwise returns None."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("merge: the model has no LoRA adapters")
    nf4 = any(isinstance(m.base_layer, Linear4bit) for _, m in modules)
    if requantize and nf4 and drift_tokens is None:
        raise ValueError("merge: requantize=True moves the NF4 weights; pass drift_tokens (held-out input "
                         "ids) so that the drift is measured")
    measure = requantize and nf4
    if measure:
        was_training = model.training
        model.eval()
        before = model(drift_tokens)
    for name, m in modules:
        base = m.base_layer
        if requantize and isinstance(base, Linear4bit):            # quantise the fp32 sum, rounded once
            merged = Linear4bit(m.merged_linear(torch.float32).weight, compute_dtype=base.compute_dtype,
                                block_size=base.weight.block_size, double_quant=base.weight.double_quant)
        else:
            merged = m.merged_linear()
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, merged)
    if not measure:
        return None
    drift = merge_drift(before, model(drift_tokens))
    model.train(was_training)
    return drift


def _adapter_deltas(adapter):
    """{module name: (A [r, K], B [N, r], scaling)} from a model with adapters or a PEFT adapter folder."""
    if isinstance(adapter, nn.Module):
        return {name: (m.lora_A.weight.detach().cpu(), m.lora_B.weight.detach().cpu(), m.scaling)
                for name, m in lora_modules(adapter)}
    config, tensors = read_adapter(adapter)
    scaling = config["lora_alpha"] / config["r"]
    return {name: (tensors[name + ".lora_A.weight"], tensors[name + ".lora_B.weight"], scaling)
            for name in _adapter_module_names(tensors)}


def merge_into_checkpoint(adapter, base_checkpoint: str, out_dir: str, dtype=None, max_shard_size="5GB",
                          tokenizer=None):
    """Write base_checkpoint with every adapted weight replaced by W + B A · alpha / r, one tensor at a
    time: each W is read in its stored 16/32-bit dtype, the sum is taken in fp32 and rounded once to
    `dtype` (default: the base checkpoint's config.json dtype) by model/loading.py's save_checkpoint,
    which writes the folder atomically. adapter: a model with adapters, or a PEFT adapter folder.
    tokenizer: the model.Tokenizer whose files the folder gets (tokenizer.model, tokenizer_config.json,
    special_tokens_map.json, generation_config.json); default: base_checkpoint's tokenizer.model, if any.
    Returns the number of merged tensors."""
    from model.config import load_config
    from model.loading import iter_checkpoint_tensors, parameter_shapes, save_checkpoint
    from model.tokenizer import Tokenizer

    if tokenizer is None and os.path.isfile(os.path.join(base_checkpoint, "tokenizer.model")):
        tokenizer = Tokenizer(os.path.join(base_checkpoint, "tokenizer.model"))

    config = load_config(base_checkpoint)
    shapes = parameter_shapes(config)
    deltas = _adapter_deltas(adapter)
    if not deltas:
        raise ValueError("merge_into_checkpoint: the adapter has no LoRA modules")
    for name, (A, B, _) in deltas.items():
        key = name + ".weight"
        if key not in shapes:
            raise ValueError(f"merge_into_checkpoint: {base_checkpoint} has no {key} for the adapter's {name}")
        if shapes[key] != (B.shape[0], A.shape[1]):
            raise ValueError(f"merge_into_checkpoint: {key} is {list(shapes[key])} in {base_checkpoint}, the "
                             f"adapter's B A is {[B.shape[0], A.shape[1]]}")
    merged = []

    def tensors():
        for key, W in iter_checkpoint_tensors(base_checkpoint):                  # stored dtype, CPU
            name = key.removesuffix(".weight")
            if name in deltas:
                A, B, scaling = deltas[name]
                W = W.float() + (B.float() @ A.float()) * scaling                # [N, K] fp32
                merged.append(key)
            yield key, W

    save_checkpoint(tensors(), config, out_dir, max_shard_size=max_shard_size, dtype=dtype, tokenizer=tokenizer)
    return len(merged)


# --- PEFT files ---------------------------------------------------------------------------------------

def save_adapter(model: nn.Module, path: str, base_model_name_or_path=None):
    """Write the model's adapters as a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("save_adapter: the model has no LoRA adapters")
    settings = {(m.r, m.alpha, getattr(m.lora_dropout, "p", 0.0)) for _, m in modules}
    if len(settings) > 1:
        raise ValueError(f"save_adapter: adapters differ in (r, alpha, dropout): {sorted(settings)}; PEFT's "
                         f"format as written here holds one setting")
    r, alpha, dropout = settings.pop()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
              "lora_dropout": dropout, "target_modules": sorted({n.rpartition(".")[2] for n, _ in modules}),
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
              "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
              "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
              "base_model_name_or_path": base_model_name_or_path, "revision": None}
    tensors = {}
    for name, m in modules:
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, ADAPTER_WEIGHTS), lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    write_text_atomic(os.path.join(path, ADAPTER_CONFIG), text)


# Settings that change the computation and are not implemented: refused rather than ignored.
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "rank_pattern": {},
                "alpha_pattern": {}, "layers_to_transform": None, "modules_to_save": None, "lora_bias": False,
                "target_parameters": None, "layer_replication": None}


def _adapter_module_names(tensors):
    return sorted({k.rsplit(".lora_", 1)[0] for k in tensors})


def read_adapter(path: str):
    """(config dict, {module name + ".lora_A.weight" / ".lora_B.weight": tensor}) of a PEFT LoRA folder,
    with the config checked against the tensors."""
    cfg_path, weights_path = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)
    for p in (cfg_path, weights_path):
        if not os.path.isfile(p):
            raise ValueError(f"{p}: missing (a PEFT adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type is {config.get('peft_type') if isinstance(config, dict) else config!r}, expected \"LORA\"")
    for key in ("r", "lora_alpha"):
        v = config.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or (key == "r" and v != int(v)):
            raise ValueError(f"{cfg_path}: {key} is {v!r}, expected a positive {'integer' if key == 'r' else 'number'}")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{cfg_path}: bias is {config['bias']!r}; only \"none\" is supported")
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, {}, [], False):
            raise ValueError(f"{cfg_path}: {key} is {config[key]!r}; not supported (expected {default!r})")
    tensors = {}
    try:
        with safe_open(weights_path, framework="pt") as f:
            for key in f.keys():
                if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
                    raise ValueError(f"{weights_path}: unexpected tensor {key} (expected {PEFT_PREFIX}<module>."
                                     f"lora_A.weight / lora_B.weight)")
                tensors[key.removeprefix(PEFT_PREFIX)] = f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_path}: unreadable safetensors file ({str(e).splitlines()[0][:200]})") from None
    r = int(config["r"])
    targets = _as_targets(config.get("target_modules") or [])
    for name in _adapter_module_names(tensors):
        A, B = tensors.get(name + ".lora_A.weight"), tensors.get(name + ".lora_B.weight")
        if A is None or B is None:
            raise ValueError(f"{weights_path}: {name} has lora_{'A' if A is None else 'B'}.weight missing")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
            raise ValueError(f"{weights_path}: {name} has lora_A {list(A.shape)} and lora_B {list(B.shape)}, "
                             f"but {ADAPTER_CONFIG} says r = {r} (expected [{r}, in] and [out, {r}])")
        if not _matches(name, targets):
            raise ValueError(f"{weights_path}: {name} is not among {ADAPTER_CONFIG}'s target_modules {targets!r}")
    if not tensors:
        raise ValueError(f"{weights_path}: no LoRA tensors")
    return config, tensors


def load_adapter(model: nn.Module, path: str) -> nn.Module:
    """Load a PEFT LoRA folder into the model: apply_lora with its settings if the model has no adapters,
    then copy A and B into place. Every adapted module must exist with the adapter's shapes, and every
    module the config targets must have tensors. Returns the model."""
    config, tensors = read_adapter(path)
    weights_path = os.path.join(path, ADAPTER_WEIGHTS)
    r, alpha = int(config["r"]), config["lora_alpha"]
    names = _adapter_module_names(tensors)
    if not lora_modules(model):
        linear = set(_linear_names(model))
        absent = [n for n in names if n not in linear]
        if absent:
            raise ValueError(f"{weights_path}: the model has no linear layer {absent[0]}"
                             f"{f' (and {len(absent) - 1} more)' if len(absent) > 1 else ''}")
        apply_lora(model, r, alpha, config.get("lora_dropout") or 0.0, targets=names)
    ours = dict(lora_modules(model))
    if set(ours) != set(names):
        extra = sorted(set(ours) ^ set(names))[0]
        where = "the model" if extra in ours else "the adapter"
        raise ValueError(f"{weights_path}: {extra} is adapted only in {where}")
    with torch.no_grad():
        for name in names:
            m = ours[name]
            if (m.r, m.alpha) != (r, alpha):
                raise ValueError(f"{weights_path}: {name} has r={m.r}, alpha={m.alpha} in the model, "
                                 f"r={r}, lora_alpha={alpha} in {ADAPTER_CONFIG}")
            for part, param in (("lora_A", m.lora_A.weight), ("lora_B", m.lora_B.weight)):
                t = tensors[f"{name}.{part}.weight"]
                if t.shape != param.shape:
                    raise ValueError(f"{weights_path}: {name}.{part}.weight is {list(t.shape)}, the model's "
                                     f"{name} (in {m.in_features}, out {m.out_features}) needs {list(param.shape)}")
                param.copy_(t)
    return model
