"""One QLoRA SFT step on the CPU: bezoar against transformers + PEFT + bitsandbytes, same machine, same run.

The step (issue 5): a small LLaMA (hidden 512, 8 layers, 8 heads, MLP 1376, vocab 32000), batch 4 × 256,
NF4 base (blocks of 64, double quantisation) on every layer projection, LoRA r 64, alpha 16, dropout 0.05
on all of them (PEFT's "all-linear": q, k, v, o, gate, up, down), activation checkpointing, the mean token
cross-entropy over all positions (labels = input ids), backward, one torch AdamW step (fused=True:
3.5x faster than the for-loop default on the CPU for these 112 small tensors). Both sides start
from the same random dense weights, so they quantise to the same NF4 codes; with B = 0 the first loss is
the base model's and both sides print it (a check that they compute the same thing). With an MLP width
that is a multiple of 64 (1344) the two agree to 1e-6; at 1376 (21.5 blocks a row) they differ by ~5e-3,
because bitsandbytes 0.50's CPU dequantize_4bit takes row i's absmax from block i·⌊1376/64⌋ + j/64 instead
of (i·1376 + j)/64, so the peer's down_proj runs on mis-scaled weights (ours equals the formula; see
tests/test_nf4.py). Embeddings, norms and lm_head are in the compute dtype on both sides; the peer keeps
PEFT's defaults (adapters in fp32).

Each (side, dtype) runs in its own child process, which reports its own peak RSS (bench/machine.py); the
children alternate ours / peer, fp32 / bf16, for --rounds rounds; times are medians over all timed steps.
"CPU s" is the process's CPU seconds per step (both threads, OpenMP waiting passively): on a machine shared
with other work, wall time measures the scheduler as much as the code, and the CPU-time ratio is the steadier
one. Ours runs once per --ckpt entry: how many of the 8 blocks are checkpointed (Llama.checkpoint_blocks). 8 is
what the peer does (every decoder layer); fewer stores some blocks' activations instead of recomputing
them, a granularity to spend the memory the peer uses and we do not (its peak RSS is printed beside).

Roofline: FLOPs per step are counted from the shapes, matmuls only (elementwise work is not counted):
  linear K → N, M tokens:   forward 2MKN;  backward 2MKN (∂x only: W is frozen)
  LoRA r on K → N:          forward 2Mr(K+N);  backward 2 × that (∂x, and ∂A, ∂B)
  attention, causal:        forward 2 × 2·D·T(T+1)/2 per sequence and layer (QKᵀ, PV; the masked half
                            is not counted);  backward 2 × forward
  lm_head D → V:            forward 2·M·D·V (every position);  backward 2·M·D·V (∂h only)
"model FLOPs" are these, without recomputation (as MFU counts); activation checkpointing recomputes each
checkpointed block's forward on top ("recompute"). % of roofline = model FLOPs / step time / the matmul
GFLOP/s of the same dtype measured in this run (2048³ matmul, bench/machine.py), the median of one
measurement before each round. "% executed" counts the recomputation too (the FLOPs the step runs, as
hardware-FLOPs utilisation does): higher for the same time, so it flatters checkpointing; the goals are read
on the first.

A separate child measures one step of the OpenLLaMA 3B v2 shape (batch 1 × 512, NF4, bf16 compute,
checkpointing, the recipe's LoRA r 16 on q, k, v): peak RSS, goal ≤ 3.5 GB. Its random weights are made
and quantised one tensor at a time, so the dense model never exists.

--profile runs one more step in each child under torch.profiler and prints where its time goes: self CPU
time of matmuls (with the in-step matmul GFLOP/s they achieve, against the 2048³ rate of the roofline),
the fused attention kernels, dropout's random draws, all other operators, and Python/autograd (with our C
kernels, which the profiler does not see as operators).

    python bench/bench_sft_step.py [--rounds 2] [--steps 4] [--ckpt 8,4] [--no-peer] [--no-3b] [--dtypes fp32,bf16]
                                   [--profile]
"""
import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from anywhere
# OpenMP threads wait passively (see bench_nf4.py: on a busy machine spinning punishes code made of many
# operators); OMP_WAIT_POLICY=default leaves libgomp's own default (spin a while, then sleep), which is what
# a user's run gets and is faster on a quiet machine, for both sides. Set before torch loads OpenMP.
if "default" in (os.environ.get("OMP_WAIT_POLICY"), os.environ.get("BEZOAR_OMP_WAIT")):
    os.environ.pop("OMP_WAIT_POLICY", None)
    os.environ["BEZOAR_OMP_WAIT"] = "default"                  # so that the children do the same
else:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from bench.machine import describe, matmul_gflops, peak_rss_bytes, rss_bytes, run_child  # noqa: E402
from model.config import PRESETS  # noqa: E402

SMALL = replace(PRESETS["openllama-3b-v2"], hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=8, intermediate_size=1376)
BATCH, SEQ = 4, 256
R, ALPHA, DROPOUT = 64, 16, 0.05
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GB = 1e9


# --- FLOPs -----------------------------------------------------------------------------------------------

def step_flops(c, B, T, r, targets=ALL_LINEAR):
    """{"model": matmul FLOPs of forward + backward without recomputation, "recompute": the blocks'
    forward again (activation checkpointing)}, for a batch B × T (see the module docstring)."""
    M, D, Fw = B * T, c.hidden_size, c.intermediate_size
    shapes = {"q_proj": (D, D), "k_proj": (D, c.num_key_value_heads * c.head_dim),
              "v_proj": (D, c.num_key_value_heads * c.head_dim), "o_proj": (D, D),
              "gate_proj": (D, Fw), "up_proj": (D, Fw), "down_proj": (Fw, D)}
    base = sum(2 * M * K * N for K, N in shapes.values())                     # per layer, forward
    lora = sum(2 * M * r * (K + N) for name, (K, N) in shapes.items() if name in targets)
    attn = 2 * 2 * D * B * T * (T + 1) // 2
    block_fwd = base + lora + attn
    block_bwd = base + 2 * lora + 2 * attn
    head = 2 * M * D * c.vocab_size
    L = c.num_hidden_layers
    return {"model": L * (block_fwd + block_bwd) + 2 * head, "recompute": L * block_fwd,
            "recompute_attention": L * attn,
            "parts": {"linear": 2 * L * base, "lora": 3 * L * lora, "attention": 3 * L * attn, "lm_head": 2 * head}}


def executed(flops, ckpt, L):
    """Matmul FLOPs a step executes with `ckpt` of its L blocks checkpointed: the model FLOPs plus those
    blocks' forward again."""
    return flops["model"] + flops["recompute"] * ckpt / L


# --- the same random weights for both sides -------------------------------------------------------------

def random_tensors(config, dtype, seed=0):
    """(name, tensor) in checkpoint order: N(0, 0.02²) weights, norms at 1; one tensor at a time."""
    from model.loading import parameter_shapes
    g = torch.Generator().manual_seed(seed)
    for name, shape in parameter_shapes(config).items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=dtype)
        else:
            yield name, torch.empty(shape, dtype=torch.float32).normal_(0, 0.02, generator=g).to(dtype)


def is_layer_linear(name):
    return name.startswith("model.layers.") and name.rsplit(".", 2)[-2] in ALL_LINEAR


def build_nf4_llama(config, dtype):
    """Llama with NF4 layer projections (lora.layers.Linear4bit), the rest in `dtype`, all frozen; made one
    tensor at a time (as load_pretrained(quantize="nf4") streams a checkpoint), so the dense model never
    exists."""
    import torch.nn as nn
    from lora.layers import Linear4bit
    from model.llama import Llama
    with torch.device("meta"):
        model = Llama(config)
    for name, t in random_tensors(config, dtype):
        owner, _, leaf = name.rpartition(".")
        if is_layer_linear(name):
            parent, _, attr = owner.rpartition(".")
            setattr(model.get_submodule(parent), attr, Linear4bit(t, compute_dtype=dtype))
        else:
            setattr(model.get_submodule(owner), leaf, nn.Parameter(t, requires_grad=False))
        del t
    return model


def build_ours(config, dtype, r, targets):
    """build_nf4_llama + LoRA r on `targets`, activation checkpointing on."""
    from lora import apply_lora
    model = build_nf4_llama(config, dtype)
    torch.manual_seed(0)
    apply_lora(model, r, ALPHA, DROPOUT, targets=list(targets))
    model.gradient_checkpointing = True
    return model.train()


def build_peer(config, dtype, r):
    """transformers LlamaForCausalLM with bitsandbytes Linear4bit projections, PEFT LoRA on all linear."""
    import bitsandbytes as bnb
    import transformers
    from peft import LoraConfig, get_peft_model
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf_config)
    for name, t in random_tensors(config, dtype):
        owner, _, leaf = name.rpartition(".")
        if is_layer_linear(name):
            parent, _, attr = owner.rpartition(".")
            layer = bnb.nn.Linear4bit(t.shape[1], t.shape[0], bias=False, compute_dtype=dtype, quant_type="nf4",
                                      compress_statistics=True, device="meta")
            layer.weight = bnb.nn.Params4bit(t, requires_grad=False, quant_type="nf4", blocksize=64,
                                             compress_statistics=True)._quantize("cpu")
            setattr(model.get_submodule(parent), attr, layer)
        else:
            setattr(model.get_submodule(owner), leaf, torch.nn.Parameter(t, requires_grad=False))
    model.model.rotary_emb = type(model.model.rotary_emb)(hf_config)          # its buffers, off the meta device
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    return model.train()


def batch(config, B, T, seed=1):
    ids = torch.randint(3, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))
    return ids, ids.clone()                                                    # labels: every position


# --- children --------------------------------------------------------------------------------------------

PROFILE_GROUPS = {   # torch.profiler operator name -> group (self CPU time); see profile_groups
    "matmul": ("aten::mm", "aten::addmm", "aten::addmm_", "aten::baddbmm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                  "aten::bmm"),
    "rng": ("aten::random_", "aten::bernoulli_", "aten::uniform_"),
}


def profile_groups(step):
    """Run step() once under torch.profiler; its self CPU time in ms per group: matmul, attention (the
    fused SDPA kernels and their batched products; neither side has other bmm), rng (dropout's random draws: the peer's masks; ours draws one seed a call), aten
    (every other operator: elementwise, copies, softmax, reductions), python (what no operator accounts for:
    autograd Functions' Python code and, for ours, the C kernels they call through ctypes (NF4, dropout,
    RMSNorm, the loss's softmax), the engine, module calls; the profiler's own per-operator cost
    lands here too)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    out = dict.fromkeys(["matmul", "attention", "rng", "aten", "python"], 0.0)
    for e in prof.key_averages():
        group = next((g for g, names in PROFILE_GROUPS.items() if e.key in names), None)
        group = group or ("aten" if e.key.startswith("aten::") else "python")
        out[group] += e.self_cpu_time_total / 1e3
    return out


def child_step(side, dtype_name, steps, warmup, ckpt, profiled=0):
    """Build one side, run warmup + steps SFT steps; report step times, first loss and peak RSS.
    ckpt: checkpointed blocks (ours only; the peer checkpoints every layer). profiled: then one more
    step under torch.profiler (profile_groups), after the peak RSS is read."""
    dtype = DTYPES[dtype_name]
    config = SMALL
    t0 = time.perf_counter()
    if side == "ours":
        model = build_ours(config, dtype, R, ALL_LINEAR)
        model.checkpoint_blocks = ckpt
    else:
        model = build_peer(config, dtype, R)
    build_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=True)
    ids, labels = batch(config, BATCH, SEQ)
    n_targets = BATCH * (SEQ - 1)

    if side == "ours":
        from losses import sequence_logps_chunked

        def loss_fn():
            hidden = model.hidden_states(ids)                                  # [B, T, D]
            return -sequence_logps_chunked(hidden, model.lm_head.weight, labels).sum() / n_targets
    else:
        def loss_fn():
            return model(input_ids=ids, labels=labels).loss

    rss_built = rss_bytes()
    times, cpu_times, losses = [], [], []

    def step():
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for i in range(warmup + steps):
        t, c = time.perf_counter(), time.process_time()
        losses.append(step())
        if i >= warmup:
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
    peak = peak_rss_bytes()
    return {"side": side, "dtype": dtype_name, "ckpt": ckpt, "times": times, "cpu_times": cpu_times,
            "first_loss": losses[0], "losses": losses,
            "build_s": build_s, "rss_built": rss_built, "peak_rss": peak,
            "trainable": sum(p.numel() for p in params), "profile": profile_groups(step) if profiled else None}


def child_3b():
    """The OpenLLaMA 3B v2 shape: build in NF4 (bf16 embeddings, norms, lm_head), one SFT step at 1 × 512."""
    from lora.layers import Linear4bit
    from losses import sequence_logps_chunked
    config = PRESETS["openllama-3b-v2"]
    t0 = time.perf_counter()
    model = build_ours(config, torch.bfloat16, 16, ("q_proj", "k_proj", "v_proj"))
    build_s = time.perf_counter() - t0
    nf4 = sum(m.weight.nbytes for m in model.modules() if isinstance(m, Linear4bit))
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_built, peak_built = rss_bytes(), peak_rss_bytes()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=True)
    ids, labels = batch(config, 1, 512)
    t0 = time.perf_counter()
    hidden = model.hidden_states(ids)
    loss = -sequence_logps_chunked(hidden, model.lm_head.weight, labels).sum() / 511
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"build_s": build_s, "model_bytes": nf4 + dense, "nf4_bytes": nf4, "rss_built": rss_built,
            "peak_built": peak_built, "step_s": time.perf_counter() - t0, "loss": loss.item(),
            "peak_rss": peak_rss_bytes(), "step_flops": step_flops(config, 1, 512, 16, ("q_proj", "k_proj", "v_proj"))}


# --- report ----------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of children (ours, peer) per dtype")
    p.add_argument("--steps", type=int, default=4, help="timed steps per child, after --warmup")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--ckpt", default="8,4", help="ours: checkpointed blocks, one run each (8 = all, as the peer)")
    p.add_argument("--no-peer", action="store_true", help="ours only")
    p.add_argument("--no-3b", action="store_true", help="skip the OpenLLaMA 3B v2 shape step")
    p.add_argument("--profile", action="store_true",
                   help="one more step per child under torch.profiler: where the time goes (self CPU ms by group)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        what, *rest = args.child
        result = child_3b() if what == "3b" else child_step(what, rest[0], *map(int, rest[1:]))
        print(json.dumps(result))
        return

    print(describe())
    print("load average (1, 5, 15 min): %.2f %.2f %.2f" % os.getloadavg(), f"on {os.cpu_count()} CPUs, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset (libgomp default)')}")
    dtypes = args.dtypes.split(",")
    ckpts = [int(c) for c in args.ckpt.split(",")]
    L = SMALL.num_hidden_layers
    runs_list = [("ours", c) for c in ckpts] + ([] if args.no_peer else [("peer", L)])
    flops = step_flops(SMALL, BATCH, SEQ, R)
    tokens = BATCH * SEQ
    c = SMALL
    print(f"\nstep: LLaMA D {c.hidden_size}, L {c.num_hidden_layers}, H {c.num_attention_heads}, F "
          f"{c.intermediate_size}, V {c.vocab_size}; batch {BATCH} x {SEQ} = {tokens} tokens; NF4 base; LoRA r {R} "
          f"alpha {ALPHA} dropout {DROPOUT} on {', '.join(ALL_LINEAR)}; checkpointing; fused AdamW")
    print("FLOPs per step (matmuls, counted from shapes; see the docstring): " + ", ".join(
        f"{k} {v / 1e9:.1f}" for k, v in flops["parts"].items()) + f" -> model {flops['model'] / 1e9:.1f} GFLOP "
        f"({flops['model'] / tokens / 1e6:.0f} MFLOP/token); recompute +{flops['recompute'] / 1e9:.1f} GFLOP "
        f"with all {L} blocks checkpointed")

    runs = {(s, k, d): [] for s, k in runs_list for d in dtypes}
    rates = {d: [] for d in dtypes}
    for rnd in range(args.rounds):
        for d in dtypes:
            rates[d].append(matmul_gflops(DTYPES[d]))
            for s, k in runs_list:
                r = run_child(__file__, s, d, args.steps, args.warmup, k, int(args.profile))
                runs[(s, k, d)].append(r)
                print(f"  round {rnd + 1} {s:4} ckpt {k}/{L} {d}: step s " + " ".join(f"{t:.2f}" for t in r["times"])
                      + " (CPU s " + " ".join(f"{t:.2f}" for t in r["cpu_times"]) + f"), first loss "
                      f"{r['first_loss']:.4f}, peak RSS {r['peak_rss'] / GB:.2f} GB, load %.1f" % os.getloadavg()[0],
                      flush=True)

    print(f"\n{'dtype':5} {'side':5} {'ckpt':>4} {'step s':>7} {'tokens/s':>9} {'GFLOP/s':>8} {'matmul GF/s':>11} "
          f"{'% roofline':>10} {'% executed':>10} {'CPU s':>6} {'peak RSS GB':>11} {'first loss':>10}")
    summary = {}
    for d in dtypes:
        rate = statistics.median(rates[d])
        for s, k in runs_list:
            rs = runs[(s, k, d)]
            med = statistics.median([t for r in rs for t in r["times"]])
            cpu = statistics.median([t for r in rs for t in r["cpu_times"]])
            peak = max(r["peak_rss"] for r in rs)
            summary[(s, k, d)] = {"tokens_s": tokens / med, "peak": peak, "cpu": cpu}
            print(f"{d:5} {s:5} {k:>2}/{L} {med:7.2f} {tokens / med:9.0f} {flops['model'] / med / 1e9:8.1f} {rate:11.1f} "
                  f"{100 * flops['model'] / med / 1e9 / rate:9.1f}% {100 * executed(flops, k, L) / med / 1e9 / rate:9.1f}% "
                  f"{cpu:6.2f} {peak / GB:11.2f} {rs[0]['first_loss']:10.4f}")
    if not args.no_peer:
        for d in dtypes:
            q = summary[("peer", L, d)]
            for k in ckpts:
                o = summary[("ours", k, d)]
                print(f"{d}, ours ckpt {k}/{L}: ours / peer tokens/s = {o['tokens_s'] / q['tokens_s']:.2f}x (CPU seconds "
                      f"per step: peer / ours = {q['cpu'] / o['cpu']:.2f}x), peak RSS ours - peer = "
                      f"{(o['peak'] - q['peak']) / 2**20:+.0f} MiB")
        print("(first losses differ: bitsandbytes' CPU dequantize_4bit scales rows of 1376 values, not a multiple "
              "of 64, with the wrong absmax; see the docstring)")

    if args.profile:
        print("\nwhere one step's time goes (torch.profiler, self CPU ms, first round; see profile_groups). In-step "
              "matmul GFLOP/s = the matmul FLOPs (all but attention, recomputation included) / matmul time:")
        print(f"{'dtype':5} {'side':5} {'ckpt':>4} {'matmul':>14} {'in-step GF/s':>12} {'attention':>13} {'rng':>12} "
              f"{'other aten':>13} {'python':>12} {'total':>7}")
        for d in dtypes:
            for s, k in runs_list:
                prof = runs[(s, k, d)][0]["profile"]
                total = sum(prof.values())
                mm_flops = (flops["model"] - flops["parts"]["attention"]
                            + (flops["recompute"] - flops["recompute_attention"]) * k / L)
                cells = [f"{prof[g]:6.0f} ({100 * prof[g] / total:4.1f}%)" for g in ("matmul", "attention", "rng",
                                                                                     "aten", "python")]
                print(f"{d:5} {s:5} {k:>2}/{L} {cells[0]:>14} {mm_flops / prof['matmul'] / 1e6:12.0f} {cells[1]:>13} "
                      f"{cells[2]:>12} {cells[3]:>13} {cells[4]:>12} {total:7.0f}")

    if not args.no_3b:
        r = run_child(__file__, "3b")
        f = r["step_flops"]["model"] + r["step_flops"]["recompute"]
        print(f"\nOpenLLaMA 3B v2 shape, NF4 + bf16, LoRA r 16 on q, k, v, batch 1 x 512, checkpointing: model "
              f"{r['model_bytes'] / GB:.2f} GB ({r['nf4_bytes'] / GB:.2f} GB NF4), built in {r['build_s']:.0f} s, RSS "
              f"{r['rss_built'] / GB:.2f} GB; one step {r['step_s']:.0f} s ({f / r['step_s'] / 1e9:.0f} GFLOP/s with "
              f"recompute), loss {r['loss']:.3f}, peak RSS {r['peak_rss'] / GB:.2f} GB (goal <= 3.5)")
    print("load average at the end: %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
