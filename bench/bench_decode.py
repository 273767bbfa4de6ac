"""Greedy decoding speed with the KV cache, ours against transformers' `generate`, same weights, same run.

    python bench/bench_decode.py [--out bench/out] [--dtypes float32,bfloat16] [--layers 26]

Both models share the very same weight tensors (transformers' LlamaForCausalLM gets ours through
load_state_dict(assign=True)), both decode greedily from the same prompt, and the report gives how many
of the new tokens they chose alike (all of them in fp32; in bf16 our CPU path for RMSNorm,
cpu/rmsnorm.c, rounds once where transformers' ops round several times, and the random weights' nearly flat
logits let a near-tie flip). Decode rate =
(N2 − N1) / (t(N2) − t(N1)) for N1 and N2 new tokens, so the prompt's prefill cancels out; the prefill time
is reported on its own. Batch 1, the usual chat setting.

On a CPU, batch-1 decoding reads every weight once per token, so its ceiling is memory bandwidth:
the report gives each side's effective GB/s (weight bytes read per token × tokens/s) next to the
machine's matmul rates measured in the same run. Goal (issue): ours >= 1.5x the peer's tokens/s.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from anywhere

import torch

from bench.machine import matmul_gflops, peak_rss_bytes, run_child, run_json
from model.config import config_to_dict
from model.loading import load_pretrained
from model.sampling import generate

PROMPT_LEN, N1, N2 = 32, 4, 36


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(folder: str, dtype: str, layers: int):
    """Child: decode with ours, then with transformers on the same tensors; print a JSON line."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    torch.manual_seed(0)
    ours = load_pretrained(folder, dtype=getattr(torch, dtype))
    if layers < len(ours.model.layers):                     # a shorter stack for quick looks
        ours.model.layers = ours.model.layers[:layers]
        ours.config.num_hidden_layers = layers
    cfg = ours.config
    prompt = torch.randint(3, cfg.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    prompt[0, 0] = cfg.bos_token_id
    weight_bytes = sum(p.numel() * p.element_size() for n, p in ours.named_parameters() if "embed_tokens" not in n)

    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config_to_dict(cfg).items() if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        peer = transformers.LlamaForCausalLM(hf_cfg)
    peer.load_state_dict(ours.state_dict(), assign=True, strict=True)   # the same storage: no copy
    peer.model.rotary_emb = LlamaRotaryEmbedding(hf_cfg)                 # its buffer was on meta
    peer.eval()

    def run_ours(n):
        return generate(ours, [prompt[0].tolist()], n)[0].tokens

    def run_peer(n):
        with torch.no_grad():
            out = peer.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                min_new_tokens=n, do_sample=False, pad_token_id=cfg.pad_token_id)
        return out[0, PROMPT_LEN:].tolist()

    result = {"dtype": dtype, "layers": layers, "weight_bytes_per_token": weight_bytes}
    tokens = {}
    for name, run in (("ours", run_ours), ("transformers", run_peer)):
        run(2)                                                           # warm-up
        _, t_prefill = timed(lambda: run(1))
        _, t1 = timed(lambda: run(N1))
        toks, t2 = timed(lambda: run(N2))
        tokens[name] = toks
        rate = (N2 - N1) / (t2 - t1)
        result[name] = {"decode_tok_s": rate, "prefill_s": t_prefill, "effective_GB_s": rate * weight_bytes / 1e9}
    result["same_tokens"] = tokens["ours"] == tokens["transformers"]
    result["tokens_agreeing"] = next((i for i, (a, b) in enumerate(zip(tokens["ours"], tokens["transformers"]))
                                      if a != b), N2)                   # the leading tokens both chose
    result["speedup"] = result["ours"]["decode_tok_s"] / result["transformers"]["decode_tok_s"]
    result["peak_rss"] = peak_rss_bytes()
    print(json.dumps(result))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--layers", type=int, default=26, help="decoder layers to keep (26 = the real 3B shape)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return measure(args.child[0], args.child[1], int(args.child[2]))

    folder = os.path.join(args.out, "openllama-3b-v2-random-fp16")
    if not os.path.exists(os.path.join(folder, "config.json")):
        run_json([sys.executable, os.path.join(os.path.dirname(__file__), "bench_load.py"), "--out", args.out,
                  "--child", "write", folder])
    rates = {d: matmul_gflops(getattr(torch, d)) for d in ("float32", "bfloat16")}
    print(f"machine: {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; matmul fp32 "
          f"{rates['float32']:.1f} GFLOP/s, bf16 {rates['bfloat16']:.1f} GFLOP/s (bf16/fp32 {rates['bfloat16'] / rates['float32']:.2f}x)")
    print(f"greedy decode, batch 1, prompt {PROMPT_LEN} tokens, rate over new tokens {N1}..{N2}; OpenLLaMA 3B v2 shape, random weights")
    print(f"{'dtype':9} {'ours tok/s':>10} {'peer tok/s':>10} {'speedup':>7} {'ours GB/s':>9} {'peer GB/s':>9} "
          f"{'prefill ours/peer s':>19} {'same tokens':>11} {'peak RSS GB':>11}")
    print("(same tokens: how many of the first new tokens both sides chose alike; in bf16 the CPU paths round in\n"
          " other places (cpu/rmsnorm.c), and random weights give nearly flat logits, so a near-tie can flip)")
    results = []
    for dtype in args.dtypes.split(","):
        r = run_child(__file__, folder, dtype, args.layers)
        r["matmul_gflops"] = rates
        results.append(r)
        o, t = r["ours"], r["transformers"]
        print(f"{dtype:9} {o['decode_tok_s']:10.2f} {t['decode_tok_s']:10.2f} {r['speedup']:6.2f}x {o['effective_GB_s']:9.1f} "
              f"{t['effective_GB_s']:9.1f} {o['prefill_s']:9.2f}/{t['prefill_s']:<9.2f} "
              f"{r['tokens_agreeing']:>8}/{N2} {r['peak_rss'] / 1e9:11.2f}")
    with open(os.path.join(args.out, "bench_decode.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
