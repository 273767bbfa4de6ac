"""LlamaConfig: the model's shape, named as in Hugging Face's config.json.

The shape of a model always comes from its config.json (never from a folder or file name). Two presets:
  openllama-3b-v2  the base model of OpenBezoar (openlm-research/open_llama_3b_v2)
  tiny             a few-MB model for tests and the CPU demo
"""
import json
import os
from dataclasses import asdict, dataclass, fields


@dataclass
class LlamaConfig:
    vocab_size: int = 32000               # V
    hidden_size: int = 3200               # D
    intermediate_size: int = 8640         # F, the SwiGLU MLP width
    num_hidden_layers: int = 26           # L
    num_attention_heads: int = 32         # H; head dim Dh = D / H = 100
    num_key_value_heads: int = 32         # = H for OpenLLaMA (multi-head, no grouped-query attention)
    max_position_embeddings: int = 2048   # context length
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False     # OpenLLaMA's lm_head is its own matrix
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    torch_dtype: str = "float16"          # storage dtype of the checkpoint's weights

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for rotary embeddings")


PRESETS = {
    "openllama-3b-v2": LlamaConfig(),
    "tiny": LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                        torch_dtype="float32"),
}

# Fields a config.json must have: the shape. The rest has OpenLLaMA's values as defaults.
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def config_from_dict(d: dict, source: str = "config.json") -> LlamaConfig:
    """Read a Hugging Face LLaMA config.json (any transformers version's spelling) into a LlamaConfig.

    Spellings handled: `rope_theta` top-level (transformers 4.x), under `rope_parameters` (5.x), or
    absent (older files: 10000); `torch_dtype` (4.x) or `dtype` (5.x); `num_key_value_heads` absent
    (files older than grouped-query attention: equal to the number of heads). Anything that would
    change the computation and that this model does not implement is an error, never ignored."""
    def bad(msg):
        return ValueError(f"{source}: {msg}")

    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise bad(f"missing required field(s) {', '.join(missing)}")
    if d.get("model_type", "llama") != "llama":
        raise bad(f"model_type is {d['model_type']!r}, expected 'llama'")
    if d.get("hidden_act", "silu") != "silu":
        raise bad(f"hidden_act is {d['hidden_act']!r}, expected 'silu' (SwiGLU)")
    for k in ("attention_bias", "mlp_bias"):
        if d.get(k):
            raise bad(f"{k} is true; LLaMA layers here have no biases")
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling")
    rope_type = rope.get("rope_type", (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")))
    if rope_type != "default":
        raise bad(f"rope scaling {rope_type!r} is not supported (only plain rotary embeddings)")
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))

    kw = {}
    for f in fields(LlamaConfig):
        if f.name in d and d[f.name] is not None:
            kw[f.name] = d[f.name]
    kw["rope_theta"] = float(theta)
    if "num_key_value_heads" not in kw:
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    kw["torch_dtype"] = str(d.get("torch_dtype") or d.get("dtype") or "float32")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # some files give lists or null
        if isinstance(kw.get(name), list):
            kw[name] = kw[name][0]
    for f in fields(LlamaConfig):
        v = kw.get(f.name)
        if v is None:
            continue
        want = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}[f.type]
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            kw[f.name] = v = float(v)
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise bad(f"field {f.name} is {v!r}, expected {want.__name__}")
        if want is int and f.name.endswith(("_size", "_layers", "_heads", "_embeddings")) and v <= 0:
            raise bad(f"field {f.name} is {v}, expected a positive integer")
    try:
        return LlamaConfig(**kw)
    except ValueError as e:
        raise bad(str(e)) from None


def load_config(folder: str) -> LlamaConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config_from_dict(d, path)


def config_to_dict(config: LlamaConfig) -> dict:
    """config.json as transformers (4.33 onwards, 5.x) and vLLM read it."""
    d = asdict(config)
    d.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
             rope_scaling=None, attention_bias=False, mlp_bias=False, use_cache=True,
             head_dim=config.head_dim)
    return d
