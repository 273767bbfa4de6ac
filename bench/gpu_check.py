"""make gpu-check: bezoar on one GPU against the CPU and against its peers, in one command under 5 minutes.

    python bench/gpu_check.py            # the CPU half, then (with CUDA) the GPU half

It prints one line per figure:
  versions  torch, its CUDA, bitsandbytes, transformers, peft, trl; on a GPU its name, bf16 matmul rate, which
            fused SDPA kernels model.llama.attention reaches with OpenLLaMA's head dim of 100 (causal, and with
            a mask: packed rows), and whether Linear4bit dequantises with bitsandbytes there (lora.nf4's check)
  checks    "ok" or "FAIL", the measured max |difference| and its tolerance, on a small random LLaMA (CHECK:
            D 400 = 4 heads of 100 as in OpenLLaMA, MLP 448, 2 layers, V 1000) in NF4 with LoRA r 8 on all its
            linear layers, A and B random (B = 0 would leave A without gradients):
              NF4 codes     quantize_nf4 on CUDA = on the CPU, packed codes and fp32 block absmax bit for bit
                            (the model's 14 weights, a [2048, 1600] one of several CHUNKs, an odd [37, 29]);
                            the double-quantised statistics are reported, not checked (their offset is a mean,
                            reduced in another order on CUDA)
              bitsandbytes  its dequantize_4bit on CUDA of our NF4Tensor = our dequantize() on the CPU, fp32 and
                            bf16, bit for bit
              logits        fp32 forward, CUDA against CPU: |diff| <= 1e-4 (|logits| up to ~1.6; the CPU's C
                            kernels and its torch code differ by ~1e-6)
              chunked loss  sft_loss_chunked, CUDA against CPU, and against the plain sft_loss: <= 1e-5
              SFT gradients one SFT step as train_sft.py takes it (collate_sft rows with prompt labels -100, right
                            padding, checkpointing, LoRA dropout 0.05: its masks are a function of seeds drawn from
                            the CPU generator, so both devices drop the same elements), every lora_A / lora_B
                            gradient: |diff| <= 1e-4 x the largest gradient
  3B shape  OpenLLaMA 3B v2 (D 3200, 26 layers, 32 heads of 100, MLP 8640, V 32000) with random weights drawn on
            the GPU one tensor at a time and quantised there (NF4, blocks of 64, double quantisation; the dense
            model never exists), bf16 compute, LoRA r 16 alpha 16 dropout 0.05 on q, k, v, checkpointing. Each
            case runs in its own child process (bench/machine.run_child), so torch.cuda.max_memory_allocated is
            that case's: the peak from the first step on, the model included. 1 warm-up step, then 2 timed ones.
              SFT     micro-batch 4 x 2048 (labels: every position); ours: train_sft.py's step (hidden states,
                      sequence_logps_chunked, backward, clip, training.make_optimizer: torch's fused AdamW, the
                      configs' default; "ours-paged": bitsandbytes' PagedAdamW instead, the QLoRA paper's); peer:
                      transformers LlamaForCausalLM with bitsandbytes Linear4bit (nf4, compress_statistics, bf16
                      compute) and PEFT LoRA, gradient checkpointing, its own loss under bf16 autocast (as the
                      Trainer's bf16=True), the same clip and fused AdamW
              DPO     2 pairs, rows of 1024 tokens (a 512-token prompt, 512-token responses); ours: train_dpo.py's
                      step on packed rows [prompt, chosen, rejected] (data/dpo.py), the reference with adapters
                      disabled; peer: TRL's DPOTrainer with the same PEFT LoRA (reference = adapters disabled),
                      bf16, fused AdamW, timed by a TrainerCallback. The pairs/s of both count the same pairs.
              decode  greedy, batch 1, a 128-token prompt, 128 new tokens timed (t(129) - t(1): the prefill
                      cancels out); ours: model/sampling.generate; peer: transformers' generate on the PEFT model
              harness evals/harness.loglikelihoods, 16 items a batch, each a 2000-token context and 4 choices of 12
                      tokens packed into a row of 2044: peak memory (no peer, no goal)
            Checked there too (ok / FAIL): the first SFT loss of ours and the peer agree (<= 0.05: same weights, B = 0,
            bf16), the first DPO loss of both sides is ln 2 (<= 1e-2: policy = reference), the harness's scores are
            finite. (PagedAdamW's states live in CUDA managed memory, outside max_memory_allocated; they are 64 MB.)
Goals on the GPU (the issue): SFT step >= 1.5x the peer's tokens/s with peak memory <= 0.8x the peer's; DPO step
>= 2x TRL's pairs/s; decode >= 1.5x transformers' tokens/s. A final table reports each as PASS or FAIL.

Exit status: 0 when everything ran, goals met or not; 1 when a correctness check failed; 2 when a measured case
crashed. Without CUDA the script runs its CPU half only (the references the GPU half compares with, the checks
that need no GPU: bitsandbytes' CPU quantize_4bit and dequantize_4bit against ours, one tiny SFT step and one
tiny packed DPO step through the functions the GPU children use), says so in one line and exits 0, so CI keeps
the script working. `--device cpu --tiny` (hidden) runs the whole GPU half on the CPU at tiny shapes, peers and
TRL included: a dry run of its code, whose CPU-against-CPU checks are trivially equal.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from anywhere
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # see bench_nf4.py: busy machine, many operators

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from bench.bench_sft_step import is_layer_linear, random_tensors  # noqa: E402
from bench.machine import matmul_gflops, peak_rss_bytes, rss_bytes, run_child  # noqa: E402
from data.batching import collate_sft  # noqa: E402
from losses import (IGNORE_INDEX, dpo_loss, sequence_logps_chunked, sft_loss, sft_loss_chunked,  # noqa: E402
                    shift_labels)
from lora import Linear4bit, apply_lora, disable_adapters, quantize_nf4  # noqa: E402
from lora.nf4 import to_bnb_quant_state  # noqa: E402
from model.config import PRESETS, LlamaConfig  # noqa: E402
from model.llama import Llama  # noqa: E402
from training import compile_blocks, make_optimizer, set_checkpointing  # noqa: E402

QKV = ("q_proj", "k_proj", "v_proj")          # the recipe's LoRA targets
R, ALPHA, DROPOUT = 16, 16, 0.05
LR, BETA, MAX_GRAD_NORM = 2e-4, 0.1, 1.0
LOSS_CHUNK = 1024                             # train_sft.py's and train_dpo.py's loss_chunk_size
WARMUP, STEPS = 1, 2
GOALS = {"sft_speed": 1.5, "sft_memory": 0.8, "dpo_speed": 2.0, "decode_speed": 1.5}
GB = 1e9

# The correctness model: OpenLLaMA's head dim (100), 3.2 M parameters (the CPU half has ~30 s on 2 cores).
CHECK = LlamaConfig(vocab_size=1000, hidden_size=400, intermediate_size=448, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, torch_dtype="float32")
# Extra weights for the NF4 checks: one of 3.3 M values (quantize_nf4 takes CHUNKs of 1 M) with rows of 1600, and an
# odd one (a short last block, an odd count padded to a whole byte).
EXTRA_WEIGHTS = {"[2048, 1600]": (2048, 1600), "odd [37, 29]": (37, 29)}

# Shapes of the measured cases: (B, T) SFT; (pairs, prompt, response) DPO; (prompt, new tokens) decode;
# (items, context, choices, choice tokens) harness.
SHAPES = {
    "3b": {"config": PRESETS["openllama-3b-v2"], "sft": (4, 2048), "dpo": (2, 512, 512), "decode": (128, 128),
           "harness": (16, 2000, 4, 12)},
    "tiny": {"config": LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256),
             "sft": (2, 64), "dpo": (2, 32, 32), "decode": (16, 8), "harness": (4, 48, 4, 6)},
}


# --- small helpers ------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device) -> int:
    """Bytes in use now: CUDA tensors, or on the CPU the process's resident set."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak(device) -> int:
    """torch.cuda.max_memory_allocated since reset_peak; on the CPU the process's peak RSS (never reset)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()


def max_diff(a, b) -> float:
    """max |a - b| in fp64 (nan if they differ in shape or hold a nan)."""
    if a.shape != b.shape:
        return math.nan
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def check(failures, what, diff, tol, note="", measured="max |diff|"):
    """One line: ok when diff <= tol (a nan fails), FAIL otherwise (and the name joins failures)."""
    ok = diff <= tol
    print(f"{'ok' if ok else 'FAIL'}  {what}: {measured} {diff:.3g} (tolerance {tol:g}){note}", flush=True)
    if not ok:
        failures.append(what)


def versions() -> str:
    """From the installed packages' metadata: importing trl alone takes seconds."""
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:                       # trl is a test-only pin: the DPO peer needs it
            return "not installed"
    return (f"versions: torch {torch.__version__}, CUDA {torch.version.cuda} (available: {torch.cuda.is_available()}), "
            + ", ".join(f"{name} {v(name)}" for name in ("bitsandbytes", "transformers", "peft", "trl")))


# --- models ---------------------------------------------------------------------------------------------

def device_tensors(config, dtype, device, seed=0):
    """(name, tensor) in checkpoint order, drawn on `device` by a generator of its own, one at a time:
    N(0, 0.02²) weights, norms at 1 (bench_sft_step.random_tensors, without the trip from the CPU). Ours and the
    peer draw the same tensors from the same seed."""
    from model.loading import parameter_shapes
    g = torch.Generator(device=device).manual_seed(seed)
    for name, shape in parameter_shapes(config).items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=dtype, device=device)
        else:
            yield name, torch.empty(shape, dtype=dtype, device=device).normal_(0, 0.02, generator=g)


def nf4_llama(config, dtype, tensors):
    """A frozen Llama built on the meta device, filled from (name, tensor) pairs as model/loading.py's
    load_pretrained(quantize="nf4") fills it: each layer projection a Linear4bit quantised where its tensor lies
    (compute in `dtype`), everything else a Parameter of the tensor itself."""
    with torch.device("meta"):
        model = Llama(config)
    for name, t in tensors:
        owner, _, leaf = name.rpartition(".")
        if is_layer_linear(name):
            parent, _, attr = owner.rpartition(".")
            setattr(model.get_submodule(parent), attr, Linear4bit(t, compute_dtype=dtype))
        else:
            setattr(model.get_submodule(owner), leaf, nn.Parameter(t, requires_grad=False))
        del t                                             # the dense copy of a projection goes now
    return model


def build_ours(config, device, targets=QKV):
    """The 3B-shape policy: NF4 base (random weights made on `device`), bf16 compute, LoRA r 16 on `targets`,
    activation checkpointing, train mode."""
    model = nf4_llama(config, torch.bfloat16, device_tensors(config, torch.bfloat16, device))
    torch.manual_seed(0)
    apply_lora(model, R, ALPHA, DROPOUT, targets=list(targets))
    set_checkpointing(model, True)
    return model.train()


def hf_config(config, use_cache):
    import transformers
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, max_position_embeddings=config.max_position_embeddings,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        tie_word_embeddings=False, attn_implementation="sdpa", use_cache=use_cache)


def build_peer(config, device, training):
    """transformers' LlamaForCausalLM on the same random weights (device_tensors, same seed), each projection a
    bitsandbytes Linear4bit (nf4, blocks of 64, compress_statistics, bf16 compute) quantised on `device` by
    bitsandbytes; no adapters yet. training: gradient checkpointing on (non-reentrant, as ours), no KV cache."""
    import warnings

    import bitsandbytes as bnb
    import transformers
    transformers.logging.set_verbosity_error()
    # transformers 5 renames gradient_checkpointing* to activation_checkpointing*; TRL still uses the old names.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    cfg = hf_config(config, use_cache=not training)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    for name, t in device_tensors(config, torch.bfloat16, device):
        owner, _, leaf = name.rpartition(".")
        if is_layer_linear(name):
            parent, _, attr = owner.rpartition(".")
            layer = bnb.nn.Linear4bit(t.shape[1], t.shape[0], bias=False, compute_dtype=torch.bfloat16,
                                      quant_type="nf4", compress_statistics=True, device="meta")
            layer.weight = bnb.nn.Params4bit(t, requires_grad=False, quant_type="nf4", blocksize=64,
                                             compress_statistics=True)._quantize(device)
            setattr(model.get_submodule(parent), attr, layer)
        else:
            setattr(model.get_submodule(owner), leaf, nn.Parameter(t, requires_grad=False))
        del t
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg).to(device)   # its buffers, off the meta device
    if training:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(training)


def peer_lora_config():
    from peft import LoraConfig
    return LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=list(QKV), task_type="CAUSAL_LM")


def with_peft(model):
    from peft import get_peft_model
    torch.manual_seed(0)
    return get_peft_model(model, peer_lora_config())


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# --- data -----------------------------------------------------------------------------------------------

def ids(vocab_size, n, g):
    """n random token ids in 3 … V−1 (not pad, BOS or EOS), from a CPU generator."""
    return torch.randint(3, vocab_size, (n,), generator=g, device="cpu").tolist()


def sft_rows(vocab_size, B, T, seed=1):
    """B rows of T random tokens, labels on every position (collate_sft's input)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows = []
    for _ in range(B):
        row = [1] + ids(vocab_size, T - 1, g)
        rows.append({"input_ids": row, "labels": row})
    return rows


def pair_rows(vocab_size, pairs, prompt, response, seed=1):
    """Pairs in data/batching.tokenize_pair's format (bench_dpo.pair_rows at other shapes): [BOS] + random
    prompt, random responses ending in EOS, labels −100 on the prompt."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows = []
    for _ in range(pairs):
        p = [1] + ids(vocab_size, prompt - 1, g)
        row = {"prompt_len": prompt}
        for side in ("chosen", "rejected"):
            r = ids(vocab_size, response - 1, g) + [2]
            row[f"{side}_input_ids"] = p + r
            row[f"{side}_labels"] = [IGNORE_INDEX] * prompt + r
        rows.append(row)
    return rows


def harness_groups(vocab_size, items, context, choices, length, seed=1):
    """items × [(context ids, continuation ids) per choice]: one random context (BOS first) per item."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [[(c, ids(vocab_size, length, g)) for _ in range(choices)]
            for c in ([1] + ids(vocab_size, context - 1, g) for _ in range(items))]


# --- the steps (ours) -------------------------------------------------------------------------------------

def sft_loss_ours(model, batch, chunk):
    """train_sft.py's loss: −Σ response log-probs / N, from hidden states (no mask: right padding)."""
    hidden = model.hidden_states(batch["input_ids"])                                   # [B, T, D]
    logps = sequence_logps_chunked(hidden, model.lm_head.weight, batch["labels"], chunk)   # [B]
    return -logps.sum() / (shift_labels(batch["labels"]) != IGNORE_INDEX).sum()


def optimizer_step(params, optimizer):
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def dpo_step_ours(model, batch, params, optimizer):
    """train_dpo.py's loop body for one micro-batch that is the whole batch: policy, reference (adapters off,
    no gradients), DPO's sigmoid loss, backward, clip, step. Returns the mean loss."""
    from train_dpo import pair_logps
    policy = pair_logps(model, batch, LOSS_CHUNK)                                    # ([B], [B])
    with torch.no_grad(), disable_adapters(model):
        ref = pair_logps(model, batch, LOSS_CHUNK)
    losses, _, _ = dpo_loss(*policy, *ref, BETA)                                     # [B]
    (losses.sum() / losses.shape[0]).backward()
    optimizer_step(params, optimizer)
    return losses.detach().mean()


def timed_steps(step, device, warmup=WARMUP, steps=STEPS):
    """Run warmup + steps calls of step() (each returns a loss tensor); times of the timed ones, the first loss,
    memory in use before the first step and the peak from there on."""
    model_bytes = allocated(device)
    reset_peak(device)
    times, losses = [], []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return {"times": times, "first_loss": losses[0], "losses": losses, "model_bytes": model_bytes,
            "peak_bytes": peak(device)}


# --- the measured cases: each runs in a child process ---------------------------------------------------

def child_sft(side, device, shapes, warmup=WARMUP, steps=STEPS):
    """side: ours (the configs' optimizer, torch's fused AdamW), ours-paged (bitsandbytes' PagedAdamW, the QLoRA
    paper's), ours-compile (each block under torch.compile: the configs' compile = true; its warm-up step
    compiles), peer (torch's fused AdamW, as ours: the same step)."""
    config, (B, T) = shapes["config"], shapes["sft"]
    batch = {k: v.to(device) for k, v in collate_sft(sft_rows(config.vocab_size, B, T), config.pad_token_id).items()}
    if side.startswith("ours"):
        model = build_ours(config, device)
        compile_blocks(model, side == "ours-compile")                           # the configs' compile = true
        loss_fn = lambda: sft_loss_ours(model, batch, LOSS_CHUNK)                # noqa: E731
    else:
        model = with_peft(build_peer(config, device, training=True)).train()

        def loss_fn():
            # Under bf16 autocast, as the Trainer's bf16=True runs a QLoRA SFT (and TRL's peer below): PEFT's fp32
            # adapters then compute in bf16, as ours do.
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    params = trainable(model)
    name = "paged_adamw" if side == "ours-paged" else "adamw"
    optimizer = make_optimizer(params, LR, 0.0, (0.9, 0.999), device, name)

    def step():
        loss = loss_fn()
        loss.backward()
        optimizer_step(params, optimizer)
        return loss.detach()
    result = timed_steps(step, device, warmup, steps)
    result["tokens"] = B * T
    result["grad_free"] = all(p.grad is None for p in params)          # zero_grad(set_to_none) ran
    return result


def child_dpo(side, device, shapes, warmup=WARMUP, steps=STEPS):
    from train_dpo import collate
    config, (pairs, P, Rn) = shapes["config"], shapes["dpo"]
    rows = pair_rows(config.vocab_size, pairs, P, Rn)
    if side == "trl":
        result = trl_steps(config, device, rows, P + Rn, warmup, steps)
    else:
        model = build_ours(config, device)
        batch = collate(rows, config.pad_token_id, True, device)            # packed: [pairs, P + 2R]
        params = trainable(model)
        optimizer = make_optimizer(params, LR, 0.0, (0.9, 0.999), device)
        result = timed_steps(lambda: dpo_step_ours(model, batch, params, optimizer), device, warmup, steps)
        result["batch_shape"] = list(batch["input_ids"].shape)
    result["pairs"] = pairs
    result["tokens"] = 2 * pairs * (P + Rn)                                  # the pairs' rows, unpacked
    return result


def trl_steps(config, device, rows, max_length, warmup, steps):
    """TRL's DPOTrainer on the peer model, its step timed from on_step_begin to on_step_end (collation,
    policy, reference, loss, backward, clip, optimizer step); the text is bench_dpo's word-level tokens, so TRL
    tokenises it back into exactly our ids."""
    import datasets
    import transformers
    from trl import DPOConfig, DPOTrainer
    from bench.bench_dpo import word_tokenizer
    datasets.disable_progress_bars()
    model = build_peer(config, device, training=True)
    tok = word_tokenizer(config.vocab_size)
    text = lambda ids: " ".join(tok.convert_ids_to_tokens(ids))              # noqa: E731
    P = rows[0]["prompt_len"]
    data = datasets.Dataset.from_list([
        {"prompt": text(r["chosen_input_ids"][:P]) + " ", "chosen": text(r["chosen_input_ids"][P:]),
         "rejected": text(r["rejected_input_ids"][P:])} for r in rows])
    cuda = device.type == "cuda"
    out_dir = tempfile.TemporaryDirectory(prefix="gpu_check_trl_")      # nothing is saved there (save_strategy no)
    args = DPOConfig(output_dir=out_dir.name, per_device_train_batch_size=len(rows),
                     max_steps=warmup + steps, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
                     max_grad_norm=MAX_GRAD_NORM, beta=BETA, max_length=max_length, gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": False}, disable_dropout=False, bf16=True,
                     fp16=False, use_cpu=not cuda, optim="adamw_torch_fused",            # make_optimizer's default
                     report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                     dataloader_num_workers=0, seed=0)
    times, starts, memory = [], [], {}

    class StepTimer(transformers.TrainerCallback):
        def on_train_begin(self, *a, **k):
            memory["model_bytes"] = allocated(device)
            reset_peak(device)

        def on_step_begin(self, *a, **k):
            sync(device)
            starts.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            sync(device)
            times.append(time.perf_counter() - starts[-1])

    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         peft_config=peer_lora_config(), callbacks=[StepTimer()])
    shape = list(next(iter(trainer.get_train_dataloader()))["input_ids"].shape)
    trainer.train()
    out_dir.cleanup()
    losses = [float(log["loss"]) for log in trainer.state.log_history if "loss" in log]
    return {"times": times[warmup:], "first_loss": losses[0], "losses": losses, "peak_bytes": peak(device),
            "batch_shape": shape, **memory}


def child_decode(side, device, shapes):
    from model.sampling import generate
    config, (P, N) = shapes["config"], shapes["decode"]
    prompt = [config.bos_token_id] + ids(config.vocab_size, P - 1, torch.Generator(device="cpu").manual_seed(1))
    if side == "ours":
        model = build_ours(config, device).eval()

        def run(n):
            return generate(model, [prompt], n)[0].tokens
    else:
        model = with_peft(build_peer(config, device, training=False)).eval()
        prompt_ids = torch.tensor([prompt], dtype=torch.long, device=device)   # [1, P]

        def run(n):
            with torch.no_grad():
                out = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                     max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     pad_token_id=config.pad_token_id)
            return out[0, P:].tolist()

    def timed(n):
        sync(device)
        t0 = time.perf_counter()
        tokens = run(n)
        sync(device)
        return tokens, time.perf_counter() - t0
    model_bytes = allocated(device)
    run(2)                                                                  # warm-up: kernels, allocator
    reset_peak(device)
    _, t1 = timed(1)                                                        # prefill + one token
    tokens, t2 = timed(N + 1)                                               # … + N decoding steps
    return {"tokens_s": N / (t2 - t1), "prefill_s": t1, "tokens": tokens, "model_bytes": model_bytes,
            "peak_bytes": peak(device), "new_tokens": N}


def child_harness(side, device, shapes):
    from evals.harness import loglikelihoods
    config, (items, C, K, L) = shapes["config"], shapes["harness"]
    groups = harness_groups(config.vocab_size, items, C, K, L)
    model = build_ours(config, device).eval()
    model_bytes = allocated(device)
    loglikelihoods(model, harness_groups(config.vocab_size, 1, 16, 2, 2, seed=2), batch_size=items, progress=False)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    scores, _ = loglikelihoods(model, groups, batch_size=items, progress=False)
    sync(device)
    seconds = time.perf_counter() - t0
    non_finite = sum(not math.isfinite(ll) for item in scores for ll, _ in item)
    return {"requests_s": items * K / seconds, "seconds": seconds, "model_bytes": model_bytes,
            "peak_bytes": peak(device), "row_tokens": C + K * (L - 1), "non_finite": non_finite}


CHILDREN = {"sft": child_sft, "dpo": child_dpo, "decode": child_decode, "harness": child_harness}
CASES = (("sft", "ours"), ("sft", "ours-paged"), ("sft", "ours-compile"), ("sft", "peer"), ("dpo", "ours"), ("dpo", "trl"), ("decode", "ours"),
         ("decode", "peer"), ("harness", "ours"))


# --- the CPU references and the device comparison -----------------------------------------------------------

def check_weights(dense):
    """{name: fp32 weight} for the code checks: the CHECK model's projections and EXTRA_WEIGHTS."""
    weights = {name: t for name, t in dense.items() if is_layer_linear(name)}
    g = torch.Generator(device="cpu").manual_seed(5)
    for name, shape in EXTRA_WEIGHTS.items():
        weights[name] = torch.randn(shape, generator=g, device="cpu") * 0.02
    return weights


def small_model(dense, device):
    """The CHECK model, quantised on the CPU, LoRA r 8 on all its linear layers with random A and B drawn on the
    CPU, then moved to `device`: both devices compute with the very same codes and adapters."""
    model = nf4_llama(CHECK, torch.float32, dense.items())
    apply_lora(model, 8, ALPHA, DROPOUT, targets="all-linear")
    g = torch.Generator(device="cpu").manual_seed(2)
    with torch.no_grad():
        for p in trainable(model):
            p.copy_(torch.randn(p.shape, generator=g, device="cpu") * 0.02)
    return model.to(device)


def check_batch():
    """Two rows of 24 and 17 tokens, prompt labels −100 on the first 5, right-padded by collate_sft."""
    g = torch.Generator(device="cpu").manual_seed(3)
    rows = []
    for n in (24, 17):
        row = [1] + ids(CHECK.vocab_size, n - 1, g)
        rows.append({"input_ids": row, "labels": [IGNORE_INDEX] * 5 + row[5:]})
    return collate_sft(rows, CHECK.pad_token_id)


def model_results(dense, device):
    """On `device`: fp32 logits, the chunked and plain losses (eval), then one SFT step's loss and every adapter
    gradient (train: dropout, checkpointing); all returned on the CPU."""
    model = small_model(dense, device).eval()
    batch = {k: v.to(device) for k, v in check_batch().items()}
    with torch.no_grad():
        logits = model(batch["input_ids"])                                              # [B, T, V]
        hidden = model.hidden_states(batch["input_ids"])                                # [B, T, D]
        chunked = sft_loss_chunked(hidden, model.lm_head.weight, batch["labels"], chunk_size=16)
        plain = sft_loss(logits, batch["labels"])
    set_checkpointing(model, True)
    model.train()
    torch.manual_seed(1)                  # the dropout seeds: drawn from the CPU generator on every device
    loss = sft_loss_ours(model, batch, chunk=16)
    loss.backward()
    grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad}
    return {"logits": logits.cpu(), "chunked": chunked.cpu(), "plain": plain.cpu(), "train_loss": loss.detach().cpu(),
            "grads": grads}


def references():
    """Everything the device comparison needs, computed on the CPU."""
    dense = dict(random_tensors(CHECK, torch.float32))                 # CPU generator: the same on every machine
    weights = check_weights(dense)
    nf4 = {name: quantize_nf4(w) for name, w in weights.items()}      # the recipe's storage: double quantisation
    return {"dense": dense, "weights": weights, "nf4": nf4,
            "nf4_single": {name: quantize_nf4(w, double_quant=False) for name, w in weights.items()},
            "dequant": {(name, dt): q.dequantize(dt) for name, q in nf4.items()
                        for dt in (torch.float32, torch.bfloat16)},
            "model": model_results(dense, torch.device("cpu"))}


def check_bnb_dequantize(refs, device, failures):
    """bitsandbytes.functional.dequantize_4bit on `device` of our NF4Tensors = our dequantize() on the CPU. On the
    CPU only weights whose rows are whole blocks: bitsandbytes' CPU kernel takes the wrong absmax for the others
    (bench_sft_step.py's docstring); its CUDA kernel reads the values as one flat run, as we do."""
    import bitsandbytes.functional as bnbF
    names = [name for name, w in refs["weights"].items() if device.type != "cpu" or w.shape[1] % 64 == 0]
    worst = 0.0
    for name in names:
        q = refs["nf4"][name].to(device)
        for dt in (torch.float32, torch.bfloat16):
            theirs = bnbF.dequantize_4bit(q.packed, to_bnb_quant_state(q, dt)).cpu()
            worst = max(worst, max_diff(theirs, refs["dequant"][name, dt]))
    check(failures, f"bitsandbytes dequantize_4bit on {device} == NF4Tensor.dequantize on cpu ({len(names)} "
          f"weights, fp32 and bf16, double quantisation)", worst, 0.0)


def bnb_quantize_differences(refs, device):
    """bitsandbytes' quantize_4bit on `device` against quantize_nf4 on `device`: per field (packed codes, absmax
    codes, nested absmax, offset), (elements that differ, elements, max |diff|) over all the weights."""
    import bitsandbytes.functional as bnbF
    out = {k: [0, 0, 0.0] for k in ("packed", "absmax", "nested_absmax", "offset")}
    for w in refs["weights"].values():
        w = w.to(device)
        packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        ours = quantize_nf4(w)
        for k, a, b in (("packed", packed, ours.packed), ("absmax", state.absmax, ours.absmax),
                        ("nested_absmax", state.state2.absmax, ours.nested_absmax),
                        ("offset", torch.as_tensor(state.offset).reshape(()), ours.offset)):
            a, b = a.cpu().reshape(-1), b.cpu().reshape(-1)
            if a.shape != b.shape:
                out[k] = [math.nan, b.numel(), math.nan]
                continue
            out[k][0] += int((a != b).sum())
            out[k][1] += b.numel()
            out[k][2] = max(out[k][2], max_diff(a, b))
    return out


def compare_on(device, refs, failures):
    """The checks of the module docstring: `device` against the CPU references."""
    # NF4 codes: quantisation on the device.
    worst, dq = 0.0, {"offset": 0.0, "nested codes": 0, "codes": 0}
    for name, w in refs["weights"].items():
        w = w.to(device)
        single, ref = quantize_nf4(w, double_quant=False), refs["nf4_single"][name]
        worst = max(worst, max_diff(single.packed.cpu(), ref.packed), max_diff(single.absmax.cpu(), ref.absmax))
        double, ref = quantize_nf4(w), refs["nf4"][name]
        dq["offset"] = max(dq["offset"], abs(double.offset.item() - ref.offset.item()))
        dq["nested codes"] += int((double.absmax.cpu() != ref.absmax).sum())
        dq["codes"] += ref.absmax.numel()
    check(failures, f"quantize_nf4 on {device} == on cpu: packed codes and fp32 block absmax "
          f"({len(refs['weights'])} weights)", worst, 0.0)
    print(f"info  double quantisation on {device} against cpu: offset |diff| {dq['offset']:.3g}, "
          f"{dq['nested codes']} of {dq['codes']} 8-bit absmax codes differ (the offset is a mean)", flush=True)

    check_bnb_dequantize(refs, device, failures)
    d = bnb_quantize_differences(refs, device)
    print(f"info  bitsandbytes quantize_4bit on {device} against quantize_nf4 on {device}: " + ", ".join(
        f"{k} {n} of {total} differ" for k, (n, total, _) in d.items()), flush=True)

    ours, ref = model_results(refs["dense"], device), refs["model"]
    scale = ref["logits"].abs().max().item()
    check(failures, f"fp32 logits {list(ref['logits'].shape)}, {device} against cpu", max_diff(ours["logits"],
          ref["logits"]), 1e-4, f"; max |logit| {scale:.3g}")
    check(failures, f"sft_loss_chunked, {device} against cpu", max_diff(ours["chunked"], ref["chunked"]), 1e-5,
          f"; loss {ref['chunked'].item():.6f}")
    check(failures, f"sft_loss_chunked against sft_loss on {device}", max_diff(ours["chunked"], ours["plain"]), 1e-5)
    g_scale = max(g.abs().max().item() for g in ref["grads"].values())
    g_diff = max(max_diff(ours["grads"][n], g) for n, g in ref["grads"].items())
    check(failures, f"SFT step: {len(ref['grads'])} adapter gradients, {device} against cpu", g_diff,
          1e-4 * g_scale, f" (1e-4 x max |grad| {g_scale:.3g}); loss {ref['train_loss'].item():.6f} / "
          f"{ours['train_loss'].item():.6f}")


# --- the halves -----------------------------------------------------------------------------------------

def cpu_half(failures):
    """The references, the checks that need no GPU, and one tiny SFT and DPO step through the children's code."""
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    refs = references()
    m = refs["model"]
    print(f"cpu references ({time.perf_counter() - t0:.1f} s): CHECK model D {CHECK.hidden_size}, "
          f"{CHECK.num_attention_heads} heads of {CHECK.head_dim}, {CHECK.num_hidden_layers} layers, V "
          f"{CHECK.vocab_size}; {len(refs['weights'])} NF4 weights; logits {list(m['logits'].shape)}; chunked loss "
          f"{m['chunked'].item():.6f}; SFT step loss {m['train_loss'].item():.6f}, {len(m['grads'])} adapter "
          f"gradients", flush=True)
    check(failures, "sft_loss_chunked against sft_loss on cpu", max_diff(m["chunked"], m["plain"]), 1e-5)
    check_bnb_dequantize(refs, cpu, failures)
    d = bnb_quantize_differences(refs, cpu)
    n_diff = sum(n for n, _, _ in d.values())
    check(failures, "bitsandbytes quantize_4bit on cpu == quantize_nf4 (packed codes, absmax codes, nested absmax, "
          "offset)", max(diff for _, _, diff in d.values()), 0.0, f"; {n_diff} elements differ")

    tiny = SHAPES["tiny"]
    V = tiny["config"].vocab_size
    r = child_sft("ours", cpu, tiny, warmup=0, steps=1)
    sane = r["grad_free"] and all(math.isfinite(x) for x in r["losses"])
    check(failures, f"tiny SFT step on cpu ({r['tokens']} tokens, NF4 + LoRA, bf16): first loss against ln V "
          f"(random weights)", abs(r["first_loss"] - math.log(V)) if sane else math.nan, 0.5,
          f"; loss {r['first_loss']:.4f}, ln V {math.log(V):.4f}")
    r = child_dpo("ours", cpu, tiny, warmup=0, steps=1)
    check(failures, f"tiny packed DPO step on cpu ({r['pairs']} pairs, batch {r['batch_shape']}): first loss "
          f"against ln 2 (B = 0: policy = reference)", abs(r["first_loss"] - math.log(2)), 1e-2,
          f"; loss {r['first_loss']:.6f}")
    return refs


def sdpa_kernels(device) -> str:
    """Which fused SDPA kernels model/llama.attention reaches for bf16 heads of 100 (OpenLLaMA's), causal (no mask)
    and with a boolean mask (packed rows: DPO, the harness; it pads the head dim to 104 then): where none does,
    SDPA falls back to its math kernel, which materialises the [B, H, T, T] scores."""
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from model.llama import attention
    q = torch.randn(1, 4, 64, 100, dtype=torch.bfloat16, device=device)                  # [B, H, T, Dh]
    mask = torch.ones(64, 64, dtype=torch.bool, device=device).tril()[None, None]        # [1, 1, T, T]
    out = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        for what, m in (("causal", None), ("mask", mask)):
            try:
                with warnings.catch_warnings(), sdpa_kernel(backend):
                    warnings.simplefilter("ignore")                  # each refusal warns its reason first
                    attention(q, q, q, m)
                out.append(f"{backend.name.lower()} {what} yes")
            except RuntimeError:
                out.append(f"{backend.name.lower()} {what} no")
    return ", ".join(out)


def describe_case(task, side, r):
    ms = lambda ts: " ".join(f"{t:.3f}" for t in ts)                      # noqa: E731
    mem = f"peak {r['peak_bytes'] / GB:.2f} GB (model {r['model_bytes'] / GB:.2f} GB)"
    if task == "sft":
        return (f"sft {side:10}: {r['tokens'] / mean(r['times']):8.0f} tokens/s, step s {ms(r['times'])}, {mem}, "
                f"first loss {r['first_loss']:.4f}")
    if task == "dpo":
        return (f"dpo {side:4}: {r['pairs'] / mean(r['times']):8.2f} pairs/s ({r['tokens'] / mean(r['times']):.0f} "
                f"tokens/s of the unpacked rows), step s {ms(r['times'])}, {mem}, batch {r['batch_shape']}, first "
                f"loss {r['first_loss']:.6f} (ln 2 = {math.log(2):.6f})")
    if task == "decode":
        return (f"decode {side:4}: {r['tokens_s']:8.1f} tokens/s over {r['new_tokens']} new tokens, prefill + 1 "
                f"{r['prefill_s']:.3f} s, {mem}")
    return (f"harness {side}: {r['requests_s']:.1f} requests/s ({r['seconds']:.2f} s), rows of {r['row_tokens']} "
            f"tokens, {mem}, {r['non_finite']} non-finite scores")


def mean(xs):
    return sum(xs) / len(xs)


def rate(task, r):
    """The figure the goals compare: SFT tokens/s, DPO pairs/s, decode tokens/s."""
    return {"sft": lambda: r["tokens"] / mean(r["times"]), "dpo": lambda: r["pairs"] / mean(r["times"]),
            "decode": lambda: r["tokens_s"]}[task]()


def summary(results):
    """The goals table: each ratio against its goal, PASS or FAIL (or not run)."""
    def get(task, side, key):
        r = results.get((task, side))
        return None if r is None else rate(task, r) if key == "rate" else r[key]
    rows = [("SFT step tokens/s, ours / peer", get("sft", "ours", "rate"), get("sft", "peer", "rate"), ">=",
             GOALS["sft_speed"]),
            ("SFT step peak memory, ours / peer", get("sft", "ours", "peak_bytes"), get("sft", "peer", "peak_bytes"),
             "<=", GOALS["sft_memory"]),
            ("DPO step pairs/s, ours / TRL", get("dpo", "ours", "rate"), get("dpo", "trl", "rate"), ">=",
             GOALS["dpo_speed"]),
            ("greedy decode tokens/s, ours / transformers", get("decode", "ours", "rate"),
             get("decode", "peer", "rate"), ">=", GOALS["decode_speed"])]
    print(f"\n{'goal':45} {'ours':>12} {'peer':>12} {'ratio':>7} {'target':>8}  result")
    for name, ours, peer, op, target in rows:
        if ours is None or peer is None:
            print(f"{name:45} {'-':>12} {'-':>12} {'-':>7} {op + ' ' + str(target):>8}  not run")
            continue
        ratio = ours / peer
        met = ratio >= target if op == ">=" else ratio <= target
        fmt = (lambda v: f"{v / GB:.2f} GB") if "memory" in name else (lambda v: f"{v:.1f}")
        print(f"{name:45} {fmt(ours):>12} {fmt(peer):>12} {ratio:6.2f}x {op + ' ' + str(target):>8}  "
              f"{'PASS' if met else 'FAIL'}")
    # The configs' choices, measured: compile = false/true and optimizer = "adamw"/"paged_adamw".
    for name, side in (("SFT step tokens/s, compile = true / false", "ours-compile"),
                       ("SFT step tokens/s, paged_adamw / adamw", "ours-paged")):
        other, base = get("sft", side, "rate"), get("sft", "ours", "rate")
        if other is not None and base is not None:
            print(f"{name:45} {other:12.1f} {base:12.1f} {other / base:6.2f}x   (peak "
                  f"{get('sft', side, 'peak_bytes') / GB:.2f} vs {get('sft', 'ours', 'peak_bytes') / GB:.2f} GB)")


def sanity_checks(results, failures):
    """What the measured cases must agree on: with B = 0 ours and the peer compute the base model's SFT loss on the
    same weights (their double-quantised statistics may differ a little, and bf16 sums in other orders), and
    the first DPO loss is ln 2 (policy = reference); the harness's scores are finite."""
    sft, peer = results.get(("sft", "ours")), results.get(("sft", "peer"))
    if sft and peer:
        check(failures, "first SFT loss, ours against the peer (same weights, bf16)",
              abs(sft["first_loss"] - peer["first_loss"]), 0.05,
              f"; {sft['first_loss']:.4f} / {peer['first_loss']:.4f}")
    for side in ("ours", "trl"):
        r = results.get(("dpo", side))
        if r:
            check(failures, f"first DPO loss, {side} against ln 2 (B = 0)", abs(r["first_loss"] - math.log(2)), 1e-2)
    h = results.get(("harness", "ours"))
    if h:
        check(failures, "harness scores", h["non_finite"], 0, measured="non-finite")


def gpu_half(device, tiny, refs, failures):
    """The device comparison, then every measured case in its own child process. Returns False if a case crashed."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("highest")      # fp32 checks: no TF32 in the products
        print(f"device: {torch.cuda.get_device_name(device)}, bf16 matmul "
              f"{matmul_gflops(torch.bfloat16, 8192, device=device, seconds=0.5) / 1e3:.0f} TFLOP/s", flush=True)
        print(f"info  SDPA kernels model.llama.attention reaches, bf16 heads of 100: {sdpa_kernels(device)}",
              flush=True)
        from lora.nf4 import bitsandbytes_cuda_problem
        problem = bitsandbytes_cuda_problem(device) or "none (Linear4bit dequantises with bitsandbytes)"
        print(f"info  lora.nf4.bitsandbytes_cuda_problem: {problem}", flush=True)
    compare_on(device, refs, failures)

    shapes = SHAPES["tiny" if tiny else "3b"]
    c = shapes["config"]
    print(f"\n{'tiny' if tiny else 'OpenLLaMA 3B v2'} shape: D {c.hidden_size}, {c.num_hidden_layers} layers, "
          f"{c.num_attention_heads} heads of {c.head_dim}, MLP {c.intermediate_size}, V {c.vocab_size}; NF4, bf16, "
          f"LoRA r {R} on {', '.join(QKV)}, checkpointing; {WARMUP} warm-up + {STEPS} timed steps; SFT "
          f"{shapes['sft'][0]} x {shapes['sft'][1]}, DPO {shapes['dpo'][0]} pairs x {sum(shapes['dpo'][1:])}, decode "
          f"{shapes['decode'][0]} + {shapes['decode'][1]}, harness {shapes['harness'][0]} items", flush=True)
    flags = ["--device", str(device)] + (["--tiny"] if tiny else [])
    results, crashed = {}, False
    for task, side in CASES:
        try:
            results[task, side] = r = run_child(__file__, task, side, *flags)
            print(describe_case(task, side, r), flush=True)
        except SystemExit as e:                             # run_json: the child's exit status (its stderr shown)
            print(f"FAIL  {task} {side}: the child process failed ({e})", flush=True)
            crashed = True
    sanity_checks(results, failures)
    d_ours, d_peer = results.get(("decode", "ours")), results.get(("decode", "peer"))
    if d_ours and d_peer:
        same = next((i for i, (a, b) in enumerate(zip(d_ours["tokens"], d_peer["tokens"])) if a != b),
                    len(d_ours["tokens"]))
        print(f"info  decode: the first {same} of {len(d_ours['tokens'])} greedy tokens agree (bf16, random weights: "
              f"nearly flat logits, a near-tie can flip)")
    summary(results)
    return not crashed


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)     # cpu: a dry run of the GPU half
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the measured cases at tiny shapes
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        task, side = args.child
        device = torch.device(args.device or "cuda")
        print(json.dumps(CHILDREN[task](side, device, SHAPES["tiny" if args.tiny else "3b"])))
        return 0

    t0 = time.perf_counter()
    print(versions(), flush=True)
    failures = []
    refs = cpu_half(failures)
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        print(f"gpu-check: no CUDA device here; ran the CPU half only ({time.perf_counter() - t0:.0f} s)")
        return 1 if failures else 0
    ran = gpu_half(torch.device(device), args.tiny, refs, failures)
    print(f"\ngpu-check: {time.perf_counter() - t0:.0f} s in all (goal: under 300 s on one GPU); "
          + (f"{len(failures)} correctness check(s) FAILED: {'; '.join(failures)}" if failures
             else "every correctness check ok") + ("" if ran else "; a measured case crashed"))
    return 1 if failures else 0 if ran else 2


if __name__ == "__main__":
    sys.exit(main())
