"""QLoRA: NF4 storage (nf4.py), LoRA layers on a dense or 4-bit base (layers.py), adapters on a model (adapters.py)."""
from lora.adapters import (apply_lora, disable_adapters, load_adapter, lora_modules, merge, merge_drift,
                           merge_into_checkpoint, read_adapter, save_adapter)
from lora.layers import Linear4bit, LoRALinear
from lora.nf4 import NF4Tensor, quantize_nf4
