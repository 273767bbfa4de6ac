"""DPO (Rafailov et al. 2023) with QLoRA on HH-RLHF preference pairs: the last step of the OpenBezoar recipe.

    start     = cfg.base, the merged HH-RLHF SFT checkpoint (train_sft.py's last stage)
    policy    = load_pretrained(start, quantize="nf4") + a fresh LoRA    frozen 4-bit base; only A, B train
    reference = the same model inside `with disable_adapters(model):`    no second copy of the weights
                (precompute_ref_logps: its log-probs computed once before training and cached in
                <out_dir>/ref_logps.pt, so the loop runs the policy only)
    loop:  B pairs → one forward over chosen and rejected (each pair one row [prompt, chosen, rejected], the
           prompt computed once: data/dpo.py) → summed response log-probs → the same batch through the
           reference under no_grad → dpo_loss → backward → all-reduce → clip → AdamW step → log;
           held-out evaluation every eval_every steps; atomic checkpoints
    save   <out_dir>/adapter   PEFT format
           <out_dir>/merged    Hugging Face format: start's 16/32-bit W + B A · α/r (not the NF4 copy)

Loss. One optimizer step sees a global batch of N = cfg.batch_size pairs (fewer in an epoch's last batch);
    L = (1/N) Σ_pairs −log σ(β·h),   h = [log πθ(y_w|x) − log π_ref(y_w|x)] − [log πθ(y_l|x) − log π_ref(y_l|x)]
(losses.dpo_loss, eq. 7; cDPO and IPO by label_smoothing / ipo). Each log π(y|x) is a sum over the response
tokens (losses.sequence_logps_chunked). A micro-batch contributes Σ its pairs' losses / N, so the summed
gradients are those of the global mean however the batch is split over micro-batches and ranks.
rpo_alpha = α > 0 adds RPO's term to each pair's loss (Pang et al. 2024): α · (−log πθ(y_w|x) / |y_w|), the
chosen response's mean token NLL. DPO alone often lowers log πθ(y_w|x) too (only the margin counts); a small
model then answers worse even as its reward accuracy rises, which the toy default shows (configs/dpo-tiny.toml).

Metrics, per optimizer step (TRL's names), each a mean over the step's pairs:
    rewards/chosen      β (log πθ(y_w|x) − log π_ref(y_w|x))       the implicit reward of the chosen response
    rewards/rejected    β (log πθ(y_l|x) − log π_ref(y_l|x))
    rewards/accuracies  fraction of pairs with rewards/chosen > rewards/rejected (0 at step 0: equal rewards)
    rewards/margins     rewards/chosen − rewards/rejected
    logps/chosen, logps/rejected   log πθ of the responses (summed over their tokens)
plus loss, lr, grad_norm, tok/s, elapsed, eta and peak_mem_gb as in train_sft.py. The same names prefixed
with eval/ are the held-out pairs' means, computed in eval mode (no dropout) every eval_every steps and at
the end. A record goes to stdout and <out_dir>/metrics.jsonl.

Data (data/hh.py hh_pairs, data/batching.py tokenize_pair): each HH-RLHF record's two transcripts are split at
their last "\\n\\nAssistant:" into the shared prompt and the two responses, put into the HH SFT stage's
template, tokenised as prompt once + each response, so both rows start with the same prompt tokens. Records
whose two prompts differ (17 of the 8552 test records), empty or identical responses, and malformed ones are
skipped and counted; too-long pairs are cut (prompt from the left down to min_prompt_len, then responses),
counted. The counts are printed at the start.

One forward for both responses. share_prompt = true (default) packs each pair into one row [prompt, chosen,
rejected] whose responses attend to the prompt and themselves only (data/dpo.py, model/packed.py), so the
prompt is computed once: B(P + Rc + Rr) tokens instead of 2B(P + R). share_prompt = false stacks the B chosen
rows and the B rejected rows into one [2B, T] batch (the DPO reference code's concatenated_forward). Both give
the same log-probs up to float rounding (tests/test_dpo_data.py).

Data parallel (torchrun --nproc_per_node=N; gloo on CPU, NCCL on GPU), checkpoints and --resume exactly as in
train_sft.py: rank r takes its consecutive run of micro-batches of each global batch, gradients are summed
by hand; <out_dir>/checkpoint.pt (adapter, optimizer, step, every rank's RNG streams) is replaced atomically
every save_every steps and on SIGINT/SIGTERM; a resumed run ends bit-identical to an uninterrupted one (CPU).
The checkpoint's fingerprints (training and held-out pairs, start checkpoint), the metrics rows dropped
after it and the <out_dir>/.lock are train_sft.py's too. The run is finished when <out_dir>/merged exists.

Cached reference log-probs (precompute_ref_logps = true). The reference never changes, so its log-probs of
every training and held-out pair can be computed once, before the first step (batches sorted by length, each
rank a strided share, summed over ranks), saved atomically to <out_dir>/ref_logps.pt with a fingerprint of
the start checkpoint and the tokens, and looked up in the loop: each step then costs a policy forward and
backward only (about 3/4 of the in-loop reference's work). The cached values equal the in-loop ones up to
float rounding (the batches are padded differently); a resumed run reuses the file when its fingerprint
matches.

The embedded default (configs/dpo-tiny.toml; its stand-ins are toy/'s): toy_records > 0 with a missing data
file writes it from the toy world first (toy_eval_records likewise for the held-out file, from the toy world's
held-out split; toy.write_pair_data: toy_pairs "static" pairs the gold answer with a make_wrong one, "on_policy"
with the SFT model's own wrong samples, toy/pairs.py); with eval_toy > 0 training pairs that ask held-out
tasks are refused (toy.check_heldout), and eval_toy scores the start (SFT) and the merged DPO model on held-out
toy tasks (greedy exact match, toy.record_eval and toy.report_dpo) into <out_dir>/eval_toy.json and stdout.

Shapes: B pairs in a micro-batch, T tokens, D hidden, N pairs in the data.
"""
import hashlib
import json
import math
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

import toy
from config import dump_config, load_config, run_cli
from data.batching import LengthGroupedSampler, collate_dpo, tokenize_pairs
from data.dpo import collate_dpo_packed
from data.hh import hh_files, hh_pairs
from files import lock_folder, remove_stale_temp
from losses import IGNORE_INDEX, dpo_loss, sequence_logps_chunked
from lora import apply_lora, disable_adapters
from model import Tokenizer, check_vocab
from model.loading import load_pretrained
from model.packed import hidden_states_packed, tree_mask
from training import (GracefulExit, MetricsLogger, Progress, all_reduce_grads, bare_resume, broadcast_params,
                      check_fingerprints, check_same_config, checkpoint_fingerprint, cleanup, compile_blocks,
                      data_fingerprint, is_main, load_resume_state, lr_at, make_optimizer, micro_batches,
                      nf4_notice, peak_memory_gb, restore_trainable, rng_state, save_adapter_and_merged,
                      save_resume_state, seed_everything, set_checkpointing, setup_distributed)

REF_LOGPS = "ref_logps.pt"
PAIR_KEYS = ("prompt_len", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


@dataclass
class DPOConfig:
    """DPO with QLoRA (train_dpo.py). Defaults: the OpenBezoar recipe (configs/dpo-openbezoar-3b.toml)."""
    base: str = "runs/openbezoar-3b/hh_rlhf/merged"  # the merged HH-RLHF SFT checkpoint to start from
                                          # (paper: OpenBezoar-HH-RLHF-SFT)
    tokenizer: Optional[str] = None       # SentencePiece tokenizer.model; none = <base>/tokenizer.model
    out_dir: str = "runs/openbezoar-3b-dpo"  # checkpoint.pt, adapter/, merged/, metrics.jsonl, config.toml
    # Training pairs: HH-RLHF .jsonl.gz files, or a folder <root>/<subset>/train.jsonl.gz (download.py hh-rlhf)
    data: list[str] = field(default_factory=lambda: ["downloads/hh-rlhf"])
    first_n: Optional[int] = None         # read only the first N records (paper: "a subset"; unknown which)
    # Held-out pairs for eval/ metrics: files, or a folder whose test split is read
    eval_data: list[str] = field(default_factory=lambda: ["downloads/hh-rlhf"])
    eval_first_n: Optional[int] = 1000    # read only the first N held-out records (none: all)
    toy_records: int = 0                  # embedded default: if data[0] is missing, write this many toy pairs
    toy_eval_records: int = 0             # and this many held-out toy pairs to eval_data[0] if it is missing
    toy_pairs: Literal["static", "on_policy"] = "static"  # toy pairs' rejected side: a make_wrong answer
                                          # (world.hh_pairs), or the SFT model's own wrong or unfinished
                                          # samples judged as filter.py judges (toy/pairs.py)
    toy_samples: int = 4                  # on_policy: samples per toy task
    toy_temperature: float = 1.0          # on_policy: sampling temperature (0: greedy)
    epochs: int = 1                       # passes over the pairs (paper: 1)
    max_steps: Optional[int] = None       # stop after this many optimizer steps (none: all epochs)
    resume: bool = False                  # continue the run in out_dir (a bare --resume means true)
    seed: int = 0
    device: Optional[str] = None          # cpu, cuda, cuda:1; none = cuda if available, else cpu
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # compute dtype (QLoRA: bf16)
    quantize: Literal["nf4", "none"] = "nf4"  # the frozen base: NF4 + double quantisation (QLoRA), or dense
    lora_r: int = 16                      # LoRA rank (paper: the SFT stages' 16)
    lora_alpha: float = 16.0              # LoRA alpha (paper: 16)
    lora_dropout: float = 0.05            # dropout on the adapter's input (paper: 0.05)
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])  # adapted layers
    # The DPO loss (losses.dpo_loss). The paper does not state beta; 0.1 is the DPO paper's and TRL's value.
    beta: float = 0.1                     # β: strength of the KL constraint to the reference
    label_smoothing: float = 0.0          # cDPO's ε (probability that a preference label is flipped); 0 = DPO
    ipo: bool = False                     # IPO's squared loss instead of DPO's sigmoid one
    rpo_alpha: float = 0.0                # adds α · the chosen response's mean token NLL (RPO, Pang et al. 2024);
                                          # 0 = DPO alone (the paper)
    precompute_ref_logps: bool = False    # cache the reference log-probs before training (see the docstring)
    share_prompt: bool = True             # one row per pair, the prompt computed once (data/dpo.py); false:
                                          # chosen and rejected rows stacked [2B, T]. Same log-probs.
    # Optimisation: not stated by the paper.
    lr: float = 5e-5                      # peak learning rate (LoRA DPO: 5e-6 … 5e-5 is usual)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    warmup_ratio: float = 0.1             # warmup steps = ceil(ratio · steps)
    min_lr_ratio: float = 0.0             # the decay ends at min_lr_ratio · lr
    weight_decay: float = 0.0             # AdamW's decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    optimizer: Literal["adamw", "paged_adamw"] = "adamw"  # torch's fused AdamW (any device), or bitsandbytes'
                                          # PagedAdamW (CUDA): see training.make_optimizer for the choice
    compile: bool = False                 # CUDA: torch.compile each decoder block (fuses the torch code's
                                          # elementwise passes; `make gpu-check` measures it); ignored on the CPU
    max_grad_norm: float = 1.0            # clip the adapters' global gradient norm; 0 = off
    batch_size: int = 32                  # pairs per optimizer step, over all ranks
    micro_batch_size: int = 2             # pairs per forward pass on one rank (2 × as many rows)
    max_len: int = 512                    # tokens per row (prompt + response); longer pairs are cut
    min_prompt_len: int = 128             # a cut keeps at least this much prompt
    gradient_checkpointing: bool = True   # recompute each block in backward
    checkpoint_blocks: Optional[int] = None  # with checkpointing: blocks recomputed, from the first (none =
                                          # all); the rest keep their activations: faster, more memory
    loss_chunk_size: int = 1024           # response positions per lm_head chunk (losses.py)
    merged_dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None  # merged/'s storage dtype;
                                          # none = start's (OpenBezoar-DPO: fp16)
    # Bookkeeping: none of these changes the result.
    log_every: int = 10                   # steps between log lines (stdout and metrics.jsonl)
    save_every: int = 200                 # steps between checkpoints (also on SIGINT/SIGTERM); 0 = signals only
    eval_every: int = 100                 # steps between held-out evaluations (also after the last); 0 = end only
    eval_toy: int = 0                     # held-out toy tasks scored before and after DPO (0 = none)
    eval_max_new_tokens: int = 64         # generation budget per toy answer

    # Allowed values, checked as the config is read (config.py): "(0, inf)" is > 0, "[0, 1)" is 0 ≤ x < 1.
    RANGES = {"first_n": "[1, inf)", "eval_first_n": "[1, inf)", "toy_records": "[0, inf)",
              "toy_eval_records": "[0, inf)", "toy_samples": "[1, inf)", "toy_temperature": "[0, inf)",
              "epochs": "[1, inf)", "max_steps": "[1, inf)", "seed": "[0, inf)",
              "lora_r": "[1, inf)", "lora_alpha": "(0, inf)", "lora_dropout": "[0, 1)", "beta": "(0, inf)",
              "label_smoothing": "[0, 0.5)", "rpo_alpha": "[0, inf)", "lr": "(0, inf)", "warmup_ratio": "[0, 1)",
              "min_lr_ratio": "[0, 1]", "weight_decay": "[0, inf)", "betas": "[0, 1)", "max_grad_norm": "[0, inf)",
              "batch_size": "[1, inf)", "micro_batch_size": "[1, inf)", "max_len": "[3, inf)",
              "min_prompt_len": "[2, inf)", "checkpoint_blocks": "[0, inf)", "loss_chunk_size": "[1, inf)",
              "log_every": "[1, inf)", "save_every": "[0, inf)", "eval_every": "[0, inf)", "eval_toy": "[0, inf)",
              "eval_max_new_tokens": "[1, inf)"}

    def __post_init__(self):
        if not self.data or not self.eval_data:
            raise ValueError("data and eval_data must each name at least one file or folder")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        if self.min_prompt_len >= self.max_len:
            raise ValueError(f"min_prompt_len {self.min_prompt_len} must be below max_len {self.max_len}")


# Fields that change nothing in the result: a resumed run may set them differently.
RUN_CONTROL = ("resume", "device", "log_every", "save_every", "eval_every", "eval_toy", "eval_max_new_tokens")


# --- data ----------------------------------------------------------------------------------------

def read_pairs(paths, split, first_n):
    """data/hh.py hh_pairs of the files (a folder means its four subsets' <split>.jsonl.gz)."""
    files = [p for d in paths for p in (hh_files(d, split) if os.path.isdir(d) else [d])]
    return hh_pairs(files, first_n=first_n)


def pair_tokens(row):
    return len(row["chosen_input_ids"]) + len(row["rejected_input_ids"])


# --- log-probs and metrics -------------------------------------------------------------------------

def collate(rows, pad_id, share_prompt, device):
    """A micro-batch of tokenize_pair rows on the device: collate_dpo_packed if share_prompt, else collate_dpo."""
    batch = collate_dpo_packed(rows, pad_id) if share_prompt else collate_dpo(rows, pad_id)
    return {k: v.to(device) for k, v in batch.items()}


def pair_logps(model, batch, chunk_size):
    """(chosen [B], rejected [B]) summed response log-probs of the B pairs of a batch, in one forward pass.
    Packed (collate_dpo_packed): the rows' hidden states are gathered into collate_dpo's layout, [2B, U, D];
    stacked (collate_dpo): input_ids [2B, T], the B chosen rows first (the DPO reference code's
    concatenated_forward; right padding needs no mask: causal attention keeps real tokens from the pads)."""
    if "index" in batch:
        hidden = hidden_states_packed(model, batch["input_ids"], batch["position_ids"],
                                      tree_mask(batch["segments"]))                    # [B, T, D]
        hidden = hidden.flatten(0, 1)[batch["index"]]                                  # [2B, U, D]
    else:
        hidden = model.hidden_states(batch["input_ids"])                               # [2B, T, D]
    logps = sequence_logps_chunked(hidden, model.lm_head.weight, batch["labels"], chunk_size)   # [2B]
    return logps.chunk(2)                                                              # [B], [B]


def rpo_term(cfg, policy_chosen_logps, batch):
    """[B] α · (−log πθ(y_w|x) / |y_w|), the chosen response's negative log-likelihood per token, the term RPO
    adds to DPO's loss (Pang et al. 2024, Iterative Reasoning Preference Optimization; α = rpo_alpha); zeros
    when rpo_alpha = 0. DPO alone can lower the chosen responses' likelihood along with the rejected ones';
    this term holds it up."""
    if not cfg.rpo_alpha:
        return torch.zeros_like(policy_chosen_logps)
    B = policy_chosen_logps.shape[0]
    n_chosen = (batch["labels"][:B] != IGNORE_INDEX).sum(-1)                           # [B] response tokens
    return -cfg.rpo_alpha * policy_chosen_logps / n_chosen


def pair_sums(losses, chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps):
    """[len(METRICS)] sums over a micro-batch's pairs (fp64), in METRICS order; divided by the pair count
    once all micro-batches and ranks are summed."""
    values = (losses.detach(), chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).float(),
              chosen_rewards - rejected_rewards, policy_chosen_logps.detach(), policy_rejected_logps.detach())
    return torch.stack([v.double().sum() for v in values])


def reduce_sums(sums):
    if dist.is_initialized():
        dist.all_reduce(sums)
    return sums


@torch.no_grad()
def reference_logps(model, rows, cfg, pad_id, rank, world_size, device, what):
    """[N, 2] fp32 (log π_ref(y_w|x), log π_ref(y_l|x)) of every row: adapters disabled, no gradients. Rank r
    scores rows r, r + W, … in batches of similar length; the ranks' zero-filled results are summed."""
    out = torch.zeros(len(rows), 2, dtype=torch.float32, device=device)                # [N, 2]
    mine = sorted(range(rank, len(rows), world_size), key=lambda j: -pair_tokens(rows[j]))
    size = cfg.micro_batch_size
    with disable_adapters(model):
        for k in tqdm(range(0, len(mine), size), desc=f"reference log-probs ({what})", disable=not is_main()):
            idx = mine[k:k + size]
            b = collate([rows[j] for j in idx], pad_id, cfg.share_prompt, device)
            out[idx] = torch.stack(pair_logps(model, b, cfg.loss_chunk_size), 1).float()  # [B, 2]
    return reduce_sums(out)


def fingerprint(start, cfg, rows, eval_rows):
    """What the reference log-probs depend on: the start checkpoint (training.checkpoint_fingerprint), the
    dtype and quantisation, and every pair's tokens. A cache with another fingerprint is recomputed."""
    parts = [checkpoint_fingerprint(start), cfg.dtype, cfg.quantize, data_fingerprint(rows, PAIR_KEYS),
             data_fingerprint(eval_rows, PAIR_KEYS)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def cached_reference(model, start, rows, eval_rows, cfg, pad_id, rank, world_size, device):
    """(train [N, 2], eval [M, 2]) reference log-probs: from <out_dir>/ref_logps.pt if its fingerprint
    matches, else computed (reference_logps) and saved there atomically by the main rank."""
    key = fingerprint(start, cfg, rows, eval_rows)
    saved = load_resume_state(cfg.out_dir, name=REF_LOGPS)
    if saved is not None and saved["fingerprint"] == key:
        if is_main():
            print(f"reference log-probs: read {cfg.out_dir}/{REF_LOGPS}")
        return saved["train"].to(device), saved["eval"].to(device)
    if saved is not None and is_main():
        print(f"reference log-probs: {cfg.out_dir}/{REF_LOGPS} is for other pairs or weights; recomputing")
    train = reference_logps(model, rows, cfg, pad_id, rank, world_size, device, "train")
    held_out = reference_logps(model, eval_rows, cfg, pad_id, rank, world_size, device, "eval")
    if is_main():
        save_resume_state(cfg.out_dir, {"fingerprint": key, "train": train.cpu(), "eval": held_out.cpu()},
                          name=REF_LOGPS)
    return train, held_out


@torch.no_grad()
def evaluate(model, rows, ref_cache, cfg, pad_id, rank, world_size, device):
    """{"eval/<metric>": mean over the held-out pairs}, in eval mode (no dropout); rank r takes every W-th
    micro-batch."""
    model.eval()
    sums = torch.zeros(len(METRICS), dtype=torch.float64, device=device)
    batches = [list(range(k, min(k + cfg.micro_batch_size, len(rows))))
               for k in range(0, len(rows), cfg.micro_batch_size)]
    for idx in batches[rank::world_size]:
        b = collate([rows[j] for j in idx], pad_id, cfg.share_prompt, device)
        policy = pair_logps(model, b, cfg.loss_chunk_size)
        if ref_cache is not None:
            ref = ref_cache[idx].unbind(1)
        else:
            with disable_adapters(model):
                ref = pair_logps(model, b, cfg.loss_chunk_size)
        losses, chosen_rewards, rejected_rewards = dpo_loss(*policy, *ref, cfg.beta, cfg.label_smoothing, cfg.ipo)
        losses = losses + rpo_term(cfg, policy[0], b)
        sums += pair_sums(losses, chosen_rewards, rejected_rewards, *policy)
    model.train()
    return {f"eval/{name}": v.item() / len(rows) for name, v in zip(METRICS, reduce_sums(sums))}


# --- main -----------------------------------------------------------------------------------------

def main(argv=None):
    argv = bare_resume(sys.argv[1:] if argv is None else argv)      # a bare --resume means --resume true
    cfg = load_config(DPOConfig, argv, prog="train_dpo.py")
    rank, world_size, _, device = setup_distributed(cfg.device)
    if cfg.optimizer == "paged_adamw" and device.type != "cuda":
        raise SystemExit(f'optimizer = "paged_adamw" pages states to CPU memory from a CUDA device; the device here '
                         f'is {device}: use optimizer = "adamw"')
    if cfg.batch_size % (cfg.micro_batch_size * world_size):
        raise SystemExit(f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size × world size "
                         f"= {cfg.micro_batch_size} × {world_size}")
    if not os.path.isfile(os.path.join(cfg.base, "config.json")):
        raise SystemExit(f"{cfg.base}: no config.json; base must be the merged HH-RLHF SFT checkpoint "
                         f"(train_sft.py writes <out_dir>/hh_rlhf/merged)")
    # One run per out_dir: rank 0 holds <out_dir>/.lock until the end; a second run stops here (files.py).
    with lock_folder(cfg.out_dir) if is_main() else nullcontext():
        train(cfg, rank, world_size, device)
    cleanup()


def train(cfg, rank, world_size, device):
    """Data → model → reference log-probs (cached or in the loop) → loop → adapter and merged checkpoint."""
    notice = nf4_notice(cfg.quantize, device)          # before anything loads: the one line, then the run goes on
    if notice and is_main():
        print(notice)

    # --- the run folder: a fresh run refuses to overwrite one; --resume checks the config is the same
    if is_main():
        remove_stale_temp(cfg.out_dir)                  # a merge killed half-way leaves its temp folder
    saved, merged = os.path.join(cfg.out_dir, "config.toml"), os.path.join(cfg.out_dir, "merged")
    started = os.path.exists(os.path.join(cfg.out_dir, "checkpoint.pt")) or os.path.isdir(merged)
    if started and not cfg.resume:
        raise SystemExit(f"{cfg.out_dir} already holds a DPO run; pass --resume to continue it, or choose "
                         f"another out_dir")
    if cfg.resume:
        check_same_config(DPOConfig, cfg, saved, RUN_CONTROL)
    start = cfg.base
    seed_everything(cfg.seed, deterministic=True)
    tok = Tokenizer(cfg.tokenizer or os.path.join(start, "tokenizer.model"))
    if is_main():
        os.makedirs(cfg.out_dir, exist_ok=True)
        print(cfg)
        dump_config(cfg, saved)
    if os.path.isdir(merged):
        if is_main():
            print(f"finished earlier: {merged}")
            if cfg.eval_toy:
                toy.report_dpo(cfg, merged, tok, device)
        return

    # --- data: toy files first (embedded default), then the pairs, tokenised prompt once + each response
    if (cfg.toy_records or cfg.toy_eval_records) and is_main():
        toy.write_pair_data(cfg, device)                # the embedded default: the toy files, if missing
    if dist.is_initialized():
        dist.barrier()                                  # the toy files exist before any rank reads them
    pairs, stats = read_pairs(cfg.data, "train", cfg.first_n)
    eval_pairs, eval_stats = read_pairs(cfg.eval_data, "test", cfg.eval_first_n)
    if cfg.eval_toy:                                    # the embedded default: no held-out task in training
        toy.check_heldout(pairs, f"data ({', '.join(cfg.data)})")
    rows, tok_stats = tokenize_pairs(tok, pairs, cfg.max_len, cfg.min_prompt_len)
    eval_rows, eval_tok_stats = tokenize_pairs(tok, eval_pairs, cfg.max_len, cfg.min_prompt_len)
    if is_main():
        print(f"train {stats}\ntrain {tok_stats}\neval {eval_stats}\neval {eval_tok_stats}")
    if not rows or not eval_rows:
        raise SystemExit(f"no usable pairs in {', '.join(cfg.data if not rows else cfg.eval_data)}")
    sampler = LengthGroupedSampler([max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in rows],
                                   cfg.batch_size, cfg.seed)
    total = len(sampler) * cfg.epochs
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    warmup = math.ceil(cfg.warmup_ratio * total)
    if cfg.eval_toy and is_main() and "sft" not in toy.recorded(cfg):
        toy.record_eval(cfg, "sft", start, tok, device)    # the starting point, before the model is loaded

    # --- model: frozen (NF4) base + a fresh LoRA; the reference is the same model with adapters disabled
    model = load_pretrained(start, dtype=cfg.dtype, device=device, quantize=None if cfg.quantize == "none" else "nf4")
    check_vocab(tok, model.config.vocab_size, os.path.join(start, "config.json"))
    seed_everything(cfg.seed, deterministic=True)
    apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    broadcast_params(p for p in model.parameters() if p.requires_grad)   # rank 0's adapters on every rank
    compile_blocks(model, cfg.compile)
    torch.manual_seed(cfg.seed + 7919 * (rank + 1))                 # dropout masks: a stream per rank
    set_checkpointing(model, cfg.gradient_checkpointing, cfg.checkpoint_blocks)
    model.train()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}   # lora_A, lora_B
    optimizer = make_optimizer(list(params.values()), cfg.lr, cfg.weight_decay, cfg.betas, device, cfg.optimizer)

    # What this run trains and evaluates on; a checkpoint made from other pairs or another start is not resumed.
    fingerprints = {"data": data_fingerprint(rows, PAIR_KEYS), "eval_data": data_fingerprint(eval_rows, PAIR_KEYS),
                   "start": checkpoint_fingerprint(start)}
    start_step = 0
    ckpt = load_resume_state(cfg.out_dir) if cfg.resume else None    # on the CPU (RNG states must be)
    if ckpt is not None:
        where = f"{cfg.out_dir}/checkpoint.pt"
        check_fingerprints(ckpt, fingerprints, where, {"data": ", ".join(cfg.data), "start": start,
                                                      "eval_data": ", ".join(cfg.eval_data)})
        start_step = restore_trainable(ckpt, params, optimizer, where)
        if is_main():
            print(f"resuming at step {start_step} of {total}")
    accum = cfg.batch_size // (cfg.micro_batch_size * world_size)
    if is_main():
        print(f"{len(rows)} pairs, {total} steps of {cfg.batch_size} pairs ({world_size} rank(s) × {accum} "
              f"accumulation × {cfg.micro_batch_size}), warmup {warmup}, lr {cfg.lr:g}, beta {cfg.beta:g}, "
              f"{sum(p.numel() for p in params.values()) / 1e6:.3f} M trainable parameters; from {start}")
    ref_cache = eval_ref_cache = None
    if cfg.precompute_ref_logps:
        ref_cache, eval_ref_cache = cached_reference(model, start, rows, eval_rows, cfg, tok.pad_id, rank,
                                                     world_size, device)
    logger = MetricsLogger(os.path.join(cfg.out_dir, "metrics.jsonl"))
    dropped = logger.drop_after(start_step)             # logged after the checkpoint: logged again below
    if dropped:
        print(f"{logger.path}: removed {dropped} line(s) logged after step {start_step}, which follow again")

    def save(step):
        rng = rng_state()                               # a collective under DDP: every rank calls it
        if is_main():
            save_resume_state(cfg.out_dir, {"adapter": {n: p.detach() for n, p in params.items()},
                                            "optimizer": optimizer.state_dict(), "step": step, "rng": rng,
                                            "fingerprint": fingerprints})

    # --- loop
    progress, tokens = Progress(total, start_step), 0
    window, window_pairs = torch.zeros(len(METRICS), dtype=torch.float64, device=device), 0
    batches, batches_epoch = None, None
    with GracefulExit(device) as stop:
        for step in range(start_step, total):
            epoch, k = divmod(step, len(sampler))
            if batches_epoch != epoch:
                batches, batches_epoch = sampler.batches(epoch), epoch
            batch = batches[k]                                              # pair indices, global batch
            sums = torch.zeros(len(METRICS), dtype=torch.float64, device=device)
            for idx in micro_batches(range(len(rows)), batch, rank, world_size, cfg.micro_batch_size):
                b = collate([rows[j] for j in idx], tok.pad_id, cfg.share_prompt, device)
                policy_chosen_logps, policy_rejected_logps = pair_logps(model, b, cfg.loss_chunk_size)   # [B]
                if ref_cache is not None:
                    ref_chosen_logps, ref_rejected_logps = ref_cache[idx].unbind(1)            # [B]
                else:
                    with torch.no_grad(), disable_adapters(model):                            # π_ref
                        ref_chosen_logps, ref_rejected_logps = pair_logps(model, b, cfg.loss_chunk_size)
                losses, chosen_rewards, rejected_rewards = dpo_loss(
                    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    cfg.beta, cfg.label_smoothing, cfg.ipo)                                   # [B]
                losses = losses + rpo_term(cfg, policy_chosen_logps, b)                       # 0 unless RPO
                (losses.sum() / len(batch)).backward()      # this micro-batch's share of the global mean
                sums += pair_sums(losses, chosen_rewards, rejected_rewards, policy_chosen_logps,
                                  policy_rejected_logps)
            all_reduce_grads(params.values())               # sum of the shares = the global batch's gradient
            window += reduce_sums(sums)
            window_pairs += len(batch)
            grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()),
                                                       cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            lr = lr_at(step, total, warmup, cfg.lr, cfg.schedule, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            tokens += sum(pair_tokens(rows[j]) for j in batch)
            if (step + 1) % cfg.log_every == 0 or step + 1 == total:
                means = {name: v.item() / window_pairs for name, v in zip(METRICS, window)}
                logger.log(step=step + 1, **means, lr=lr, grad_norm=grad_norm.item(),
                           **progress.update(step + 1, tokens), peak_mem_gb=peak_memory_gb(device))
                window, window_pairs, tokens = torch.zeros_like(window), 0, 0
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == total:
                logger.log(step=step + 1, **evaluate(model, eval_rows, eval_ref_cache, cfg, tok.pad_id, rank,
                                                     world_size, device))
            stopping = stop.should_stop()
            if stopping or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                save(step + 1)
            if stopping:
                if is_main():
                    print(f"stopped after step {step + 1}; continue with --resume")
                logger.close()
                return

        # --- save: the adapter (PEFT), then the merge into start's 16/32-bit weights (HF), renamed into place.
        # Still inside GracefulExit: a signal now lets the merge finish rather than leave half a folder.
        if is_main():
            n = save_adapter_and_merged(model, start, cfg.out_dir, tok.path, dtype=cfg.merged_dtype)
            print(f"saved {cfg.out_dir}/adapter (PEFT) and {merged} ({n} weights merged)")
            if cfg.eval_toy:
                toy.report_dpo(cfg, merged, tok, device)
            if stop.requested:                          # it came after the last step: nothing was cut short
                print(f"{stop.name}: all work was saved ({cfg.out_dir}); nothing to resume")
        logger.close()


if __name__ == "__main__":
    run_cli(main)
