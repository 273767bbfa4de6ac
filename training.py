"""What train_sft.py and train_dpo.py share: the learning-rate schedule, seeding, the optimiser, the resume
state saved atomically, a clean stop on SIGINT/SIGTERM, metrics lines, DDP set-up and the split of a global
batch into micro-batches, the end of a stage (PEFT adapter + merged checkpoint). The embedded default's toy
data files and exact-match scores are toy/'s.

The loops themselves stay in the scripts. A resumable loop uses these pieces like this:

    rank, world_size, local_rank, device = setup_distributed(cfg.device)
    ...build the model and optimizer (they draw from the RNG)...
    ckpt = load_resume_state(out_dir)                  # None on a fresh start
    if ckpt:
        model.load_state_dict(ckpt["adapter"], strict=False); optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"]); start = ckpt["step"]
    with GracefulExit(device) as stop:
        for step in range(start, total):
            ...forward, backward, clip...
            for g in optimizer.param_groups: g["lr"] = lr_at(step, total, warmup, peak_lr)
            optimizer.step()
            stopping = stop.should_stop()              # after the step: the state is consistent here
            if stopping or (step + 1) % save_every == 0:
                rng = rng_state()                      # on every rank: under DDP it gathers all ranks' streams
                if is_main():
                    save_resume_state(out_dir, {"adapter": ..., "optimizer": ..., "step": step + 1, "rng": rng})
            if stopping:
                break

Resume means the same run: each checkpoint holds the fingerprints of what the run trains on (fingerprints:
sha256 of every row's token ids and labels, and of the start checkpoint's config.json and weight files'
names, sizes and modification times); check_fingerprints refuses to resume with one line naming the data
files or the checkpoint that changed. MetricsLogger.drop_after then removes the rows logged after the
checkpoint (a SIGKILL between a log line and the next save leaves some), so each step appears once.

Checkpoint policy: one file, <dir>/checkpoint.pt, replaced atomically at each save (files.atomic_write: temp
file in the same directory, fsync, os.replace, fsync of the directory), so at any instant it holds the last
completed save and a crash mid-write leaves the previous one. Older checkpoints are not kept: the file exists
to resume, and the scripts write the finished adapters elsewhere. It holds only trainable state (adapter
weights, optimiser state, step, data position, RNG streams), never the frozen base model.
"""
import datetime
import hashlib
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from config import config_to_dict, load_config
from files import atomic_write, write_text_atomic

CHECKPOINT = "checkpoint.pt"


# --- learning-rate schedule ---------------------------------------------------------------------

def lr_at(step, total_steps, warmup_steps, peak_lr, schedule="cosine", min_lr_ratio=0.0):
    """Learning rate for optimizer step `step` (0-based: the step about to be taken).

        warmup   step < W:   lr = peak · (step + 1) / W          (the first step is not wasted at lr 0)
        decay    step ≥ W:   p  = min(1, (step − W) / (N − W))    (N = total_steps)
                             lr = min + (peak − min) · f(p),     min = min_lr_ratio · peak
                 cosine  f(p) = ½ (1 + cos(π p))
                 linear  f(p) = 1 − p
                 constant f(p) = 1
    The decay phase equals transformers' get_{cosine,linear}_schedule_with_warmup (and its min-lr
    variant); the warmup is shifted by one step (theirs starts at lr 0)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * p))
    elif schedule == "linear":
        f = 1.0 - p
    elif schedule == "constant":
        f = 1.0
    else:
        raise ValueError(f"schedule is {schedule!r}, expected 'cosine', 'linear' or 'constant'")
    min_lr = min_lr_ratio * peak_lr
    return min_lr + (peak_lr - min_lr) * f


# --- seeding and the optimiser ---------------------------------------------------------------------

def seed_everything(seed, deterministic=False):
    """Seed python's random, numpy and torch (CPU and every CUDA device). deterministic=True also asks
    torch for deterministic kernels (warn_only: ops without one warn instead of failing, e.g. some
    CUDA scatter ops; CPU SDPA runs unchanged) and sets the cuBLAS workspace that CUDA needs for it.

    What that buys: on the CPU a resumed run equals the uninterrupted one bit for bit (tests/test_train_sft.py).
    On CUDA it is not bit-exact (atomics in some backward kernels, cuBLAS's split-K choices, SDPA's kernels
    have no deterministic variant for every shape): a resumed run continues the same run statistically.
    Deterministic mode would also fill every new tensor with NaN on CUDA (fill_uninitialized_memory), a
    write pass over each of the step's buffers that buys nothing here (every buffer is written before it is
    read): switched off."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")    # read at the first cuBLAS call
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False


def set_checkpointing(model, enabled: bool, blocks=None):
    """Activation checkpointing for a Llama: with `enabled`, blocks are recomputed in backward instead of
    keeping their activations; `blocks` of them from the first (None: all), the others keep theirs, which is
    faster for the memory they hold (bench/bench_sft_step.py: 4 of 8 blocks, ~10% more tokens/s for ~90 MB).
    The result is the same either way. ValueError, naming the config field, for more blocks than the model has."""
    n_layers = len(model.model.layers)
    if blocks is not None and not 0 <= blocks <= n_layers:
        raise ValueError(f"checkpoint_blocks is {blocks}, expected 0..{n_layers} (the model's blocks) or none")
    model.gradient_checkpointing = enabled
    model.checkpoint_blocks = blocks


def compile_blocks(model, enabled: bool):
    """With `enabled` (the configs' compile) and the model on CUDA, torch.compile each decoder block in place:
    the torch code's elementwise passes (RMSNorm, rotary, SwiGLU, dropout) fuse into a few kernels, so fewer
    trips through GPU memory and fewer fp32 temporaries. On the CPU it is left eager (one line says so): the
    CPU speed paths (cpu/) do that work there."""
    if not enabled:
        return
    device = model.lm_head.weight.device
    if device.type != "cuda":
        if is_main():
            print(f"compile = true applies on CUDA only; the model is on {device}: running it eagerly")
        return
    for block in model.model.layers:
        block.compile()


OPTIMIZERS = ("adamw", "paged_adamw")


def make_optimizer(params, lr, weight_decay, betas, device, name="adamw"):
    """AdamW over the adapters' parameters (on `device`).

    "adamw" (the default, every device): torch.optim.AdamW with fused=True, one kernel for all parameters'
    updates instead of a dozen tensor ops each; deterministic on the CPU (elementwise, no reduction across
    threads; tests/test_training.py). "paged_adamw": bitsandbytes' PagedAdamW (32-bit states), the QLoRA
    paper's optimiser, for CUDA (on CPU tensors it runs unpaged). Paging moves optimizer states to CPU memory
    under GPU memory pressure, but bitsandbytes pages only tensors of at least 1e5 elements, and the recipe's
    LoRA matrices (r 16 × 3200) have 51,200: nothing would be paged, and the states of all of them (8.0 M
    parameters for OpenLLaMA 3B's q/k/v) are 64 MB. So the configs choose "adamw"; `make gpu-check` times
    both on the GPU."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer is {name!r}, expected one of {', '.join(OPTIMIZERS)}")
    if name == "paged_adamw":
        import bitsandbytes                                             # imported here: only this one needs it
        return bitsandbytes.optim.PagedAdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                             optim_bits=32)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=True)


# --- checkpoints ---------------------------------------------------------------------------------

def rng_state():
    """Every random stream a step draws from, in types torch.load(weights_only=True) accepts:
    python's random.getstate() is a tuple of ints; numpy's MT19937 key becomes an int64 tensor.
    Under DDP each rank has its own streams (dropout masks differ per rank), so this is a collective
    that every rank calls: it returns the list of all ranks' states, index = rank."""
    if dist.is_initialized():
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, _local_rng_state())
        return states
    return _local_rng_state()


def _local_rng_state():
    np_state = np.random.get_state(legacy=False)
    return {"python": random.getstate(),
            "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                      "pos": int(np_state["state"]["pos"]),
                      "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    """Restore what rng_state() returned: the next draws equal those that followed the save.
    A list (saved under DDP) gives each rank its own entry; it must hold one per rank."""
    if isinstance(state, list):
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if len(state) != world_size:
            raise ValueError(f"checkpoint holds RNG states of {len(state)} ranks, this run has {world_size}")
        state = state[rank]
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "has_gauss": n["has_gauss"], "gauss": n["gauss"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]}})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resume_state(directory, state, name=CHECKPOINT):
    """Write state (a dict of tensors, numbers, strings, lists, dicts) to <directory>/<name> (checkpoint.pt)
    with files.atomic_write: if anything fails mid-write the previous file is untouched. Call on rank 0 only."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(state, f)
    return atomic_write(os.path.join(directory, name), write)


def load_resume_state(directory, map_location="cpu", name=CHECKPOINT):
    """What save_resume_state last saved in <directory>, or None if there is none. Reads <name> (checkpoint.pt)
    only (a leftover .tmp from a killed save is ignored) with weights_only=True: no code runs from the file.
    Tensors land on map_location; optimizer.load_state_dict moves its state to the parameters' device."""
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot load checkpoint ({type(e).__name__}: {e})") from None


def data_fingerprint(rows, keys):
    """sha256 (hex) of the tokenized data, in order: each row's `keys` (lists of token ids or labels, ints)."""
    h = hashlib.sha256()
    for row in rows:
        for key in keys:
            values = np.asarray(row[key], dtype=np.int64).reshape(-1)
            h.update(len(values).to_bytes(8, "little") + values.tobytes())
    return h.hexdigest()


def checkpoint_fingerprint(folder):
    """sha256 (hex) of a checkpoint folder as a run starts from it: config.json's bytes and each weight
    file's name, size and modification time (hashing gigabytes of weights at every resume would cost more
    than it adds: a replaced or rewritten file has another size or time)."""
    h = hashlib.sha256()
    with open(os.path.join(folder, "config.json"), "rb") as f:
        h.update(f.read())
    for name in sorted(os.listdir(folder)):
        if name.endswith((".safetensors", ".bin", ".index.json")):
            st = os.stat(os.path.join(folder, name))
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def check_fingerprints(ckpt, now, where, what):
    """SystemExit, one line naming what[key] (the data files, the start checkpoint), for the first of the
    fingerprints `now` ({key: hex}) that differs from those saved in the checkpoint `ckpt` (read from
    `where`). A checkpoint saved without fingerprints (older bezoar) is resumed with a notice."""
    saved = ckpt.get("fingerprint")
    if saved is None:
        if is_main():
            print(f"{where}: saved without data fingerprints; resuming without checking the data")
        return
    for key, value in now.items():
        if saved.get(key) != value:
            raise SystemExit(f"{what[key]}: not what {where} was trained on (its {key} fingerprint differs); "
                             f"restore it, or start the run again in another out_dir")


# --- stopping cleanly on SIGINT / SIGTERM -------------------------------------------------------

class GracefulExit:
    """Within `with GracefulExit(device) as stop:` the first SIGINT or SIGTERM only sets a flag; the loop
    checks stop.should_stop() after each optimizer step, saves a checkpoint and leaves. A second signal
    exits at once (SystemExit 128 + signal number; the last completed checkpoint stays valid).
    Under DDP should_stop() is an all-reduce (max) of the flag, so every rank stops at the same step
    even if the signal reached them at different moments."""

    def __init__(self, device="cpu", signals=(signal.SIGINT, signal.SIGTERM)):
        self.device, self.signals, self.requested, self._previous = torch.device(device), signals, False, {}
        self.name = None                                # the signal received, e.g. "SIGTERM"

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            print(f"{name} again: exiting now", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        self.requested, self.name = True, name
        print(f"{name}: stopping after this step with a checkpoint (send again to exit now)",
              file=sys.stderr, flush=True)

    def __enter__(self):
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False

    def should_stop(self):
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([float(self.requested)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# --- metrics -----------------------------------------------------------------------------------

def format_hms(seconds):
    """h:mm:ss, e.g. 3725 → '1:02:05'; hours grow past 24 instead of becoming days."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def peak_memory_gb(device):
    """Peak memory in GiB: on CUDA torch.cuda.max_memory_allocated (tensors of this process on that
    device); elsewhere the process's peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


class Progress:
    """Wall-clock bookkeeping for log lines. update(step, tokens) with the number of optimizer steps
    done and the tokens processed since the last call (all ranks' tokens under DDP) returns elapsed, tokens/s since the last call and
    the ETA (from the mean step time since start_step, so a resumed run estimates from its own steps)."""

    def __init__(self, total_steps, start_step=0):
        self.total_steps, self.start_step = total_steps, start_step
        self.t0 = self.t_last = time.perf_counter()

    def update(self, step, tokens):
        now = time.perf_counter()
        elapsed, since_last = now - self.t0, max(now - self.t_last, 1e-9)
        self.t_last = now
        done = step - self.start_step
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        return {"tok/s": tokens / since_last, "elapsed": format_hms(elapsed),
                "eta": format_hms(eta) if math.isfinite(eta) else "?"}


class MetricsLogger:
    """log(step=..., loss=..., ...) prints one plain line, `step=12 loss=1.234 lr=0.0002 ...` (floats
    with 6 significant digits), and appends the same record as one JSON line (full precision, plus
    `time`, an ISO timestamp) to path, flushed at once. Append-only, so a resumed run continues the
    file (after drop_after has removed what followed its checkpoint). Only the main rank writes: elsewhere
    (enabled=False) log does nothing."""

    def __init__(self, path, enabled=None):
        self.enabled = is_main() if enabled is None else enabled
        self.path, self.file = path, None
        if self.enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "a")

    def drop_after(self, step, **match):
        """Before a run (re)starts at `step` (its checkpoint's; 0 on a fresh start): remove the rows logged
        past it, those with step > `step` whose fields equal `match` (e.g. stage="lamini"), and a last line
        cut short by a kill, since the run logs those steps again. The file is rewritten atomically, only if
        something goes. Returns the number of lines removed (0 off the main rank)."""
        if not self.enabled:
            return 0
        self.file.close()
        kept, dropped, whole = [], 0, True
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                past = (isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step
                        and all(record.get(k) == v for k, v in match.items()))
                if record is None or past:
                    dropped += bool(line.strip())
                else:
                    whole = whole and line.endswith("\n")
                    kept.append(line if line.endswith("\n") else line + "\n")
        if dropped or not whole:
            write_text_atomic(self.path, "".join(kept))
        self.file = open(self.path, "a")
        return dropped

    def log(self, **record):
        if not self.enabled:
            return
        record = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in record.items()}
        print(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
              flush=True)
        record["time"] = datetime.datetime.now().isoformat(timespec="seconds")
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


# --- distributed data parallel ---------------------------------------------------------------------

def resolve_device(device=None, setting="device") -> torch.device:
    """torch.device for a config's or command line's device ('cpu', 'cuda', 'cuda:1'; None: cuda if available,
    else cpu), checked before anything is loaded: SystemExit with one line naming `setting` for a device this
    machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise SystemExit(f"{setting} is {device!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"{setting} is {str(device)!r} but this torch has no usable CUDA device "
                             f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'not built'}); use cpu, "
                             f"or install a CUDA build of torch")
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            raise SystemExit(f"{setting} is {str(device)!r} but this machine has {n} CUDA device(s): "
                             f"cuda:0{f' … cuda:{n - 1}' if n > 1 else ''}")
    elif device.type != "cpu":
        raise SystemExit(f"{setting} is {str(device)!r}: bezoar runs on cpu or cuda")
    return device


def nf4_notice(quantize, device):
    """The one line to print before loading when NF4 on CUDA cannot use bitsandbytes' kernel (None if it can,
    or if there is no NF4 on CUDA): the run goes on with the torch dequantisation (lora/nf4.py)."""
    if quantize != "nf4" or torch.device(device).type != "cuda":
        return None
    from lora.nf4 import bitsandbytes_cuda_problem
    problem = bitsandbytes_cuda_problem(device)
    if problem is None:
        return None
    return (f'quantize = "nf4" on {device}: {problem}; dequantising with bezoar\'s torch code instead (slower; '
            f'install a bitsandbytes build with CUDA kernels for this GPU to use them)')


# Rank 0 alone merges a finished stage into a 3B checkpoint (dequantise, add B A, write ~7 GB) and scores it
# while the other ranks wait at a barrier; NCCL's default timeout (10 minutes) can run out during that.
DIST_TIMEOUT = datetime.timedelta(minutes=60)


def setup_distributed(device=None):
    """(rank, world_size, local_rank, device). Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) joins the
    process group: nccl on CUDA, gloo on CPU; each rank takes GPU local_rank. Without torchrun: one
    process, rank 0. device: 'cpu', 'cuda', 'cuda:1' or None for cuda if available, else cpu (resolve_device)."""
    device = resolve_device(device)
    if "RANK" not in os.environ:
        return 0, 1, 0, device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = resolve_device(f"cuda:{local_rank}", "LOCAL_RANK's device")
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                            timeout=DIST_TIMEOUT, **({"device_id": device} if device.type == "cuda" else {}))
    return rank, world_size, local_rank, device


def is_main():
    """True on rank 0, and in a single process: the rank that prints, logs and saves."""
    return not dist.is_initialized() or dist.get_rank() == 0


def cleanup():
    """Leave the process group (if any), as torch asks at the end of a DDP run."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(tensor):
    """Mean of tensor over ranks (a new tensor; the input is unchanged); itself in a single process."""
    if not dist.is_initialized():
        return tensor.detach().clone()
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def micro_batches(rows, batch, rank, world_size, micro_batch_size):
    """This rank's micro-batches of one global batch (a list of row indices): consecutive slices of
    micro_batch_size, rank r taking the r-th run of A = len / (micro · world) slices. A short last batch
    leaves later slices short or empty. rows = range(N) gives the indices themselves."""
    per_rank = math.ceil(len(batch) / world_size / micro_batch_size) * micro_batch_size
    mine = batch[rank * per_rank:(rank + 1) * per_rank]
    return [[rows[i] for i in mine[k:k + micro_batch_size]] for k in range(0, len(mine), micro_batch_size)]


def all_reduce_grads(params):
    """Sum each parameter's gradient over ranks, in place (nothing to do in a single process). The scripts
    divide each micro-batch's loss by the global batch's count, so the sum is the global gradient; a rank
    whose share of a short last batch was empty joins with zeros (torch's DDP wrapper averages instead, and
    needs every rank to run the same number of backward passes). All gradients go as one flat buffer: one
    collective per step instead of one per LoRA matrix (156 for OpenLLaMA 3B's q/k/v), each of which costs
    NCCL's fixed latency."""
    if not dist.is_initialized():
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])                       # [Σ numel]
    dist.all_reduce(flat)
    for p, piece in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(piece.view_as(p.grad))


@torch.no_grad()
def broadcast_params(params):
    """Give every rank rank 0's values of `params` (the freshly initialised adapters), in one flat collective:
    the ranks then start from the same adapters by construction, whatever each rank's RNG or device did."""
    if not dist.is_initialized():
        return
    params = list(params)
    flat = torch.cat([p.reshape(-1) for p in params])
    dist.broadcast(flat, src=0)
    for p, piece in zip(params, flat.split([p.numel() for p in params])):
        p.copy_(piece.view_as(p))


# --- the run folder, resume, the end of a stage ------------------------------------------------------

def bare_resume(argv):
    """A bare `--resume` (last, or followed by another flag) means `--resume true`; returns a new argv."""
    argv = list(argv)
    for j, arg in enumerate(argv):
        if arg == "--resume" and (j + 1 == len(argv) or argv[j + 1].startswith("--")):
            argv.insert(j + 1, "true")
    return argv


def check_same_config(cls, cfg, saved, run_control=()):
    """SystemExit unless the config saved at `saved` (a dump_config TOML) equals cfg, apart from the
    fields in run_control (those that change nothing in the result). No file: nothing to check."""
    if not os.path.exists(saved):
        return
    before = config_to_dict(load_config(cls, ["--config", saved]))
    now = config_to_dict(cfg)
    changed = [k for k in now if k not in run_control and now[k] != before.get(k)]
    if changed:
        raise SystemExit(f"{saved}: --resume with a different config ({', '.join(changed)} changed); "
                         f"use the same config or another out_dir")


def restore_trainable(ckpt, params, optimizer, where):
    """Copy a checkpoint's adapter tensors into params ({name: parameter}), load the optimizer state and
    the RNG streams; returns the step to continue from. SystemExit if the adapter names differ."""
    if set(ckpt["adapter"]) != set(params):
        raise SystemExit(f"{where}: its adapter tensors do not match this config's LoRA")
    with torch.no_grad():
        for name, t in ckpt["adapter"].items():
            params[name].copy_(t)
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return ckpt["step"]


def save_adapter_and_merged(model, start, directory, tokenizer_path, dtype=None):
    """The end of a stage: <directory>/adapter, the model's adapters in PEFT format, and <directory>/merged,
    a Hugging Face folder holding `start`'s 16/32-bit weights with W + B A · α/r merged in (not the NF4
    copy; one tensor at a time, stored as `dtype`, default start's), plus the tokenizer's files
    (tokenizer.model, tokenizer_config.json with the chat template, special_tokens_map.json,
    generation_config.json: model/tokenizer.py write_tokenizer_files). merged/ is
    written as merged.partial and renamed into place complete, so its existence means the stage finished.
    Returns the number of merged weights. Call on the main rank."""
    from lora import merge_into_checkpoint, save_adapter                  # here: training.py stays light
    from model.tokenizer import Tokenizer
    save_adapter(model, os.path.join(directory, "adapter"), base_model_name_or_path=start)
    # A folder, not a file: published by one rename once complete (files.atomic_write replaces single files).
    merging = os.path.join(directory, "merged.partial")
    n = merge_into_checkpoint(model, start, merging, dtype=dtype, tokenizer=Tokenizer(tokenizer_path))
    os.replace(merging, os.path.join(directory, "merged"))
    return n

