"""QLoRA SFT, the OpenBezoar way: LaMini → Orca → Evol-Instruct, each merged before the next, then HH-RLHF.

    for each stage (a [[stages]] table of the config, in order):
        start = the previous stage's merged checkpoint (the first stage: cfg.base)
        model = load_pretrained(start, quantize="nf4")        frozen 4-bit base (QLoRA), compute in cfg.dtype
        apply_lora(model, r=16, alpha=16, dropout=0.05, q/k/v) only lora_A and lora_B train
        loop:   micro-batches → loss → backward → all-reduce → clip → AdamW step → log, checkpoint
        save    <out_dir>/<stage>/adapter   PEFT format (adapter_config.json + adapter_model.safetensors)
                <out_dir>/<stage>/merged    Hugging Face format: W + B A · α/r, merged into the 16/32-bit W of
                                            `start` (not the NF4 copy), one tensor at a time; the next stage
                                            quantises it afresh

Loss. One optimizer step sees one global batch of cfg.batch_size examples, length-grouped (data/batching.py).
Its N response tokens (prompt and padding are -100) are split over ranks and micro-batches; each micro-batch
contributes −Σ log p(response tokens) / N, so the summed gradients are exactly those of the global mean
    L = −(1/N) Σ_{global batch} Σ_{t: response} log p(y_t | y_<t)        (losses.sft_loss's definition)
whatever the split: a mean of per-micro-batch means would weight short responses more. N is known to every
rank before the forward pass (all ranks hold the whole batch's indices), so no communication is needed for it.

Data parallel (torchrun --nproc_per_node=N; gloo on CPU, NCCL on GPU). The global batch is cut into
micro-batches of cfg.micro_batch_size; rank r takes micro-batches r·A … r·A + A − 1, A = accumulation steps =
batch_size / (micro_batch_size · world size). One process with A' = N·A takes the same micro-batches in the
same order, so both compute the same sums. After the micro-batches each trainable gradient is all-reduced
(SUM) by hand: the per-rank losses are already divided by the global N, so the sum is the gradient, and a
rank whose share of a short last batch is empty still joins the reduction (torch's DDP wrapper averages, and
needs every rank to run the same number of backward passes). The adapters hold a few MB, so one reduction
per step costs little.

Checkpoints and resume. Every cfg.save_every steps, and after the current step on SIGINT/SIGTERM,
<out_dir>/<stage>/checkpoint.pt is replaced atomically (training.save_resume_state): adapter weights,
optimizer state, step, every rank's RNG streams. The data position is the step itself: the batch order is
a pure function of (seed, epoch, lengths). `--resume` skips the finished stages (a stage is finished when
<stage>/merged exists: it is renamed into place complete), loads the unfinished one's checkpoint and
continues to exactly the result of an uninterrupted run (on CPU: bit for bit). Each stage seeds the RNG from
(seed, stage index) before creating its adapters, so it does not depend on what ran before it in this process.
A checkpoint also holds fingerprints of the stage's tokenized data and of its start checkpoint: a resume
with other data or another start stops with one line naming it (training.check_fingerprints), and the
metrics rows logged after the checkpoint are removed, as they are logged again (MetricsLogger.drop_after).
One run per out_dir: rank 0 holds <out_dir>/.lock throughout (files.lock_folder).

The embedded default (configs/tiny.toml; its stand-ins are toy/'s): a stage with toy_records > 0 whose data
file is missing writes it from the toy world first (toy.write_stage_data: JSONL in generate.py's schema;
HH-RLHF's .jsonl.gz format for hh_rlhf), then reads it like any other data. With eval_toy > 0 the base and
each stage's merged model answer that many held-out toy tasks (greedy; toy.record_eval); the exact-match
figures go to stdout and <out_dir>/eval_toy.json.

Shapes: B micro-batch, T tokens, D hidden, V vocab.
"""
import math
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.distributed as dist

import toy
from config import dump_config, load_config, run_cli
from data.batching import LengthGroupedSampler, collate_sft
from data.hh import hh_files, hh_sft_examples
from data.sft import sft_examples, tokenize_examples
from files import lock_folder, remove_stale_temp
from losses import IGNORE_INDEX, sequence_logps_chunked
from lora import apply_lora
from model import Tokenizer, check_vocab
from model.loading import load_pretrained
from training import (GracefulExit, MetricsLogger, Progress, all_reduce_grads, bare_resume, broadcast_params,
                      check_fingerprints, check_same_config, checkpoint_fingerprint, cleanup, compile_blocks,
                      data_fingerprint, is_main, load_resume_state, lr_at, make_optimizer, micro_batches,
                      nf4_notice, peak_memory_gb, restore_trainable, rng_state, save_adapter_and_merged,
                      save_resume_state, seed_everything, set_checkpointing, setup_distributed)

SCHEMES = ("lamini", "orca", "evol_instruct", "hh_rlhf")


@dataclass
class Stage:
    name: str = "lamini"                  # its folder under out_dir: checkpoint.pt, adapter/, merged/
    # lamini | orca | evol_instruct: JSONL read by data/sft.py (generate.py/filter.py output or a SurgeGlobal
    # export); hh_rlhf: HH-RLHF transcripts read by data/hh.py, the chosen side of each record
    scheme: Literal["lamini", "orca", "evol_instruct", "hh_rlhf"] = "lamini"
    data: list[str] = field(default_factory=list)  # files (.jsonl, .jsonl.gz); hh_rlhf also takes a folder
                                          # <root>/<subset>/train.jsonl.gz (download.py hh-rlhf)
    first_n: Optional[int] = None         # read only the first N records (paper, HH-RLHF: the first 100K)
    epochs: int = 1                       # passes over the data (paper: 1 per stage)
    max_steps: Optional[int] = None       # stop the stage after this many optimizer steps (none: all epochs)
    lr: Optional[float] = None            # this stage's peak learning rate; none = the global lr
    toy_records: int = 0                  # embedded default: if data[0] is missing, write this many
                                          # records of this scheme from the toy world there first (toy/)
    # storage dtype of merged/; none = that of the checkpoint the stage started from (released models:
    # OpenBezoar-SFT fp32, OpenBezoar-HH-RLHF-SFT fp16)
    merged_dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None

    # Allowed values, checked as the config is read (config.py): "(0, inf)" is > 0, "[0, 1)" is 0 ≤ x < 1.
    RANGES = {"first_n": "[1, inf)", "epochs": "[1, inf)", "max_steps": "[1, inf)", "lr": "(0, inf)",
              "toy_records": "[0, inf)"}

    def __post_init__(self):
        if not self.data:
            raise ValueError(f"stage {self.name!r}: data is empty, expected at least one file")


def openbezoar_stages():
    return [Stage("lamini", "lamini", ["runs/data/lamini.filtered.jsonl"]),
            Stage("orca", "orca", ["runs/data/orca.filtered.jsonl"]),
            Stage("evol_instruct", "evol_instruct", ["runs/data/evol.filtered.jsonl"]),
            Stage("hh_rlhf", "hh_rlhf", ["downloads/hh-rlhf"], first_n=100_000)]


@dataclass
class SFTConfig:
    """QLoRA SFT in stages (train_sft.py). Defaults: the OpenBezoar recipe (configs/openbezoar-3b.toml)."""
    base: str = "checkpoints/open_llama_3b_v2"  # Hugging Face folder the first stage starts from
    tokenizer: Optional[str] = None       # SentencePiece tokenizer.model; none = <base>/tokenizer.model
    out_dir: str = "runs/openbezoar-3b"   # stage folders, metrics.jsonl, config.toml, eval_toy.json
    stages: list[Stage] = field(default_factory=openbezoar_stages)  # run in order, merged in between
    resume: bool = False                  # continue the run in out_dir (a bare --resume means true)
    seed: int = 0
    device: Optional[str] = None          # cpu, cuda, cuda:1; none = cuda if available, else cpu
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # compute dtype (QLoRA: bf16)
    quantize: Literal["nf4", "none"] = "nf4"  # the frozen base: NF4 + double quantisation (QLoRA), or dense
    lora_r: int = 16                      # LoRA rank (paper, confirmed: 16)
    lora_alpha: float = 16.0              # LoRA scaling alpha / r (paper, confirmed: alpha 16)
    lora_dropout: float = 0.05            # dropout on the adapter's input (paper, confirmed: 0.05)
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])  # adapted
                                          # layers (paper, confirmed: q, k, v; no bias)
    # Optimisation: the paper does not state it; these are QLoRA's usual values.
    lr: float = 2e-4                      # peak learning rate (QLoRA: 2e-4 for 7B-13B models)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    warmup_ratio: float = 0.03            # warmup steps = ceil(ratio · stage steps)
    min_lr_ratio: float = 0.0             # the decay ends at min_lr_ratio · lr
    weight_decay: float = 0.0             # AdamW's decoupled weight decay (QLoRA: 0)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas (torch's and bitsandbytes' defaults)
    optimizer: Literal["adamw", "paged_adamw"] = "adamw"  # torch's fused AdamW (any device), or bitsandbytes'
                                          # PagedAdamW (CUDA): see training.make_optimizer for the choice
    compile: bool = False                 # CUDA: torch.compile each decoder block (fuses the torch code's
                                          # elementwise passes; `make gpu-check` measures it); ignored on the CPU
    max_grad_norm: float = 0.3            # clip the adapters' global gradient norm (QLoRA: 0.3); 0 = off
    batch_size: int = 16                  # examples per optimizer step, over all ranks (QLoRA: 16)
    micro_batch_size: int = 4             # examples per forward pass on one rank; the rest is accumulation
    max_len: int = 2048                   # tokens per example (OpenLLaMA's context); longer ones are cut
    min_prompt_len: int = 64              # a cut keeps at least this much prompt (data/sft.py)
    gradient_checkpointing: bool = True   # recompute each block in backward: activations of one block only
    checkpoint_blocks: Optional[int] = None  # with checkpointing: blocks recomputed, from the first (none =
                                          # all); the rest keep their activations: faster, more memory
    loss_chunk_size: int = 1024           # response positions per lm_head chunk in the loss (losses.py)
    # Bookkeeping: none of these changes the result.
    log_every: int = 10                   # steps between log lines (stdout and metrics.jsonl)
    save_every: int = 200                 # steps between checkpoints (also on SIGINT/SIGTERM); 0 = signals only
    eval_toy: int = 0                     # held-out toy tasks scored after each stage (0 = none)
    eval_max_new_tokens: int = 64         # generation budget per toy answer

    # Allowed values, checked as the config is read (config.py): "(0, inf)" is > 0, "[0, 1)" is 0 ≤ x < 1.
    RANGES = {"seed": "[0, inf)", "lora_r": "[1, inf)", "lora_alpha": "(0, inf)", "lora_dropout": "[0, 1)",
              "lr": "(0, inf)", "warmup_ratio": "[0, 1)", "min_lr_ratio": "[0, 1]", "weight_decay": "[0, inf)",
              "betas": "[0, 1)", "max_grad_norm": "[0, inf)", "batch_size": "[1, inf)",
              "micro_batch_size": "[1, inf)", "max_len": "[3, inf)", "min_prompt_len": "[2, inf)",
              "checkpoint_blocks": "[0, inf)", "loss_chunk_size": "[1, inf)", "log_every": "[1, inf)",
              "save_every": "[0, inf)", "eval_toy": "[0, inf)", "eval_max_new_tokens": "[1, inf)"}

    def __post_init__(self):
        names = [s.name for s in self.stages]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"stages: names {names} must be present and distinct (each is a folder)")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        if self.min_prompt_len >= self.max_len:
            raise ValueError(f"min_prompt_len {self.min_prompt_len} must be below max_len {self.max_len}")


# Fields that change nothing in the result: a resumed run may set them differently.
RUN_CONTROL = ("resume", "device", "log_every", "save_every", "eval_toy", "eval_max_new_tokens")


# --- data ----------------------------------------------------------------------------------------

def stage_examples(stage):
    """(examples, stats) of a stage: data/hh.py for hh_rlhf (a folder means its four train subsets),
    data/sft.py for the three instruction schemes."""
    if stage.scheme == "hh_rlhf":
        paths = [p for d in stage.data for p in (hh_files(d, "train") if os.path.isdir(d) else [d])]
        return hh_sft_examples(paths, first_n=stage.first_n)
    return sft_examples(stage.data, first_n=stage.first_n)


def response_tokens(row):
    """Tokens a row is scored on: labels after the shift (losses.shift_labels) that are not -100."""
    return sum(label != IGNORE_INDEX for label in row["labels"][1:])


# --- one stage ------------------------------------------------------------------------------------

def train_stage(cfg, i, stage, start, tok, rank, world_size, device, stop, logger):
    """Train one stage's adapters from checkpoint `start`; save adapter/ and merged/. False if stopped."""
    stage_dir = os.path.join(cfg.out_dir, stage.name)
    tag = f"[{stage.name}]"

    # --- data
    if stage.toy_records and is_main():
        toy.write_stage_data(stage, cfg.seed)           # the embedded default: the toy file, if missing
    if dist.is_initialized():
        dist.barrier()                                  # the toy file exists before any rank reads it
    examples, stats = stage_examples(stage)
    if cfg.eval_toy:                                    # the embedded default: no held-out task in training
        toy.check_heldout(examples, f"stage {stage.name}'s data ({', '.join(stage.data)})")
    rows, tok_stats = tokenize_examples(tok, examples, cfg.max_len, cfg.min_prompt_len)
    if is_main():
        print(f"{tag} {stats}\n{tag} {tok_stats}")
    if not rows:
        raise SystemExit(f"{tag} no usable examples in {', '.join(stage.data)}")
    sampler = LengthGroupedSampler([len(r["input_ids"]) for r in rows], cfg.batch_size, cfg.seed)
    total = len(sampler) * stage.epochs
    total = min(total, stage.max_steps) if stage.max_steps else total
    warmup = math.ceil(cfg.warmup_ratio * total)
    peak_lr = stage.lr if stage.lr is not None else cfg.lr

    # --- model: frozen (NF4) base + LoRA on q, k, v
    model = load_pretrained(start, dtype=cfg.dtype, device=device, quantize=None if cfg.quantize == "none" else "nf4")
    check_vocab(tok, model.config.vocab_size, os.path.join(start, "config.json"))
    seed_everything(cfg.seed * 1000 + i, deterministic=True)
    apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    broadcast_params(p for p in model.parameters() if p.requires_grad)   # rank 0's adapters on every rank
    compile_blocks(model, cfg.compile)
    torch.manual_seed(cfg.seed * 1000 + i + 7919 * (rank + 1))          # dropout masks: a stream per rank
    set_checkpointing(model, cfg.gradient_checkpointing, cfg.checkpoint_blocks)
    model.train()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}   # lora_A, lora_B
    optimizer = make_optimizer(list(params.values()), peak_lr, cfg.weight_decay, cfg.betas, device, cfg.optimizer)

    # What this stage trains on; a checkpoint made from other data or another start is not resumed.
    fingerprints = {"data": data_fingerprint(rows, ("input_ids", "labels")), "start": checkpoint_fingerprint(start)}
    start_step = 0
    ckpt = load_resume_state(stage_dir) if cfg.resume else None   # on the CPU (RNG states must be)
    if ckpt is not None:
        where = f"{stage_dir}/checkpoint.pt"
        check_fingerprints(ckpt, fingerprints, where, {"data": ", ".join(stage.data), "start": start})
        start_step = restore_trainable(ckpt, params, optimizer, where)
        if is_main():
            print(f"{tag} resuming at step {start_step} of {total}")
    dropped = logger.drop_after(start_step, stage=stage.name)     # logged after the checkpoint: logged again
    if dropped:
        print(f"{tag} {logger.path}: removed {dropped} line(s) logged after step {start_step}, which follow again")
    accum = cfg.batch_size // (cfg.micro_batch_size * world_size)
    if is_main():
        n_train = sum(p.numel() for p in params.values())
        print(f"{tag} {len(rows)} examples, {total} steps of {cfg.batch_size} ({world_size} rank(s) × "
              f"{accum} accumulation × {cfg.micro_batch_size}), warmup {warmup}, lr {peak_lr:g}, "
              f"{n_train / 1e6:.3f} M trainable parameters; from {start}")

    def checkpoint(step):
        rng = rng_state()                               # a collective under DDP: every rank calls it
        if is_main():
            save_resume_state(stage_dir, {"adapter": {n: p.detach() for n, p in params.items()},
                                          "optimizer": optimizer.state_dict(), "step": step, "rng": rng,
                                          "fingerprint": fingerprints})

    # --- loop
    progress, tokens = Progress(total, start_step), 0
    window, window_steps = torch.zeros((), device=device), 0   # the losses since the last log line, on the device
    batches, batches_epoch = None, None
    for step in range(start_step, total):
        epoch, k = divmod(step, len(sampler))
        if batches_epoch != epoch:
            batches, batches_epoch = sampler.batches(epoch), epoch
        batch = batches[k]                                                  # row indices, global batch
        n_tokens = sum(response_tokens(rows[j]) for j in batch)             # N of the global batch
        loss_sum = torch.zeros((), device=device)
        for micro in micro_batches(rows, batch, rank, world_size, cfg.micro_batch_size):
            b = collate_sft(micro, tok.pad_id)
            input_ids, labels = b["input_ids"].to(device), b["labels"].to(device)     # [B, T]
            # Right padding: causal attention alone keeps every real token from seeing the pads after it,
            # and positions 0, 1, … are right; an attention_mask would only force SDPA's unfused path.
            hidden = model.hidden_states(input_ids)                                    # [B, T, D]
            logps = sequence_logps_chunked(hidden, model.lm_head.weight, labels, cfg.loss_chunk_size)  # [B]
            loss = -logps.sum() / n_tokens              # this micro-batch's share of the global mean
            loss.backward()
            loss_sum += loss.detach()
        all_reduce_grads(params.values())               # sum of the shares = the global batch's gradient
        if dist.is_initialized():
            dist.all_reduce(loss_sum)
        grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()),
                                                   cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        lr = lr_at(step, total, warmup, peak_lr, cfg.schedule, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        window += loss_sum                              # read on the host at log lines only: no sync per step
        window_steps += 1
        tokens += sum(len(rows[j]["input_ids"]) for j in batch)
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            logger.log(stage=stage.name, step=step + 1, loss=window.item() / window_steps, lr=lr,
                       grad_norm=grad_norm.item(), **progress.update(step + 1, tokens),
                       peak_mem_gb=peak_memory_gb(device))
            window, window_steps, tokens = torch.zeros((), device=device), 0, 0
        stopping = stop.should_stop()
        if stopping or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            checkpoint(step + 1)
        if stopping:
            if is_main():
                print(f"{tag} stopped after step {step + 1}; continue with --resume")
            return False

    # --- save: the adapter (PEFT), then the merge into start's 16/32-bit weights (HF), renamed into place
    if is_main():
        n = save_adapter_and_merged(model, start, stage_dir, tok.path, dtype=stage.merged_dtype)
        print(f"{tag} saved {stage_dir}/adapter (PEFT) and {stage_dir}/merged ({n} weights merged)")
    if dist.is_initialized():
        dist.barrier()
    return True


# --- main -----------------------------------------------------------------------------------------

def main(argv=None):
    argv = bare_resume(sys.argv[1:] if argv is None else argv)     # a bare --resume means --resume true
    cfg = load_config(SFTConfig, argv, prog="train_sft.py")
    rank, world_size, _, device = setup_distributed(cfg.device)
    if cfg.optimizer == "paged_adamw" and device.type != "cuda":
        raise SystemExit(f'optimizer = "paged_adamw" pages states to CPU memory from a CUDA device; the device here '
                         f'is {device}: use optimizer = "adamw"')
    if cfg.batch_size % (cfg.micro_batch_size * world_size):
        raise SystemExit(f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size × world size "
                         f"= {cfg.micro_batch_size} × {world_size}")
    # One run per out_dir: rank 0 holds <out_dir>/.lock until the end; a second run stops here (files.py).
    with lock_folder(cfg.out_dir) if is_main() else nullcontext():
        train(cfg, rank, world_size, device)
    cleanup()


def train(cfg, rank, world_size, device):
    """The stages in order, each skipped if finished earlier (see the module docstring)."""
    notice = nf4_notice(cfg.quantize, device)          # before anything loads: the one line, then the run goes on
    if notice and is_main():
        print(notice)

    # --- the run folder: a fresh run refuses to overwrite one; --resume checks the config is the same
    if is_main():
        for stage in cfg.stages:                         # a merge killed half-way leaves its temp folder
            remove_stale_temp(os.path.join(cfg.out_dir, stage.name))
    saved = os.path.join(cfg.out_dir, "config.toml")
    started = [s.name for s in cfg.stages if os.path.exists(os.path.join(cfg.out_dir, s.name, "checkpoint.pt"))
               or os.path.isdir(os.path.join(cfg.out_dir, s.name, "merged"))]
    if started and not cfg.resume:
        raise SystemExit(f"{cfg.out_dir} already holds stage(s) {', '.join(started)}; pass --resume to "
                         f"continue that run, or choose another out_dir")
    if cfg.resume:
        check_same_config(SFTConfig, cfg, saved, RUN_CONTROL)
    seed_everything(cfg.seed, deterministic=True)
    tok = Tokenizer(cfg.tokenizer or os.path.join(cfg.base, "tokenizer.model"))
    if is_main():
        os.makedirs(cfg.out_dir, exist_ok=True)
        print(cfg)
        dump_config(cfg, saved)
    logger = MetricsLogger(os.path.join(cfg.out_dir, "metrics.jsonl"))

    start = cfg.base
    if cfg.eval_toy and is_main() and not os.path.isdir(os.path.join(cfg.out_dir, cfg.stages[0].name, "merged")):
        toy.record_eval(cfg, "base", start, tok, device)
    with GracefulExit(device) as stop:
        for i, stage in enumerate(cfg.stages):
            merged = os.path.join(cfg.out_dir, stage.name, "merged")
            if os.path.isdir(merged):
                if is_main():
                    print(f"[{stage.name}] finished earlier: {merged}")
            elif not train_stage(cfg, i, stage, start, tok, rank, world_size, device, stop, logger):
                break
            elif cfg.eval_toy and is_main():
                toy.record_eval(cfg, stage.name, merged, tok, device)
            start = merged
            if i + 1 < len(cfg.stages) and stop.should_stop():
                if is_main():
                    print(f"stopped after stage {stage.name}; continue with --resume")
                break
        else:
            if stop.requested and is_main():           # it came after the last save: nothing was cut short
                print(f"{stop.name}: all work was saved ({cfg.out_dir}); nothing to resume")
        logger.close()


if __name__ == "__main__":
    run_cli(main)
