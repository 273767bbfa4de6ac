"""NF4 on the CPU, ours against bitsandbytes, in one run (only same-run ratios mean anything):

  1. dequantisation of an 8640 × 3200 weight (OpenLLaMA-3B's MLP shape), double-quantised, to fp32 and bf16:
     lora.nf4 NF4Tensor.dequantize against bitsandbytes.functional.dequantize_4bit;
  2. forward + backward of a 4-bit LoRA linear, x [4, 256, in], r 64, alpha 16, dropout 0.05, fp32 and bf16
     compute, both MLP shapes: lora.layers LoRALinear(Linear4bit) against bitsandbytes Linear4bit + PEFT LoRA;
     "ours, W kept" keeps the dequantised W from forward for backward (cpu.nf4.KEEP_MAX_BYTES raised;
     by default only small layers do): the memory/speed trade-off of dequantising once instead of twice;
  3. where the time goes: torch.profiler's top operators for one step of each layer;
  4. peak RSS added by quantising one fp16 8640 × 3200 tensor, each in a fresh subprocess;
  5. the whole OpenLLaMA 3B v2 shape in NF4 (bf16 embeddings, norms, lm_head): random bf16 tensors made and
     quantised one at a time (bench/bench_sft_step.py's builder), resident bytes, time and peak RSS, in a
     child. Goal: ≤ 2.2 GB. (Quantising while loading a checkpoint from disk: bench/bench_load.py --nf4.)
The machine line gives fp32 and bf16 matmul GFLOP/s and the load average measured in the same run; OpenMP
threads wait passively unless OMP_WAIT_POLICY says otherwise (see below).
Timings interleave ours and theirs, repetition by repetition, and report the median and the best.

    python bench/bench_nf4.py [--reps 7] [--no-profile] [--no-3b] [--threads N]
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from anywhere
# On a machine busier than its CPUs, OpenMP's default spin-waiting makes each parallel operator wait for a
# descheduled thread (measured: ~10 ms an operator here), which punishes code made of many operators.
# Passive (futex) waiting avoids that, for bitsandbytes and ours alike; set OMP_WAIT_POLICY to override.
# It must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from bench.machine import describe, peak_rss_bytes, rss_bytes, run_child  # noqa: E402

N_OUT, N_IN = 8640, 3200          # gate/up: 3200 → 8640; down: 8640 → 3200
TOKENS = (4, 256)
R, ALPHA, DROPOUT = 64, 16, 0.05


def interleaved(fns: dict, reps: int) -> dict:
    """{name: (median s, best s)}, the functions run in turn within each repetition after one warm-up."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def bnb_lora_layer(W, compute_dtype):
    """bitsandbytes Linear4bit (NF4, double quant, blocks of 64) wrapped by PEFT's LoRA."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(W.shape[1], W.shape[0], bias=False, compute_dtype=compute_dtype,
                                          quant_type="nf4", compress_statistics=True)
            self.proj.weight = bnb.nn.Params4bit(W.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                                 compress_statistics=True)._quantize("cpu")

        def forward(self, x):
            return self.proj(x)

    return get_peft_model(Holder(), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=["proj"]))


def our_lora_layer(W, compute_dtype):
    from lora.layers import Linear4bit, LoRALinear
    return LoRALinear(Linear4bit(W, compute_dtype=compute_dtype), R, ALPHA, DROPOUT)


class KeptW(torch.nn.Module):
    """Our layer with the dequantised W kept from forward for backward, whatever its size."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        from cpu import nf4 as cpu_nf4
        before, cpu_nf4.KEEP_MAX_BYTES = cpu_nf4.KEEP_MAX_BYTES, 1 << 40
        try:
            return self.layer(x)
        finally:
            cpu_nf4.KEEP_MAX_BYTES = before


def train_step(layer, x, g):
    layer(x).backward(g)


def bench_dequantize(reps):
    import bitsandbytes.functional as bnbF
    from lora.nf4 import quantize_nf4
    W = torch.randn(N_OUT, N_IN, generator=torch.Generator().manual_seed(0)) * 0.02
    q = quantize_nf4(W)
    packed, state = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    print(f"\n1. dequantize {N_OUT} x {N_IN} (NF4, double quant), ms: median (best); Gvalues/s from the median")
    print(f"   {'dtype':<9} {'bitsandbytes':>18} {'ours':>18} {'ours/bnb':>9} {'bnb Gv/s':>9} {'ours Gv/s':>10}")
    for dtype in (torch.float32, torch.bfloat16):
        state.dtype = dtype
        assert torch.equal(q.dequantize(dtype), bnbF.dequantize_4bit(packed, state))
        t = interleaved({"bnb": lambda: bnbF.dequantize_4bit(packed, state), "ours": lambda: q.dequantize(dtype)}, reps)
        gv = lambda s: W.numel() / s / 1e9                                   # noqa: E731
        print(f"   {str(dtype)[6:]:<9} {t['bnb'][0]*1e3:9.1f} ({t['bnb'][1]*1e3:6.1f}) {t['ours'][0]*1e3:9.1f} "
              f"({t['ours'][1]*1e3:6.1f}) {t['ours'][0]/t['bnb'][0]:9.2f} {gv(t['bnb'][0]):9.2f} {gv(t['ours'][0]):10.2f}")
    # Where the time goes: both sides return a fresh tensor, and the first touch of its pages (the kernel's
    # page faults) is a large fixed cost, smaller with 2 MiB pages; the rest is the dequantisation proper,
    # timed here into a reused buffer.
    import cpu
    from cpu import nf4 as cpu_nf4
    from lora.nf4 import NF4_CODE
    print("   where ours goes, ms (median): a fresh output touched once (torch.empty + fill_) | the same with huge "
          "pages asked for (cpu.nf4.advise_huge_pages, as dequantize does) | the decoding of the double-quantised "
          "absmax | the kernel into a reused buffer | the plain torch code (the nf4 path off)")

    def fresh_huge(dtype):
        t = torch.empty(N_OUT, N_IN, dtype=dtype)
        cpu_nf4.advise_huge_pages(t)
        return t.fill_(0)
    for dtype in (torch.float32, torch.bfloat16):
        buf, absmax = torch.empty(q.numel // 64, 64, dtype=dtype), q.block_absmax()
        fns = {"fresh": lambda: torch.empty(N_OUT, N_IN, dtype=dtype).fill_(0), "huge": lambda: fresh_huge(dtype),
               "absmax": q.block_absmax}
        if cpu.enabled("nf4", buf):
            fns["kernel"] = lambda: cpu_nf4.dequantize_blocks(buf, q.packed.view(-1, 32), absmax[:, None], NF4_CODE)
        t = interleaved(fns, reps)
        switch = os.environ.get("BEZOAR_C_KERNELS")
        os.environ["BEZOAR_C_KERNELS"] = "-nf4"                     # read at every call: the plain code now
        try:
            torch_path = interleaved({"torch": lambda: q.dequantize(dtype)}, reps)["torch"][0]
        finally:
            if switch is None:
                del os.environ["BEZOAR_C_KERNELS"]
            else:
                os.environ["BEZOAR_C_KERNELS"] = switch
        kernel = f"{t['kernel'][0]*1e3:.1f}" if "kernel" in t else "(no kernel)"
        print(f"   {str(dtype)[6:]:<9} {t['fresh'][0]*1e3:.1f} | {t['huge'][0]*1e3:.1f} | {t['absmax'][0]*1e3:.1f} | "
              f"{kernel} | {torch_path*1e3:.1f}")


def bench_layers(reps, profile):
    print(f"\n2. LoRA linear forward+backward, x {list(TOKENS)} x in, r {R}, alpha {ALPHA}, dropout {DROPOUT}; "
          f"ms: median (best); GFLOP/s counts the two base matmuls (4·M·N·K)")
    print(f"   {'shape':<12} {'dtype':<9} {'bnb + PEFT':>18} {'ours':>18} {'ours, W kept':>18} {'ours/bnb':>9} "
          f"{'kept/bnb':>9} {'bnb GF/s':>9} {'ours GF/s':>10}")
    profiles = []
    for n_out, n_in in ((N_OUT, N_IN), (N_IN, N_OUT)):
        W = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(1)) * 0.02
        for dtype in (torch.float32, torch.bfloat16):
            ours = our_lora_layer(W, dtype)
            layers = {"bnb": bnb_lora_layer(W, dtype), "ours": ours, "kept": KeptW(ours)}
            g = torch.Generator().manual_seed(2)
            x = torch.randn(*TOKENS, n_in, generator=g).to(dtype).requires_grad_()
            dy = torch.randn(*TOKENS, n_out, generator=g).to(dtype)
            t = interleaved({k: (lambda m=m: train_step(m, x, dy)) for k, m in layers.items()}, reps)
            flops = 4 * x.shape[0] * x.shape[1] * n_in * n_out
            ms = {k: f"{v[0]*1e3:9.1f} ({v[1]*1e3:6.1f})" for k, v in t.items()}
            print(f"   {f'{n_in}->{n_out}':<12} {str(dtype)[6:]:<9} {ms['bnb']} {ms['ours']} {ms['kept']} "
                  f"{t['ours'][0]/t['bnb'][0]:9.2f} {t['kept'][0]/t['bnb'][0]:9.2f} "
                  f"{flops/t['bnb'][0]/1e9:9.1f} {flops/t['ours'][0]/1e9:10.1f}")
            if profile and n_out == N_OUT:
                profiles += [(f"{k}, {str(dtype)[6:]}", m, x, dy) for k, m in layers.items() if k != "kept"]
    W_bytes = N_OUT * N_IN * 2
    print(f"   W kept costs one dense W per layer between its forward and backward ({W_bytes / 2**20:.0f} MiB in bf16 "
          f"here, 4x its NF4 size); under activation checkpointing, one block's worth at a time")
    return profiles


def print_profiles(profiles):
    from torch.profiler import profile
    print("\n3. where the time goes (torch.profiler, one forward+backward, 3200 -> 8640): top operators by self CPU time")
    for label, layer, x, dy in profiles:
        with profile() as p:
            train_step(layer, x, dy)
        rows = sorted(p.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in rows)
        top = ", ".join(f"{e.key} {e.self_cpu_time_total/1e3:.0f} ms ({e.count}x)" for e in rows[:6])
        print(f"   {label:<14} total {total/1e3:6.0f} ms: {top}")


def child_3b_model():
    """Subprocess body: the 3B shape in NF4, built tensor by tensor; resident bytes, seconds, peak RSS."""
    from bench.bench_sft_step import PRESETS, build_nf4_llama
    from lora.layers import Linear4bit
    t0 = time.perf_counter()
    model = build_nf4_llama(PRESETS["openllama-3b-v2"], torch.bfloat16)
    seconds = time.perf_counter() - t0
    nf4 = sum(m.weight.nbytes for m in model.modules() if isinstance(m, Linear4bit))
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"seconds": seconds, "nf4_bytes": nf4, "dense_bytes": dense, "rss": rss_bytes(),
                      "peak_rss": peak_rss_bytes()}))


def bench_3b_model():
    r = run_child(__file__, "3b")
    total = r["nf4_bytes"] + r["dense_bytes"]
    print(f"\n5. OpenLLaMA 3B v2 shape in NF4, built from random bf16 tensors one at a time: {total / 1e9:.2f} GB "
          f"resident model ({r['nf4_bytes'] / 1e9:.2f} GB NF4 projections + {r['dense_bytes'] / 1e9:.2f} GB bf16 "
          f"embeddings, lm_head, norms; goal <= 2.2 GB), quantised in {r['seconds']:.0f} s, process RSS "
          f"{r['rss'] / 1e9:.2f} GB, peak {r['peak_rss'] / 1e9:.2f} GB")


def child_quantize(which):
    """Subprocess body: one fp16 weight, quantised by `which`; prints the peak RSS above the RSS with the
    weight alone, as JSON."""
    W = torch.randn(N_OUT, N_IN, dtype=torch.float16, generator=torch.Generator().manual_seed(3))
    before = rss_bytes()
    if which == "ours":
        from lora.nf4 import quantize_nf4
        quantize_nf4(W)
    else:
        import bitsandbytes.functional as bnbF
        bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    print(json.dumps({"extra_bytes": peak_rss_bytes() - before}))


def bench_quantize_rss():
    print(f"\n4. peak RSS while quantising one fp16 {N_OUT} x {N_IN} tensor ({N_OUT*N_IN*2/2**20:.0f} MiB; its "
          f"NF4 form is {N_OUT*N_IN*4.127/8/2**20:.0f} MiB), above the RSS with the tensor alone, fresh subprocess each")
    for which in ("ours", "bnb"):
        extra = run_child(__file__, which)["extra_bytes"]
        print(f"   {which:<5} +{extra/2**20:7.0f} MiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions of each measurement")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-3b", action="store_true", help="skip building the whole 3B shape in NF4")
    parser.add_argument("--child", choices=("ours", "bnb", "3b"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "3b":
        return child_3b_model()
    if args.child:
        return child_quantize(args.child)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe())
    print("load average (1, 5, 15 min): %.2f %.2f %.2f" % os.getloadavg(), f"on {os.cpu_count()} CPUs, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    from cpu import nf4 as cpu_nf4
    print("NF4 dequantisation on the CPU:", cpu_nf4.KERNEL.status)
    bench_dequantize(args.reps)
    profiles = bench_layers(args.reps, not args.no_profile)
    if profiles:
        print_profiles(profiles)
    bench_quantize_rss()
    if not args.no_3b:
        bench_3b_model()
    print("load average at the end: %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
