"""Load time and peak resident memory of load_pretrained on an OpenLLaMA 3B v2-shaped checkpoint.

    python bench/bench_load.py [--out bench/out] [--bin] [--dtypes none,bfloat16] [--nf4]

Writes once, under --out (git-ignored), a random-weight fp16 checkpoint of the openllama-3b-v2 preset's
shape (config.json + model.safetensors, 6.85 GB), streamed by save_checkpoint one tensor at a time; with
--bin also pytorch_model.bin (the layout the base model ships in). Each load runs in a fresh child
process that reports its own peak RSS, cold (the files evicted from the page cache first) and warm.
Goal: peak RSS <= 1.2x the loaded model's bytes. --nf4 adds a load with quantize="nf4" (bf16 embeddings,
norms and lm_head; goal: peak RSS <= 2.2 GB). Results: stdout and <out>/bench_load.json.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from anywhere

import torch

from bench.machine import matmul_gflops, peak_rss_bytes, rss_bytes, run_child
from lora.layers import Linear4bit
from model.config import PRESETS
from model.llama import Llama
from model.loading import checkpoint_files, iter_checkpoint_tensors, load_pretrained, parameter_shapes, save_checkpoint

GB = 1e9


def write_random_checkpoint(folder: str):
    """Child: the 3B preset with N(0, 0.02²) fp16 weights, made and written one tensor at a time."""
    config = PRESETS["openllama-3b-v2"]
    g = torch.Generator().manual_seed(0)

    def tensors():
        for name, shape in parameter_shapes(config).items():
            yield name, torch.empty(shape, dtype=torch.float16).normal_(0, 0.02, generator=g)
    t0 = time.perf_counter()
    save_checkpoint(tensors(), config, folder, max_shard_size="10GB", dtype=torch.float16)
    return {"seconds": time.perf_counter() - t0, "peak_rss": peak_rss_bytes()}


def write_bin(src: str, folder: str):
    """Child: the same tensors as one pytorch_model.bin (torch.save needs them all in memory at once)."""
    os.makedirs(folder, exist_ok=True)
    state = dict(iter_checkpoint_tensors(src))
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(folder, "config.json"), "w") as g:
        g.write(f.read())
    return {"peak_rss": peak_rss_bytes()}


def evict(folder: str):
    """Drop the folder's weight files from the page cache, so the next read comes from disk."""
    for path, _ in checkpoint_files(folder):
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def measure_load(folder: str, dtype: str, quantize: str = "none"):
    """Child: time load_pretrained and report this process's peak RSS."""
    with torch.device("meta"):   # the meta device's first use imports ~70 MB of torch: not the loader's
        Llama(PRESETS["tiny"])
    before = rss_bytes()
    t0 = time.perf_counter()
    model = load_pretrained(folder, dtype=None if dtype == "none" else dtype,
                            quantize=None if quantize == "none" else quantize)
    seconds = time.perf_counter() - t0
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model_bytes += sum(m.weight.nbytes for m in model.modules() if isinstance(m, Linear4bit))
    return {"seconds": seconds, "peak_rss": peak_rss_bytes(), "rss_before": before, "model_bytes": model_bytes,
            "dtype": str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    p.add_argument("--bin", action="store_true", help="also write and load pytorch_model.bin")
    p.add_argument("--dtypes", default="none,bfloat16", help="load dtypes: none (= storage, fp16), float32, bfloat16")
    p.add_argument("--nf4", action="store_true", help="also load with quantize='nf4' (bf16), warm cache")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        what, *rest = args.child
        fn = {"write": write_random_checkpoint, "write-bin": write_bin, "load": measure_load}[what]
        print(json.dumps(fn(*rest)))
        return

    rates = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"matmul GFLOP/s fp32 {rates['fp32']:.1f}, bf16 {rates['bf16']:.1f}")
    st = os.path.join(args.out, "openllama-3b-v2-random-fp16")
    results = {"matmul_gflops": rates, "loads": []}
    if not os.path.exists(os.path.join(st, "config.json")):
        r = run_child(__file__, "write", st)
        print(f"wrote {st}: {r['seconds']:.0f} s, peak RSS {r['peak_rss'] / GB:.2f} GB")
        results["write"] = r
    folders = {"safetensors": st}
    if args.bin:
        folders["bin"] = os.path.join(args.out, "openllama-3b-v2-random-fp16-bin")
        if not os.path.exists(os.path.join(folders["bin"], "pytorch_model.bin")):
            run_child(__file__, "write-bin", st, folders["bin"])

    cases = [(layout, folder, dtype, "none", cache) for layout, folder in folders.items()
             for dtype in args.dtypes.split(",") for cache in ("cold", "warm")]
    if args.nf4:
        cases.append(("safetensors", st, "bfloat16", "nf4", "warm"))
    print(f"{'layout':12} {'dtype':9} {'quant':5} {'cache':5} {'load s':>7} {'model GB':>8} {'peak RSS GB':>11} "
          f"{'peak/model':>10} {'(peak-before)/model':>19}")
    for layout, folder, dtype, quantize, cache in cases:
        if cache == "cold":
            evict(folder)
        r = run_child(__file__, "load", folder, dtype, quantize)
        r.update(layout=layout, cache=cache, requested=dtype, quantize=quantize,
                 peak_over_model=r["peak_rss"] / r["model_bytes"],
                 growth_over_model=(r["peak_rss"] - r["rss_before"]) / r["model_bytes"])
        results["loads"].append(r)
        print(f"{layout:12} {r['dtype']:9} {quantize:5} {cache:5} {r['seconds']:7.1f} {r['model_bytes'] / GB:8.2f} "
              f"{r['peak_rss'] / GB:11.2f} {r['peak_over_model']:10.3f} {r['growth_over_model']:19.3f}")
    with open(os.path.join(args.out, "bench_load.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
