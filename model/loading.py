"""Checkpoints: load and save Hugging Face LLaMA folders one tensor at a time.

A model folder holds config.json and the weights in one of four layouts, looked for in this order (the
order transformers uses):
  model.safetensors               one safetensors file
  model.safetensors.index.json    shards model-00001-of-0000N.safetensors; the index's "weight_map" gives
                                  each tensor's shard
  pytorch_model.bin               one torch.save'd dict {name: tensor}
  pytorch_model.bin.index.json    shards pytorch_model-00001-of-0000N.bin, same index
Tensor names are state-dict keys of model/llama.py's Llama (it uses Hugging Face's module names). Files
from older transformers also hold `model.layers.{i}.self_attn.rotary_emb.inv_freq`: llama.py recomputes
those angles, so they are skipped (and counted on stderr).

Memory. The model is built on the meta device (shapes, no storage); each tensor is read, converted to the
target dtype and device and put in place of its meta parameter. Peak memory is the loaded model plus about
one tensor, never two copies. Two details make that true of resident memory (RSS), not only of allocations:
  - safetensors is read with pread(2) (safe_open backend="pread"), not mmap: the pages of a mapping stay
    resident while the mapping lives, so copying out of a whole-file mmap shows model + file.
  - a .bin (zip format) is memory-mapped with torch.load(mmap=True, weights_only=True) and opened again
    for each tensor, so only one tensor's pages are mapped at a time. The legacy format (torch < 1.6)
    cannot be mapped: it is read whole, with a warning.
`.bin` files are only ever read with weights_only=True: a pickle holding anything but tensors is refused.
With quantize="nf4" each layer projection is quantised as it arrives (QLoRA's 4-bit base): OpenLLaMA 3B
loads into 2.07 GB (NF4 layers + bf16 embeddings and lm_head) without ever being whole in 16 bits.

Saving writes safetensors with metadata {"format": "pt"} (transformers requires it), sharded above
max_shard_size with model.safetensors.index.json ({"metadata": {"total_size": bytes}, "weight_map":
{name: shard}}), the tokenizer's files when given one (model/tokenizer.py), and config.json last, so
transformers and vLLM load the folder unchanged. A safetensors
file is
    [8 bytes: header length n, little-endian u64][n bytes: JSON header][tensor bytes, back to back]
and the header lists each tensor's dtype, shape and data_offsets. config.json fixes all of those before
any tensor exists, so the header is written first and each tensor's bytes go to their offset as the
tensor arrives: a merge can save a model while holding one tensor at a time (safetensors' own writer
needs every tensor at once).
"""
import json
import os
import re
import shutil
import struct
import sys
import warnings
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from files import fsync_dir, write_text_atomic
from model.config import LlamaConfig, config_to_dict, load_config
from model.llama import Llama
from model.tokenizer import write_tokenizer_files

SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_WEIGHTS, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
LAYOUTS = (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX)
STRAY_SUFFIXES = ("rotary_emb.inv_freq",)      # buffers older transformers saved; recomputed by llama.py
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --- reading -------------------------------------------------------------------------------------------

def _unreadable(path, e) -> ValueError:
    lines = str(e).strip().splitlines() or [""]
    return ValueError(f"{path}: unreadable or corrupt weight file ({type(e).__name__}: {lines[0][:200]})")


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def checkpoint_files(folder: str):
    """The folder's weight files in read order, as [(path, names the index puts there, or None)]."""
    for layout in LAYOUTS:
        path = os.path.join(folder, layout)
        if not os.path.isfile(path):
            continue
        if not layout.endswith(".json"):
            return [(path, None)]
        index = _read_json(path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f'{path}: expected a non-empty "weight_map" object {{tensor name: shard file}}')
        shards = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or os.path.basename(shard) != shard:
                raise ValueError(f"{path}: weight_map[{name!r}] is {shard!r}, expected a file name in {folder}")
            shards.setdefault(shard, set()).add(name)
        for shard in sorted(shards):
            if not os.path.isfile(os.path.join(folder, shard)):
                raise ValueError(f"{path}: shard {shard} is missing from {folder}")
        return [(os.path.join(folder, shard), shards[shard]) for shard in sorted(shards)]
    raise ValueError(f"{folder}: no weights (expected {', '.join(LAYOUTS)})")


@contextmanager
def _open_weights(path):
    """(specs, read) for one weight file: specs {name: (shape, dtype)} from its header alone, without
    reading tensor data; read(name) → that tensor, in memory it owns (not a view of a mapped file)."""
    if path.endswith(".safetensors"):
        to_torch = {v: k for k, v in SAFETENSORS_DTYPES.items()}
        try:
            f = safe_open(path, framework="pt", backend="pread")   # reads and checks the header
            specs = {}
            for name in f.keys():
                s = f.get_slice(name)
                specs[name] = (tuple(s.get_shape()), to_torch.get(s.get_dtype(), s.get_dtype()))
        except (SafetensorError, OSError) as e:
            raise _unreadable(path, e) from None

        def read(name):
            try:
                return f.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise _unreadable(path, e) from None
        with f:
            yield specs, read
        return

    with open(path, "rb") as f:
        magic = f.read(4)
    zipped = magic == b"PK\x03\x04"                    # torch >= 1.6 writes a zip archive
    if not zipped and magic[:1] != b"\x80":            # the legacy format is a raw pickle stream
        raise ValueError(f"{path}: not a torch.save file (starts with {magic!r})")
    if not zipped:
        warnings.warn(f"{path}: legacy torch.save format (torch < 1.6) cannot be memory-mapped; "
                      f"reading it whole (peak memory is file + model)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... one line names the file
        if "Weights only load failed" in str(e):   # torch's own text would suggest weights_only=False
            found = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed global|\n|$)", str(e))
            what = found.group(1) if found else "a pickled object"
            raise ValueError(f"{path}: holds more than tensors ({what}), and bezoar runs no code from a weight "
                             f"file; where you trust the file, convert it to safetensors (transformers: "
                             f"save_pretrained(folder, safe_serialization=True))") from None
        raise _unreadable(path, e) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict {{tensor name: tensor}}, found {type(state).__name__}")
    specs = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
    if zipped:
        del state   # unmap; read() maps the file again for each tensor and copies that one out

        def read(name):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)[name].clone()
    else:
        def read(name):
            return state.pop(name)
    yield specs, read


def _each_file(folder):
    """(path, specs, read) for each weight file of the folder, checking shards against their index."""
    for path, listed in checkpoint_files(folder):
        with _open_weights(path) as (specs, read):
            if listed is not None and listed != set(specs):
                index = os.path.join(folder, SAFE_INDEX if path.endswith(".safetensors") else BIN_INDEX)
                name = sorted(listed ^ set(specs))[0]
                says = "lists" if name in listed else "does not list"
                raise ValueError(f"{index}: {says} {name} in {os.path.basename(path)}, but that shard "
                                 f"{'lacks' if name in listed else 'holds'} it")
            yield path, specs, read


def _is_stray(name: str) -> bool:
    return name.endswith(STRAY_SUFFIXES)


def iter_checkpoint_tensors(folder: str):
    """Yields (name, tensor) for every weight of a model folder, one at a time, in file order, in the
    storage dtype, on the CPU; any layout above. Stray rotary_emb.inv_freq buffers are skipped."""
    for _, specs, read in _each_file(folder):
        for name in specs:
            if not _is_stray(name):
                yield name, read(name)


# --- loading -------------------------------------------------------------------------------------------

def _as_dtype(dtype):
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype is {dtype!r}, expected one of {', '.join(DTYPES)} (or the torch dtype)")


def _shape(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def parameter_shapes(config: LlamaConfig) -> dict:
    """{checkpoint name: shape} of every weight a Llama of this config stores; with tied embeddings
    lm_head.weight is embed_tokens.weight and is not stored (as transformers saves it)."""
    with torch.device("meta"):
        model = Llama(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}  # shared tensors listed once


def load_pretrained(path: str, dtype=None, device="cpu", quantize=None) -> Llama:
    """Load a Hugging Face LLaMA folder (config.json + weights, any layout above) into a Llama.

    dtype: float32 / float16 / bfloat16 (torch dtype or name), or None for the checkpoint's storage dtype
    (that of its first tensor). device: where the weights go, one tensor at a time.
    quantize: None, or "nf4" to store the layers' projections (q, k, v, o, gate, up, down) as 4-bit NF4
    (lora.layers.Linear4bit: block size 64, double quantisation, compute in `dtype`), each quantised from
    its tensor in `dtype` as it streams in, as transformers + bitsandbytes do; embeddings, norms and
    lm_head stay in `dtype`. Peak memory is then the 4-bit model plus one dense tensor.
    All names and shapes are checked against config.json, from the file headers, before any tensor data is
    read. Returns the model in eval mode, its config's torch_dtype set to the loaded dtype."""
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize is {quantize!r}, expected None or 'nf4'")
    if quantize == "nf4":
        from lora.layers import Linear4bit      # QLoRA's 4-bit base layer (imported only when asked for)
    dtype, device = _as_dtype(dtype), torch.device(device)
    config = load_config(path)
    expected = parameter_shapes(config)
    tied = config.tie_word_embeddings

    def skipped(name):
        return _is_stray(name) or (tied and name == "lm_head.weight")   # the tie replaces a stored copy

    # 1. Names, shapes and dtypes from the headers alone: a bad checkpoint fails before minutes of reading.
    found, unexpected, n_stray = {}, [], 0
    for file, specs, _ in _each_file(path):
        for name, (shape, stored) in specs.items():
            if skipped(name):
                n_stray += _is_stray(name)
            elif name not in expected:
                unexpected.append(name)
            elif shape != expected[name]:
                raise ValueError(f"{file}: {name} has shape {_shape(shape)}, config.json implies "
                                 f"{_shape(expected[name])}")
            elif not (isinstance(stored, torch.dtype) and stored.is_floating_point):
                raise ValueError(f"{file}: {name} is stored as {stored}, expected a floating-point tensor")
            else:
                found[name] = file
                dtype = stored if dtype is None else dtype
        if unexpected:
            more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
            raise ValueError(f"{file}: unexpected tensor(s) {', '.join(unexpected[:3])}{more}: not "
                             f"parameters of the LLaMA its config.json describes")
    missing = [name for name in expected if name not in found]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        hint = " (config.json has tie_word_embeddings false)" if missing == ["lm_head.weight"] else ""
        raise ValueError(f"{path}: weights lack {', '.join(missing[:3])}{more}{hint}")
    if n_stray:
        print(f"{path}: skipped {n_stray} stored rotary_emb.inv_freq buffer(s) (the model recomputes them)",
              file=sys.stderr)

    # 2. Stream: read, convert, put in place of the meta parameter.
    with torch.device("meta"):
        model = Llama(config)
    for _, specs, read in _each_file(path):
        for name in specs:
            if skipped(name):
                continue
            t = read(name).to(device=device, dtype=dtype)
            owner_name, _, leaf = name.rpartition(".")
            layer_linear = owner_name.startswith("model.layers.") and owner_name.endswith(LAYER_LINEARS)
            if quantize == "nf4" and layer_linear:
                parent_name, _, attr = owner_name.rpartition(".")
                setattr(model.get_submodule(parent_name), attr, Linear4bit(t, compute_dtype=dtype))
            else:
                setattr(model.get_submodule(owner_name), leaf, nn.Parameter(t))
            del t
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.config = replace(config, torch_dtype=str(dtype).removeprefix("torch."))
    return model.eval()


# --- saving --------------------------------------------------------------------------------------------

def _parse_size(size) -> int:
    """Bytes from an int or a string like "5GB" (10⁹ bytes, as transformers counts) or "2GiB" (2³⁰)."""
    if isinstance(size, int) and size > 0:
        return size
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "TIB": 2**40}
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not m or m.group(2) not in units or float(m.group(1)) <= 0:
        raise ValueError(f"max_shard_size is {size!r}, expected bytes (int) or a size like '5GB' or '500MiB'")
    return int(float(m.group(1)) * units[m.group(2)])


def save_checkpoint(tensors, config: LlamaConfig, path: str, max_shard_size="5GB", dtype=None, tokenizer=None):
    """Write a Hugging Face folder from (name, tensor) pairs (a dict or any iterable, in any order) that
    arrive one at a time: the tensors of a Llama of `config`, each checked for name and shape.

    dtype: storage dtype (None: config.torch_dtype). Shards hold at most max_shard_size bytes of tensors
    (a bigger tensor gets a shard of its own). tokenizer: a model.Tokenizer whose files go in too
    (tokenizer.model, tokenizer_config.json, special_tokens_map.json, generation_config.json; see
    model/tokenizer.py write_tokenizer_files). The folder appears whole or not at all: files are built in
    a temporary folder beside it, then renamed; into an existing folder (which may hold a tokenizer), the
    weights, index and tokenizer files are moved in first and config.json last, and stale safetensors
    weights are removed."""
    if sys.byteorder != "little":
        raise ValueError("safetensors files are little-endian; this machine is big-endian")
    dtype = _as_dtype(dtype) or _as_dtype(config.torch_dtype)
    limit = _parse_size(max_shard_size)
    shapes = parameter_shapes(config)
    itemsize = torch.empty(0, dtype=dtype, device="cpu").element_size()

    # Plan: shards filled in state-dict order; each tensor's byte range within its shard.
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = itemsize * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    files = [SAFE_WEIGHTS] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path}: exists and is not a folder")
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    handles, where, total = [], {}, 0
    try:
        for file, names in zip(files, shards):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name in names:
                nbytes = itemsize * torch.Size(shapes[name]).numel()
                header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shapes[name]),
                                "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            h = json.dumps(header, separators=(",", ":")).encode()
            h += b" " * (-len(h) % 8)                      # pad: tensor data starts 8-byte aligned
            f = open(os.path.join(tmp, file), "wb")
            handles.append(f)
            f.write(struct.pack("<Q", len(h)) + h)
            start = 8 + len(h)
            for name in names:
                where[name] = (f, start + header[name]["data_offsets"][0])
            total += offset

        written = set()
        for name, t in (tensors.items() if isinstance(tensors, dict) else tensors):
            if name not in shapes:
                raise ValueError(f"{path}: cannot save {name}: not a parameter of a LLaMA of this config "
                                 f"(merge or remove adapters before saving)")
            if name in written:
                raise ValueError(f"{path}: {name} was given twice")
            if tuple(t.shape) != shapes[name]:
                raise ValueError(f"{path}: {name} has shape {_shape(t.shape)}, config implies {_shape(shapes[name])}")
            f, offset = where[name]
            t = t.detach().to(device="cpu", dtype=dtype).contiguous()
            f.seek(offset)
            f.write(t.reshape(-1).view(torch.uint8).numpy())   # raw little-endian bytes
            written.add(name)
            del t
        missing = [name for name in shapes if name not in written]
        if missing:
            raise ValueError(f"{path}: nothing given for {', '.join(missing[:3])}"
                             f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''} (a 4-bit model "
                             f"cannot be saved as is: merge into the 16-bit checkpoint instead)")
        for f in handles:
            f.flush()
            os.fsync(f.fileno())
            f.close()

        if n > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {name: file for file, names in zip(files, shards) for name in names}}
            write_text_atomic(os.path.join(tmp, SAFE_INDEX), json.dumps(index, indent=2, sort_keys=True) + "\n")
            files.append(SAFE_INDEX)
        if tokenizer is not None:
            files += write_tokenizer_files(tmp, tokenizer, config.max_position_embeddings)
        saved = replace(config, torch_dtype=str(dtype).removeprefix("torch."))
        config_json = json.dumps(config_to_dict(saved), indent=2, sort_keys=True) + "\n"
        write_text_atomic(os.path.join(tmp, "config.json"), config_json)
        files.append("config.json")
        _publish(tmp, path, files)
    except BaseException:
        for f in handles:
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp, path, files):
    """Move the finished files of `tmp` to `path`: one rename for a new folder; file by file, config.json
    last, into an existing one, after removing the safetensors weights a previous save left. This publishes
    a folder of several files, so it is not files.atomic_write (one file); a new folder appears whole."""
    if not os.path.exists(path):
        os.rename(tmp, path)
        fsync_dir(os.path.dirname(path))
        return
    for old in os.listdir(path):
        stale = old in (SAFE_WEIGHTS, SAFE_INDEX) or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", old)
        if stale and old not in files:
            os.remove(os.path.join(path, old))
    for file in files:                                    # config.json is last in `files`
        os.replace(os.path.join(tmp, file), os.path.join(path, file))
    os.rmdir(tmp)
    fsync_dir(path)


def save_pretrained(model: Llama, path: str, max_shard_size="5GB", dtype=None, tokenizer=None):
    """Save a Llama as a Hugging Face folder (see save_checkpoint); dtype None keeps the model's dtype.
    Pass the model's tokenizer to make the folder complete for transformers and vLLM."""
    dtype = _as_dtype(dtype) or model.model.embed_tokens.weight.dtype
    state = model.state_dict()                           # references, no copies
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)                # stored once, as embed_tokens.weight
    save_checkpoint(state, model.config, path, max_shard_size=max_shard_size, dtype=dtype, tokenizer=tokenizer)
