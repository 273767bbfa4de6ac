"""Transient memory of the reference elementwise paths, measured on one OpenLLaMA 3B v2 block on the CPU with
BEZOAR_C_KERNELS=0.

With the switch off, the CPU runs exactly the torch code that CUDA runs: RMSNormFunction's, RotaryFunction's
and SwiGLUFunction's torch branches (model/llama.py), SDPA attention, LoRAFunction with cpu/dropout.py's
counter-based mask in torch int64 ops, and NF4 dequantisation (lora/nf4.py). What is measured here is how
much memory those paths need beyond their inputs and outputs, so that on a GPU they do not multiply the
step's memory.

The block: hidden 3200, 32 heads of head dim 100, MLP 8640 (model/config.py's openllama-3b-v2); NF4 base
weights (lora.Linear4bit: blocks of 64, double quantisation), bf16 compute, bf16 norms, LoRA r 16, alpha 16,
dropout 0.05 on q, k, v (lora.apply_lora, adapters in fp32); input x [B, T, 3200] bf16 with requires_grad,
T = 2048. Cases, each in its own child process (--batches B for the pieces, --block-batches B for the block):
  rmsnorm  RMSNorm on x [B, T, 3200]: forward, backward (the weight frozen, as in training)
  rotary   RotaryFunction on q [B, T, 32, 100] (a projection's output): forward, backward
  swiglu   SwiGLUFunction on gate, up [B, T, 8640]: forward, backward (input: one [M, F] bf16 tensor)
  dropout  dropout.select on a q/k/v input [B·T, 3200]: into a new tensor (LoRA's forward) and in place
           (LoRA's backward selects ∂h A in place)
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
T = 64, so its RSS also counts the profiler's own records.

Times (ms) are medians of --repeat calls in a separate child without the fixed mmap threshold (which would
make every large allocation a fresh mapping: a cost the old code, with more temporaries, would pay more).

--impls before,after: "before" runs the torch branches as they were before the chunked/in-place rewrite (the
plain compositions, BEFORE below, patched into the classes and into cpu.dropout), "after" the code as it is.
The two compute the same values (tests/test_reference_memory.py).

    python bench/bench_block_memory.py [--batches 1,4] [--block-batches 1] [--impls before,after]
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

from bench.machine import describe, peak_rss_bytes, rss_bytes, run_child  # noqa: E402
from model.config import PRESETS  # noqa: E402

CONFIG = PRESETS["openllama-3b-v2"]
T = 2048
R, ALPHA, DROPOUT = 16, 16, 0.05
BF16 = torch.bfloat16
MB = 1e6
PIECES = ("rmsnorm", "rotary", "swiglu", "dropout")


# --- the torch branches as they were before (the baseline of --impls before) ---------------------------

def rmsnorm_forward_before(ctx, x, weight, eps):
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    ctx.save_for_backward(x, weight, r)
    return weight * (xf * r).to(x.dtype)


def rmsnorm_backward_before(ctx, grad_y):
    x, weight, r = ctx.saved_tensors
    xf = x.float()
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        g = (grad_y * weight).float()
        gx = torch.linalg.vecdot(g, xf).unsqueeze(-1)
        grad_x = g.addcmul_(xf, r.square().mul_(gx).div_(-x.shape[-1])).mul_(r).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_w = (grad_y * (xf * r).to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return grad_x, grad_w, None


def rotary_forward_before(ctx, x, cos, sin):
    from model.llama import apply_rotary
    ctx.save_for_backward(cos, sin)
    return apply_rotary(x.transpose(1, 2), cos, sin).contiguous()


def rotary_backward_before(ctx, grad_y):
    from model.llama import apply_rotary
    cos, sin = ctx.saved_tensors
    return apply_rotary(grad_y, cos, -sin).transpose(1, 2), None, None


def swiglu_forward_before(ctx, gate, up):
    ctx.save_for_backward(gate, up)
    return F.silu(gate) * up


def swiglu_backward_before(ctx, grad_y):
    gate, up = ctx.saved_tensors
    g, u, dy = gate.float(), up.float(), grad_y.float()
    s = torch.sigmoid(g)
    return (dy * u * s * (1 + g * (1 - s))).to(gate.dtype), (dy * g * s).to(up.dtype)


def uniforms_before(n, seed, device="cpu"):
    from cpu.dropout import GAMMA, MIX, _shift_right, _signed
    g = torch.arange(1, (n + 3) // 4 + 1, dtype=torch.int64, device=device)
    z = g * _signed(GAMMA) + _signed(seed)
    z = (z ^ _shift_right(z, 30)) * _signed(MIX[0])
    z = (z ^ _shift_right(z, 27)) * _signed(MIX[1])
    z = z ^ _shift_right(z, 31)
    lanes = torch.stack([_shift_right(z, 16 * j) & 0xFFFF for j in range(4)], dim=-1)
    return lanes.reshape(-1)[:n].to(torch.int32)


def select_before(x, seed, p, out=None):
    from cpu.dropout import threshold
    out = torch.empty_like(x) if out is None else out
    keep = (uniforms_before(x.numel(), seed, x.device) >= threshold(p)).view(x.shape)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device), out=out)


def use_before():
    """Patch the plain compositions in (the Functions look forward/backward up at each call)."""
    from cpu import dropout
    from model.llama import RMSNormFunction, RotaryFunction, SwiGLUFunction
    for cls, fwd, bwd in ((RMSNormFunction, rmsnorm_forward_before, rmsnorm_backward_before),
                          (RotaryFunction, rotary_forward_before, rotary_backward_before),
                          (SwiGLUFunction, swiglu_forward_before, swiglu_backward_before)):
        cls.forward, cls.backward = staticmethod(fwd), staticmethod(bwd)
    dropout.select = select_before


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
    from it, e.g. "model/llama.py(300): backward · aten::sigmoid"."""
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


def case(name, B, Tn=T):
    """(input bytes, [(phase, fn)], reset): the phases run in order after reset()."""
    from cpu import dropout
    from model.llama import RMSNorm, RotaryFunction, SwiGLUFunction, rotary_cos_sin
    D, H, Dh, Fw = CONFIG.hidden_size, CONFIG.num_attention_heads, CONFIG.head_dim, CONFIG.intermediate_size
    state = {}
    cos, sin = rotary_cos_sin(torch.arange(Tn).expand(B, Tn), Dh, CONFIG.rope_theta, BF16)    # [B, 1, T, Dh]
    if name == "rmsnorm":
        norm = RMSNorm(D, CONFIG.rms_norm_eps).to(BF16).requires_grad_(False)
        x, gy = rand(B, Tn, D, seed=1, scale=3).requires_grad_(), rand(B, Tn, D, seed=2)
        inputs = [x]
        phases = [("forward", lambda: state.update(y=norm(x))), ("backward", lambda: state["y"].backward(gy))]
    elif name == "rotary":
        x, gy = rand(B, Tn, H, Dh, seed=1).requires_grad_(), rand(B, H, Tn, Dh, seed=2)
        inputs = [x]
        phases = [("forward", lambda: state.update(y=RotaryFunction.apply(x, cos, sin))),
                  ("backward", lambda: state["y"].backward(gy))]
    elif name == "swiglu":
        gate, up = rand(B, Tn, Fw, seed=1, scale=2).requires_grad_(), rand(B, Tn, Fw, seed=2).requires_grad_()
        gy = rand(B, Tn, Fw, seed=3)
        inputs = [gate, up]
        phases = [("forward", lambda: state.update(y=SwiGLUFunction.apply(gate, up))),
                  ("backward", lambda: state["y"].backward(gy))]
    elif name == "dropout":
        x, g = rand(B * Tn, D, seed=1), rand(B * Tn, D, seed=2)
        inputs = [x]
        phases = [("select", lambda: state.update(y=dropout.select(x, 12345, DROPOUT))),
                  ("select in place", lambda: dropout.select(g, 54321, DROPOUT, out=g))]
    elif name == "block":
        from torch.utils.checkpoint import checkpoint
        block = build_block()
        x, gy = rand(B, Tn, D, seed=1).requires_grad_(), rand(B, Tn, D, seed=2)
        inputs = [x]
        phases = [("forward (checkpointed)",
                   lambda: state.update(y=checkpoint(block, x, cos, sin, None, None, use_reentrant=False))),
                  ("backward (recompute + backward)", lambda: state["y"].backward(gy))]
    else:
        raise SystemExit(f"unknown case {name!r}")

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
    from lora import apply_lora
    from lora.layers import Linear4bit
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


def activations(B):
    """(bytes, forward peak): what one block keeps for backward without checkpointing (live after its forward,
    less its output), and the peak of that forward above its start."""
    from model.llama import rotary_cos_sin
    block = build_block()
    x = rand(B, T, CONFIG.hidden_size, seed=1).requires_grad_()
    cos, sin = rotary_cos_sin(torch.arange(T).expand(B, T), CONFIG.head_dim, CONFIG.rope_theta, BF16)
    kept = {}
    peak, end, _ = live_bytes_during(lambda: kept.update(y=block(x, cos, sin, None)))
    return end - kept["y"].numel() * kept["y"].element_size(), peak


def child_memory(name, impl, B):
    if impl == "before":
        use_before()
    out = {"phases": {}}
    if name == "block":
        size, phases, reset = case(name, B, Tn=64)            # warm-up at a short length: lazy set-ups
        for _, fn in phases:
            fn()
        reset()
        size, phases, reset = case(name, B)
        for phase, fn in phases:
            t0, cpu0, r = time.perf_counter(), time.process_time(), {}
            rss = rss_during(lambda: r.update(alloc=live_bytes_during(fn, top=8)))
            peak, end, at_peak = r["alloc"]
            out["phases"][phase] = {"alloc": [peak, end], "rss": list(rss), "at_peak": at_peak,
                                    "s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0}
        reset()
        del phases
        out["activations"], out["activations_forward_peak"] = activations(B)
    else:
        size, phases, reset = case(name, B)
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


def child_time(name, impl, B, repeat):
    """{phase: [wall ms, CPU ms]}, medians over `repeat` rounds after one warm-up round. CPU time (all threads)
    is the steadier figure on a machine shared with other work."""
    if impl == "before":
        use_before()
    size, phases, reset = case(name, B)
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
    return "—" if bytes_ is None else f"{bytes_ / size:5.2f}× {bytes_ / MB:7.1f} MB"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,4", help="micro-batch sizes B (× 2048 tokens) for the pieces ('': none)")
    p.add_argument("--block-batches", default="1", help="micro-batch sizes for the whole block ('': none)")
    p.add_argument("--impls", default="before,after")
    p.add_argument("--pieces", default=",".join(PIECES))
    p.add_argument("--no-block", action="store_true")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--save", help="also write every child's result to this JSON file")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, name, impl, B, *rest = args.child
        result = (child_memory(name, impl, int(B)) if kind == "memory"
                  else child_time(name, impl, int(B), int(rest[0])))
        print(json.dumps(result))
        return

    print(describe(), flush=True)
    print(f"BEZOAR_C_KERNELS=0; OpenLLaMA 3B v2 block: D {CONFIG.hidden_size}, {CONFIG.num_attention_heads} heads × "
          f"{CONFIG.head_dim}, F {CONFIG.intermediate_size}, T {T}; NF4 (64, double quant), bf16, LoRA r {R} "
          f"alpha {ALPHA} dropout {DROPOUT} on q, k, v", flush=True)
    impls = args.impls.split(",")
    saved = {}

    def save(key, value):
        saved[key] = value
        if args.save:
            with open(args.save, "w") as f:
                json.dump(saved, f, indent=1)
        return value

    for B in [int(b) for b in args.batches.split(",") if b]:
        print(f"\nB × T = {B} × {T}. Transient: peak live tensor bytes beyond those live before and after the call "
              f"(profiler), × the piece's input and MB; RSS: the same from VmHWM; ms: wall and CPU (all threads), "
              f"medians of {args.repeat}", flush=True)
        print(f"{'piece':<8} {'phase':<16} " + "  ".join(f"{i + ' transient':>21}" for i in impls)
              + f"  {'RSS':>13}  {'wall ms':>15}  {'CPU ms':>15}")
        for name in [n for n in args.pieces.split(",") if n]:
            mem = {i: save(f"memory {name} {i} {B}", run("memory", name, i, B, fixed_mmap=True)) for i in impls}
            ms = {i: save(f"time {name} {i} {B}", run("time", name, i, B, args.repeat)) for i in impls}
            size = mem[impls[0]]["input_bytes"]
            for phase in mem[impls[0]]["phases"]:
                alloc = "  ".join(f"{fmt(transient(*mem[i]['phases'][phase]['alloc']), size):>21}" for i in impls)
                rss = " / ".join("—" if (t := transient(*mem[i]["phases"][phase]["rss"])) is None else
                                 f"{t / size:.2f}×" for i in impls)
                wall = " / ".join(f"{ms[i][phase][0]:.1f}" for i in impls)
                cpu = " / ".join(f"{ms[i][phase][1]:.1f}" for i in impls)
                print(f"{name:<8} {phase:<16} {alloc}  {rss:>13}  {wall:>15}  {cpu:>15}", flush=True)
            print(f"{'':<8} (input {size / MB:.1f} MB)", flush=True)
    if args.no_block:
        return
    for B in [int(b) for b in args.block_batches.split(",") if b]:
        print(f"\nwhole block, B × T = {B} × {T}, one call of each phase (its RSS also counts the profiler's "
              f"records); x is {B * T * CONFIG.hidden_size * 2 / MB:.1f} MB", flush=True)
        for i in impls:
            r = save(f"memory block {i} {B}", run("memory", "block", i, B, fixed_mmap=True))
            size = r["input_bytes"]
            for phase, m in r["phases"].items():
                print(f"  {i:<6} {phase:<32} transient {fmt(transient(*m['alloc']), size)}; peak "
                      f"{m['alloc'][0] / MB:.1f} MB above the start, end {m['alloc'][1] / MB:+.1f} MB; RSS transient "
                      f"{fmt(transient(*m['rss']), size)}; {m['s']:.0f} s ({m['cpu_s']:.0f} CPU s)", flush=True)
                print("         live at the peak, allocated during the call: " + "; ".join(
                    f"{label} {nbytes / MB:.1f} MB" for label, nbytes in m["at_peak"]), flush=True)
            print(f"  {i:<6} one block's activations (what a forward without checkpointing keeps): "
                  f"{r['activations'] / MB:.1f} MB = {r['activations'] / size:.1f}× x (that forward's peak "
                  f"{r['activations_forward_peak'] / MB:.1f} MB above its start)", flush=True)


if __name__ == "__main__":
    main()
