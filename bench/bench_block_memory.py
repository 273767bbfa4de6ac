"""Transient memory of the plain elementwise paths, measured on one OpenLLaMA 3B v2 block on the CPU with
BEZOAR_C_KERNELS=0.

With the switch off, the CPU runs the torch code that CUDA runs: RMSNorm.forward, apply_rotary and SwiGLU's
F.silu(gate) · up (model/llama.py), SDPA attention, LoRALinear's base(x) + lora_B(lora_A(dropout(x))) · α/r
(lora/layers.py) and NF4 dequantisation (lora/nf4.py), all differentiated by autograd. What is measured here
is how much memory those paths need beyond their inputs and outputs, so that on a GPU they do not multiply
the step's memory.

The block: hidden 3200, 32 heads of head dim 100, MLP 8640 (model/config.py's openllama-3b-v2); NF4 base
weights (lora.Linear4bit: blocks of 64, double quantisation), bf16 compute, bf16 norms, LoRA r 16, alpha 16,
dropout 0.05 on q, k, v (lora.apply_lora, adapters in fp32); input x [B, T, 3200] bf16 with requires_grad,
T = --seq (2048). Cases, each in its own child process (--batches B for the pieces, --block-batches B for
the block):
  rmsnorm  RMSNorm on x [B, T, 3200]: forward, backward (the weight frozen, as in training)
  rotary   apply_rotary on q [B, 32, T, 100], the transposed view of a projection's output [B, T, 32, 100]
           as Attention passes it: forward, backward
  swiglu   F.silu(gate) · up on gate, up [B·T, 8640]: forward, backward (input: one [B·T, 8640] tensor)
  dropout  F.dropout(p 0.05, training) on a q/k/v input [B·T, 3200] (LoRA's lora_dropout): forward,
           backward. On the CPU torch composes it: noise = bernoulli(1 − p) / (1 − p) in x's dtype, x · noise,
           the noise kept for backward; CUDA runs the fused native_dropout, which keeps a bool mask instead.
           So this row is the CPU's dropout, not CUDA's.
  block    the whole block, forward and backward under activation checkpointing (torch.utils.checkpoint,
           use_reentrant=False, as Llama.hidden_states runs it), and one block's activations: what a forward
           without checkpointing keeps for backward (live bytes after it, less its output)

Transient memory of a call = the peak of the bytes live during the call minus the larger of the bytes live
just before and just after it (inputs, outputs, saved tensors and gradients are not transient), given in MB
and as a multiple of the piece's input (x, q, gate, the q/k/v input; the block: x).

How it is measured. Live bytes come from torch.profiler(profile_memory=True): the CPU allocator reports every
tensor allocation and free to it ("[memory]" events, ± bytes), so the running sum is the exact live tensor
bytes at every moment, the peak included, independent of the C allocator (glibc reuses freed pages, so RSS
only sees the pages of the first peak, and keeps freed small buffers mapped) and of untouched pages. As a
cross-check every case also reports RSS: VmHWM, reset before each call (/proc/self/clear_refs), minus VmRSS
just before it, in a process started with MALLOC_MMAP_THRESHOLD_=65536 so that glibc maps each large buffer
on its own and unmaps it when freed (RSS then follows the live buffers; it also counts what the profiler does
not see: oneDNN's and OpenMP's own buffers, code pages touched the first time). For the pieces the RSS run and
the profiled run are separate calls after a warm-up call; for the block (minutes a call on this CPU: bf16
matmuls without AMX or AVX-512 BF16 are slow) one call is measured both ways at once, after a warm-up at
T = min(64, T), so its RSS also counts the profiler's own records, and its times are that profiled call's.

Times (ms) of the pieces are medians of --repeat calls in a separate child without the fixed mmap threshold
(which makes every large allocation a fresh mapping, page faults included: a cost a training run does not pay).

The machine line is bench.machine.describe()'s, except that bf16 matmul is timed at 512³ instead of 2048³:
at this CPU's ~0.3 GFLOP/s one 2048³ bf16 product takes about a minute, and describe() runs at least two
(a warm-up and a timed one).

    python bench/bench_block_memory.py [--batches 1,4] [--block-batches 1] [--seq 2048]
                                       [--pieces rmsnorm,rotary,swiglu,dropout] [--no-block] [--repeat 5]
"""
import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)                                       # run from anywhere
os.environ["BEZOAR_C_KERNELS"] = "0"              # the torch code CUDA runs, here and in every child
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # see bench_nf4.py: a shared machine; before torch loads

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.machine import matmul_gflops, peak_rss_bytes, rss_bytes, run_child  # noqa: E402
from model.config import PRESETS  # noqa: E402

CONFIG = PRESETS["openllama-3b-v2"]
R, ALPHA, DROPOUT = 16, 16, 0.05
BF16 = torch.bfloat16
MB = 1e6
PIECES = ("rmsnorm", "rotary", "swiglu", "dropout")
WARMUP_T = 64                                     # the block's warm-up length


def describe_quick() -> str:
    """bench.machine.describe()'s line, with bf16 matmul timed at 512³ (see the module docstring)."""
    return (f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"matmul fp32 {matmul_gflops(torch.float32):.1f} GFLOP/s (2048³), "
            f"bf16 {matmul_gflops(torch.bfloat16, n=512, seconds=0.5):.1f} GFLOP/s (512³)")


# --- measuring --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def quiet_stderr():
    """Kineto prints a line to stderr at each profiler start and stop; keep them out of the report."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def allocation_label(node) -> str:
    """Where a tensor was allocated: the innermost frame in this repository's code and the operator called
    from it, e.g. "model/llama.py(48): forward · aten::mul"."""
    from torch._C._profiler import _EventType
    op, n = None, node.parent
    while n is not None:
        if n.tag == _EventType.TorchOp:
            op = n.name
        elif n.tag == _EventType.PyCall and os.path.exists(os.path.join(ROOT, n.name.split("(")[0])):
            return f"{n.name} · {op}" if op else n.name
        n = n.parent
    return op or "?"


def live_bytes_during(fn, top: int = 0):
    """(peak, end, at_peak): live tensor bytes during fn() and after it, relative to before it, from the CPU
    allocator's reports to torch.profiler; at_peak: with top > 0, the `top` largest groups of the tensors
    allocated during fn() and live at the peak, [(label, bytes)] (allocation_label; Python stacks recorded)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=top > 0) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        f = node.extra_fields
        if node.tag == _EventType.Allocation and f.device.type == "cpu":
            events.append((node.start_time_ns, f.alloc_size, f.ptr, allocation_label(node) if top else None))
    events.sort(key=lambda e: e[0])
    live = peak = 0
    alive, at_peak = {}, {}
    for _, nbytes, ptr, label in events:
        live += nbytes
        if nbytes > 0:
            alive[ptr] = (nbytes, label)
        else:
            alive.pop(ptr, None)                      # (or a tensor allocated before fn: not in alive)
        if live > peak:
            peak = live
            at_peak = dict(alive) if top else at_peak
    groups = {}
    for nbytes, label in at_peak.values():
        groups[label] = groups.get(label, 0) + nbytes
    return peak, live, sorted(groups.items(), key=lambda kv: -kv[1])[:top]


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                              # VmHWM ← VmRSS (Linux ≥ 4.0)
        return True
    except OSError:
        return False


def rss_during(fn):
    """(peak, end) of RSS during fn() and after it, relative to before it (None where VmHWM can't be reset)."""
    gc.collect()
    if not reset_peak_rss():
        fn()
        return None, None
    before = rss_bytes()
    fn()
    return peak_rss_bytes() - before, rss_bytes() - before


def transient(peak, end):
    return None if peak is None else peak - max(0, end)


# --- the cases ----------------------------------------------------------------------------------------------

def rand(*shape, seed, dtype=BF16, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def case(name, B, T):
    """(input bytes, [(phase, fn)], reset): the phases run in order after reset()."""
    from model.llama import RMSNorm, apply_rotary, rotary_cos_sin
    D, H, Dh, Fw = CONFIG.hidden_size, CONFIG.num_attention_heads, CONFIG.head_dim, CONFIG.intermediate_size
    state = {}
    cos, sin = rotary_cos_sin(torch.arange(T).expand(B, T), Dh, CONFIG.rope_theta, BF16)      # [B, 1, T, Dh]
    if name == "rmsnorm":
        norm = RMSNorm(D, CONFIG.rms_norm_eps).to(BF16).requires_grad_(False)
        x, gy = rand(B, T, D, seed=1, scale=3).requires_grad_(), rand(B, T, D, seed=2)          # [B, T, D]
        inputs = [x]
        phases = [("forward", lambda: state.update(y=norm(x))), ("backward", lambda: state["y"].backward(gy))]
    elif name == "rotary":
        q, gy = rand(B, T, H, Dh, seed=1).requires_grad_(), rand(B, H, T, Dh, seed=2)  # [B, T, H, Dh], [B, H, T, Dh]
        inputs = [q]
        phases = [("forward", lambda: state.update(y=apply_rotary(q.transpose(1, 2), cos, sin))),  # [B, H, T, Dh]
                  ("backward", lambda: state["y"].backward(gy))]
    elif name == "swiglu":
        gate = rand(B * T, Fw, seed=1, scale=2).requires_grad_()                                 # [B·T, F]
        up, gy = rand(B * T, Fw, seed=2).requires_grad_(), rand(B * T, Fw, seed=3)              # [B·T, F]
        inputs = [gate, up]
        phases = [("forward", lambda: state.update(y=F.silu(gate) * up)),
                  ("backward", lambda: state["y"].backward(gy))]
    elif name == "dropout":
        x, gy = rand(B * T, D, seed=1).requires_grad_(), rand(B * T, D, seed=2)                 # [B·T, D]
        inputs = [x]
        torch.manual_seed(0)                                                    # bernoulli's generator
        phases = [("forward", lambda: state.update(y=F.dropout(x, DROPOUT, training=True))),
                  ("backward", lambda: state["y"].backward(gy))]
    elif name == "block":
        from torch.utils.checkpoint import checkpoint
        block = build_block()
        x, gy = rand(B, T, D, seed=1).requires_grad_(), rand(B, T, D, seed=2)                   # [B, T, D]
        inputs = [x]
        phases = [("forward (checkpointed)",
                   lambda: state.update(y=checkpoint(block, x, cos, sin, None, None, use_reentrant=False))),
                  ("backward (recompute + backward)", lambda: state["y"].backward(gy))]
    else:
        raise SystemExit(f"unknown case {name!r}; expected one of {', '.join(PIECES)}, block")

    def reset():
        for t in inputs:
            t.grad = None
        state.pop("y", None)
        gc.collect()
    size = inputs[0].numel() * inputs[0].element_size()
    return size, phases, reset


_BLOCK = []


def build_block():
    """Block 0 of OpenLLaMA 3B v2: random N(0, 0.02²) projections quantised to NF4 one at a time (the dense
    block never exists), bf16 norms at 1, LoRA on q, k, v; training mode (dropout on)."""
    if _BLOCK:
        return _BLOCK[0]
    import torch.nn as nn
    from lora import Linear4bit, apply_lora
    from model.llama import Block
    with torch.device("meta"):
        block = Block(CONFIG, 0)
    g = torch.Generator().manual_seed(0)
    for name, m in list(block.named_modules()):
        if isinstance(m, nn.Linear):
            w = torch.empty(m.weight.shape).normal_(0, 0.02, generator=g).to(BF16)
            parent, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(parent), leaf, Linear4bit(w, compute_dtype=BF16))
    for norm in (block.input_layernorm, block.post_attention_layernorm):
        norm.weight = nn.Parameter(torch.ones(CONFIG.hidden_size, dtype=BF16), requires_grad=False)
    torch.manual_seed(0)
    apply_lora(block, R, ALPHA, DROPOUT)                     # q_proj, k_proj, v_proj; fp32 adapters
    _BLOCK.append(block.train())
    return block


def activations(B, T):
    """(bytes, forward peak): what one block keeps for backward without checkpointing (live after its forward,
    less its output), and the peak of that forward above its start."""
    from model.llama import rotary_cos_sin
    block = build_block()
    x = rand(B, T, CONFIG.hidden_size, seed=1).requires_grad_()                                 # [B, T, D]
    cos, sin = rotary_cos_sin(torch.arange(T).expand(B, T), CONFIG.head_dim, CONFIG.rope_theta, BF16)
    kept = {}
    peak, end, _ = live_bytes_during(lambda: kept.update(y=block(x, cos, sin, None)))
    return end - kept["y"].numel() * kept["y"].element_size(), peak


def child_memory(name, B, T):
    out = {"phases": {}}
    if name == "block":
        size, phases, reset = case(name, B, min(T, WARMUP_T))   # warm-up at a short length: lazy set-ups
        for _, fn in phases:
            fn()
        reset()
        size, phases, reset = case(name, B, T)
        for phase, fn in phases:
            t0, cpu0, r = time.perf_counter(), time.process_time(), {}
            rss = rss_during(lambda: r.update(alloc=live_bytes_during(fn, top=8)))
            peak, end, at_peak = r["alloc"]
            out["phases"][phase] = {"alloc": [peak, end], "rss": list(rss), "at_peak": at_peak,
                                    "ms": [(time.perf_counter() - t0) * 1e3, (time.process_time() - cpu0) * 1e3]}
        reset()
        del phases
        out["activations"], out["activations_forward_peak"] = activations(B, T)
    else:
        size, phases, reset = case(name, B, T)
        for _, fn in phases:                                   # warm-up
            fn()
        reset()
        for phase, fn in phases:
            out["phases"][phase] = {"rss": list(rss_during(fn))}
        reset()
        for phase, fn in phases:
            out["phases"][phase]["alloc"] = list(live_bytes_during(fn)[:2])
        reset()
    out["input_bytes"] = size
    return out


def child_time(name, B, T, repeat):
    """{phase: [wall ms, CPU ms]}, medians over `repeat` rounds after one warm-up round. CPU time (all threads)
    is the steadier figure on a machine shared with other work."""
    size, phases, reset = case(name, B, T)
    times = {phase: [] for phase, _ in phases}
    for _ in range(repeat + 1):
        reset()
        for phase, fn in phases:
            t0, cpu0 = time.perf_counter(), time.process_time()
            fn()
            times[phase].append((time.perf_counter() - t0, time.process_time() - cpu0))
    return {phase: [statistics.median(w for w, _ in t[1:]) * 1e3, statistics.median(c for _, c in t[1:]) * 1e3]
            for phase, t in times.items()}


# --- report --------------------------------------------------------------------------------------------------

def run(kind, *args, fixed_mmap=False):
    """This script as a child (bench/machine.py's run_child), with glibc's mmap threshold fixed if asked."""
    if not fixed_mmap:
        return run_child(__file__, kind, *args)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        return run_child(__file__, kind, *args)
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]


def fmt(bytes_, size):
    """'4.00×, 52.4' (× the input, MB), or — where there is no figure."""
    return "—" if bytes_ is None else f"{bytes_ / size:.2f}×, {bytes_ / MB:.1f}"


TABLE = ("| piece | phase | transient (× input, MB) | RSS transient (× input) | wall ms | CPU ms |\n"
         "|---|---|---|---|---|---|")


def row(name, phase, mem, size, ms):
    rss = transient(*mem["rss"])
    return (f"| {name} | {phase} | {fmt(transient(*mem['alloc']), size)} | "
            f"{'—' if rss is None else f'{rss / size:.2f}×'} | {ms[0]:.1f} | {ms[1]:.1f} |")


def batches(s):
    return [int(b) for b in s.split(",") if b]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,4", help="micro-batch sizes B for the pieces ('': none)")
    p.add_argument("--block-batches", default="1", help="micro-batch sizes for the whole block ('': none)")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence T (2048: the recipe's)")
    p.add_argument("--pieces", default=",".join(PIECES))
    p.add_argument("--no-block", action="store_true")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per piece (medians)")
    p.add_argument("--save", help="also write every child's result to this JSON file")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, name, B, T, *rest = args.child
        result = (child_memory(name, int(B), int(T)) if kind == "memory"
                  else child_time(name, int(B), int(T), int(rest[0])))
        print(json.dumps(result))
        return
    T, pieces = args.seq, [n for n in args.pieces.split(",") if n]
    for name in pieces:
        if name not in PIECES:
            raise SystemExit(f"--pieces: unknown piece {name!r}; expected some of {', '.join(PIECES)}")
    if args.repeat < 1:
        raise SystemExit(f"--repeat is {args.repeat}, expected at least 1")

    print(describe_quick(), flush=True)
    print(f"BEZOAR_C_KERNELS=0; OpenLLaMA 3B v2 block: D {CONFIG.hidden_size}, {CONFIG.num_attention_heads} heads × "
          f"{CONFIG.head_dim}, F {CONFIG.intermediate_size}, T {T}; NF4 (64, double quant), bf16, LoRA r {R} "
          f"alpha {ALPHA} dropout {DROPOUT} on q, k, v", flush=True)
    saved = {}

    def save(key, value):
        saved[key] = value
        if args.save:
            with open(args.save, "w") as f:
                json.dump(saved, f, indent=1)
        return value

    for B in (batches(args.batches) if pieces else []):
        print(f"\nB × T = {B} × {T}. Transient: peak live tensor bytes beyond those live before and after the call "
              f"(profiler), × the piece's input and MB; RSS: the same from VmHWM; ms: wall and CPU (all threads), "
              f"medians of {args.repeat}\n\n{TABLE}", flush=True)
        sizes = []
        for name in pieces:
            mem = save(f"memory {name} {B} {T}", run("memory", name, B, T, fixed_mmap=True))
            ms = save(f"time {name} {B} {T}", run("time", name, B, T, args.repeat))
            size = mem["input_bytes"]
            sizes.append(f"{name} {size / MB:.1f} MB")
            for phase, m in mem["phases"].items():
                print(row(name, phase, m, size, ms[phase]), flush=True)
        print(f"\ninputs: {'; '.join(sizes)}", flush=True)
    if args.no_block:
        return
    for B in batches(args.block_batches):
        print(f"\nwhole block, B × T = {B} × {T}, one call of each phase after a warm-up at T = {min(T, WARMUP_T)} "
              f"(its RSS also counts the profiler's records; ms: that profiled call's)\n\n{TABLE}", flush=True)
        r = save(f"memory block {B} {T}", run("memory", "block", B, T, fixed_mmap=True))
        size = r["input_bytes"]
        for phase, m in r["phases"].items():
            print(row("block", phase, m, size, m["ms"]), flush=True)
        print(f"\nx is {size / MB:.1f} MB", flush=True)
        for phase, m in r["phases"].items():
            print(f"- {phase}: peak {m['alloc'][0] / MB:.1f} MB above the start, end {m['alloc'][1] / MB:+.1f} MB; "
                  f"live at the peak, allocated during the call: " + "; ".join(
                      f"{label} {nbytes / MB:.1f} MB" for label, nbytes in m["at_peak"]), flush=True)
        print(f"- one block's activations (what a forward without checkpointing keeps): "
              f"{r['activations'] / MB:.1f} MB = {r['activations'] / size:.1f}× x (that forward's peak "
              f"{r['activations_forward_peak'] / MB:.1f} MB above its start)", flush=True)


if __name__ == "__main__":
    main()
