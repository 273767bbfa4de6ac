"""What each CPU speed path (cpu/) buys: step times with every path on, with every path off, and with one path
off at a time, in one process on one machine.

The switch BEZOAR_C_KERNELS is read at every use (cpu/build.py), so each workload builds its model once and
times its step under every case in turn: "all on" (1), "all off" (0), and "-name" (every path on but one).
Cases alternate within each round (each round starts one case later), so a slow spell of a shared machine
spreads over all of them; each time is the median over rounds of the case's median step time.

Workloads (the times a user sees; bench/README.md):
  base      the embedded default's base pretraining step (toy/base.py: tiny LLaMA, dense, B 32 × T 128)
  tiny_sft  the embedded default's SFT step (train_sft.py on configs/tiny.toml: the tiny base in NF4, LoRA r 16
            on q/k/v, dropout 0.05, B 16 × T 192, the chunked frozen-head loss)
  tiny_dpo  the embedded default's DPO step (train_dpo.py, packed rows, the reference in the loop), B 16 pairs
  decode    the embedded default's toy evaluation: greedy KV-cached decoding, 64 prompts × 64 new tokens
  sft       bench/bench_sft_step.py's step (hidden 512, 8 layers, vocab 32000, NF4, LoRA r 64 on all linear
            layers, checkpointing, B 4 × T 256)
  dpo       bench/bench_dpo.py's packed step on that model (4 pairs of 128 + 128 tokens)
in one dtype (--dtype: the faster one on this machine; the run prints both matmul rates). "buys" is
(time without the path − time with every path on) / time without it: the share of the step the path saves.
A path stays only where it buys at least 10% of one of these times.

    python bench/bench_fast_paths.py [--rounds 3] [--steps 3] [--dtype fp32] [--workloads base,tiny_sft,...]
"""
import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # see bench_nf4.py: busy machine, many operators

import torch  # noqa: E402

from bench.bench_dpo import pair_rows  # noqa: E402
from bench.bench_sft_step import ALL_LINEAR, R, SMALL, batch, build_nf4_llama, build_ours  # noqa: E402
from bench.machine import describe  # noqa: E402
from cpu import KERNELS  # noqa: E402

PATHS = list(KERNELS)
WORKLOADS = ["base", "tiny_sft", "tiny_dpo", "decode", "sft", "dpo"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def tiny_config():
    """toy/base.py's default model: model/config.py's tiny preset at vocab 1024."""
    from model.config import PRESETS
    return replace(PRESETS["tiny"], vocab_size=1024)


def tiny_qlora(dtype):
    """The tiny base in NF4 with configs/tiny.toml's adapters: LoRA r 16, alpha 16, dropout 0.05 on q/k/v."""
    from lora import apply_lora
    model = build_nf4_llama(tiny_config(), dtype)
    torch.manual_seed(0)
    apply_lora(model, 16, 16.0, 0.05, targets=["q_proj", "k_proj", "v_proj"])
    return model.train()


def make_step(workload, dtype):
    """A function running one step of the workload (built once: its model, optimizer and batch)."""
    from losses import dpo_loss, sequence_logps_chunked, sft_loss
    from training import make_optimizer
    if workload == "base":
        from model.llama import Llama
        model = Llama(tiny_config())
        model.init_weights(seed=0)
        model.to(dtype=dtype).train()
        optimizer = make_optimizer(model.parameters(), 2e-3, 0.1, (0.9, 0.95), "cpu")
        ids, _ = batch(model.config, 32, 128)

        def step():
            loss = sft_loss(model(ids), labels=ids)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step
    if workload in ("tiny_sft", "sft"):
        model = tiny_qlora(dtype) if workload == "tiny_sft" else build_ours(SMALL, dtype, R, ALL_LINEAR)
        B, T = (16, 192) if workload == "tiny_sft" else (4, 256)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, 2e-3, 0.0, (0.9, 0.999), "cpu")
        ids, labels = batch(model.config, B, T)
        labels[:, :T // 3] = -100                          # the prompt's tokens are not targets

        def step():
            hidden = model.hidden_states(ids)                                  # [B, T, D]
            loss = -sequence_logps_chunked(hidden, model.lm_head.weight, labels).sum() / (labels != -100).sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step
    if workload in ("tiny_dpo", "dpo"):
        from lora import disable_adapters
        from train_dpo import collate, pair_logps
        model = tiny_qlora(dtype) if workload == "tiny_dpo" else build_ours(SMALL, dtype, R, ALL_LINEAR)
        rows = pair_rows(model.config.vocab_size)
        if workload == "tiny_dpo":                         # 16 pairs of 64 + 64 tokens
            rows = [{k: (v[:64] + v[128:192] if isinstance(v, list) else 64) for k, v in r.items()}
                    for r in rows * 4]
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, 1e-3, 0.0, (0.9, 0.999), "cpu")
        b = collate(rows, 0, True, "cpu")

        def step():
            chosen, rejected = pair_logps(model, b, 1024)
            with torch.no_grad(), disable_adapters(model):
                ref_chosen, ref_rejected = pair_logps(model, b, 1024)
            losses, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.5)
            losses.mean().backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step
    if workload == "decode":
        from model.llama import Llama
        from model.sampling import generate
        model = Llama(tiny_config())
        model.init_weights(seed=0)
        model.to(dtype=dtype).eval()
        g = torch.Generator().manual_seed(2)
        prompts = [torch.randint(3, 1024, (int(n),), generator=g).tolist()
                   for n in torch.randint(60, 100, (64,), generator=g)]

        def step():
            with torch.no_grad():
                generate(model, prompts, 64)               # no eos: every row runs all 64 tokens
        return step
    raise ValueError(f"unknown workload {workload!r}; expected one of {WORKLOADS}")


def timed(step, steps):
    """Median wall seconds of `steps` calls after one warm-up call."""
    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per case and round, after one warm-up")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    args = p.parse_args()
    paths, workloads = args.paths.split(","), args.workloads.split(",")
    print(describe(), flush=True)
    cases = {"all on": "1", "all off": "0", **{f"-{name}": f"-{name}" for name in paths}}
    med = {}
    for w in workloads:
        step = make_step(w, DTYPES[args.dtype])
        times = {c: [] for c in cases}
        for r in range(args.rounds):
            order = list(cases)[r % len(cases):] + list(cases)[:r % len(cases)]   # no case always first
            for case in order:
                os.environ["BEZOAR_C_KERNELS"] = cases[case]
                times[case].append(timed(step, args.steps))
            print(f"  round {r + 1} {w:8s} " + "  ".join(f"{c} {times[c][-1]:.3f}" for c in cases), flush=True)
        os.environ.pop("BEZOAR_C_KERNELS")
        med.update({(w, c): statistics.median(v) for c, v in times.items()})
        del step
    print(f"\n{args.dtype}, median s/step over {args.rounds} rounds of {args.steps} steps; "
          f"buys = (without − all on) / without")
    print("| case | " + " | ".join(workloads) + " |")
    print("|---|" + "---|" * len(workloads))
    for case in cases:
        cells = []
        for w in workloads:
            on, t = med[w, "all on"], med[w, case]
            cells.append(f"{t:.3f}" + ("" if case == "all on" else f" ({(t - on) / t:+.1%})"))
        print(f"| {case} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
