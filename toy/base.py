"""The embedded default's base model: a tokenizer and a tiny LLaMA pretrained briefly on the toy world.

OpenBezoar starts from OpenLLaMA 3B v2, pretrained on 1T tokens of web text. The CPU default needs a base with
the same role at toy scale: it knows the toy world's facts ("7 plus 5 is 12.", "c a t backwards is t a c.")
but has never seen an instruction, a question or the prompt template, so it cannot follow instructions and its
exact match on held-out toy tasks stays near zero until the SFT stages teach it the format.

What the base must know for SFT to work (measured; toy/world.py pretraining_text):
  - facts with their operands named earlier ("We have the numbers 7 and 5. Their sum is 12."): pretrained on
    statements alone, the base could complete "7 plus 5 is" but not find operands further back, and QLoRA SFT
    taught it the answer's kind, not its content (held-out exact match 0.06-0.08 after the LaMini stage,
    0.42 after 1500 steps; with these paragraphs 0.80 after 1500 steps, same data and adapters);
  - the words of the responses' explanations ("Step 1:", "This holds by the rule the task gives."): without
    them the Orca stage's explanations stayed at a loss of ~1.8 per token (those tokens were never produced
    in pretraining; LoRA on q, k, v cannot teach new words quickly) and pulled exact match down by 0.3-0.4;
  - its facts, reliably: 2000 steps on 40000 documents (~1.7 epochs) state 98% of held-out facts right
    (1000 steps on 20000: 87%, add and subtract near 50%).

    python -m toy.base [--steps 2000 --out_dir runs/base ...]          (make base; train_sft.py's start)
    python -m toy.base --shipped toy/pretrained                        (make sft's default: no pretraining)

toy/pretrained is this script's output with its defaults (seed 0), committed: the embedded default starts, as
the 3B recipe starts from OpenLLaMA 3B v2, from a pretrained base, and spends its minutes on the recipe's own
steps. Its data.json records the sha256 of the documents it learnt, so `--shipped` (and the tests) refuse it
once toy/world.py or these defaults change; then `make base` and copy runs/base to toy/pretrained.

    config → seed → tokenizer (SentencePiece BPE on world.pretraining_text) → model (random init)
           → documents packed into rows → AdamW, warmup + cosine → loop → save runs/base/

Packing: every document becomes [BOS] ids [EOS]; all documents are concatenated into one stream and cut into
rows of seq_len tokens (the tail past the last full row is dropped and counted). Attention crosses document
boundaries inside a row, as in GPT-style pretraining: the EOS/BOS pair tells the model a new document starts.
No padding, so labels = input_ids and losses.sft_loss scores every next token (it shifts the labels inside:
position t predicts token t+1; the last position of a row predicts nothing).
The rows are shuffled once per epoch with a seeded generator; the run is a pure function of the config.

Output (a Hugging Face LLaMA folder that train_sft.py, transformers and vLLM read):
    runs/base/config.json, model.safetensors, tokenizer.model, tokenizer_config.json, special_tokens_map.json,
    generation_config.json, train_config.toml, metrics.jsonl, data.json (the documents: count, seed, sha256)

Shapes: B batch, T tokens per row.
"""
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch

from config import dump_config, load_config
from losses import sft_loss
from model import PRESETS, Llama, Tokenizer, train_tokenizer
from model.loading import save_pretrained
from toy import world
from training import MetricsLogger, Progress, lr_at, make_optimizer, peak_memory_gb, resolve_device, seed_everything

TINY = PRESETS["tiny"]
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")   # toy/pretrained


@dataclass
class BaseConfig:
    """Pretrain the tiny toy base (python -m toy.base). Defaults are the embedded CPU default's values."""
    out_dir: str = "runs/base"            # the Hugging Face folder written: weights, config.json, tokenizer.model
    seed: int = 0                         # seeds the data, the initialisation and the row order
    device: Optional[str] = None          # cpu, cuda, cuda:1; none = cuda if available, else cpu
    dtype: str = "float32"                # float32 or bfloat16 (weights and compute; saved in this dtype)
    # --- data
    documents: int = 40000                # world.pretraining_text documents (3-8 units each, ~120 tokens)
    vocab_size: int = 1024                # SentencePiece BPE pieces, also the model's vocab_size (≥ 260)
    # --- model shape (config.json names); defaults: model/config.py's "tiny" preset
    hidden_size: int = TINY.hidden_size
    intermediate_size: int = TINY.intermediate_size
    num_hidden_layers: int = TINY.num_hidden_layers
    num_attention_heads: int = TINY.num_attention_heads
    max_position_embeddings: int = TINY.max_position_embeddings
    # --- optimisation
    seq_len: int = 128                    # T: tokens per row (packed documents)
    batch_size: int = 32                  # B: rows per step
    steps: int = 2000                     # optimizer steps (the rows repeat once the data is used up)
    lr: float = 2e-3                      # peak learning rate (small models take large ones)
    warmup_steps: int = 50                # linear warmup, then cosine decay to min_lr_ratio · lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1             # AdamW's decoupled weight decay (matrices and vectors alike)
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0            # clip the global gradient norm (0 = no clipping)
    log_every: int = 50                   # steps between log lines (stdout and metrics.jsonl)
    # --- or no pretraining
    shipped: Optional[str] = None         # a base this script wrote (toy/pretrained): checked to be this config's
                                          # on today's toy world, then copied to out_dir (make sft's default)

    # Allowed values, checked as the config is read (config.py): "(0, inf)" is > 0, "[0, 1)" is 0 ≤ x < 1.
    RANGES = {"seed": "[0, inf)", "hidden_size": "[1, inf)", "intermediate_size": "[1, inf)",
              "num_hidden_layers": "[1, inf)", "num_attention_heads": "[1, inf)", "lr": "(0, inf)",
              "warmup_steps": "[0, inf)", "min_lr_ratio": "[0, 1]", "weight_decay": "[0, inf)", "betas": "[0, 1)",
              "max_grad_norm": "[0, inf)"}

    def __post_init__(self):
        if self.vocab_size < 260:
            raise ValueError(f"vocab_size is {self.vocab_size}, expected ≥ 260 (3 special + 256 byte pieces)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype is {self.dtype!r}, expected float32 or bfloat16")
        for name in ("documents", "seq_len", "batch_size", "steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}, expected a positive integer")
        if self.seq_len >= self.max_position_embeddings:
            raise ValueError(f"seq_len {self.seq_len} must be below max_position_embeddings "
                             f"{self.max_position_embeddings}")


def pack_documents(tok, docs, seq_len):
    """Documents → rows [N, seq_len] of the concatenated stream [BOS] d₁ [EOS] [BOS] d₂ [EOS] …,
    and the number of tokens left over at the end (fewer than one row)."""
    stream = [i for doc in docs for i in tok.encode(doc, bos=True, eos=True)]
    n = len(stream) // seq_len
    rows = torch.tensor(stream[:n * seq_len], dtype=torch.long, device="cpu").view(n, seq_len)          # [N, T]
    return rows, len(stream) - n * seq_len


def text_digest(docs):
    """sha256 of the pretraining documents, one per line: names the toy world a base has learnt."""
    return hashlib.sha256("\n".join(docs).encode()).hexdigest()


def check_shipped(cfg):
    """SystemExit (one line) unless cfg.shipped was written by this script with cfg's settings, from the
    documents toy/world.py makes today. Run by `make sft` before it starts from the shipped base, and by the
    tests, so a change to the world or to the defaults cannot leave a stale base shipped."""
    src = cfg.shipped
    for name in ("train_config.toml", "data.json", "model.safetensors", "tokenizer.model"):
        if not os.path.isfile(os.path.join(src, name)):
            raise SystemExit(f"{src}: no {name}; expected a folder written by python -m toy.base")
    made = load_config(BaseConfig, ["--config", os.path.join(src, "train_config.toml")])
    for f in fields(BaseConfig):
        if f.name not in ("out_dir", "device", "shipped") and getattr(made, f.name) != getattr(cfg, f.name):
            raise SystemExit(f"{src}/train_config.toml: {f.name} is {getattr(made, f.name)!r}, this run asks for "
                             f"{getattr(cfg, f.name)!r}; pretrain instead (make base: python -m toy.base)")
    with open(os.path.join(src, "data.json")) as f:
        recorded = json.load(f)["sha256"]
    if recorded != text_digest(world.pretraining_text(cfg.documents, cfg.seed)):
        raise SystemExit(f"{src}/data.json: the base learnt other documents than toy/world.py writes today "
                         f"(their sha256 differs); pretrain it again (make base) and ship that folder")


def install_shipped(cfg):
    """Check cfg.shipped and copy it to cfg.out_dir (whole, by one rename)."""
    check_shipped(cfg)
    tmp = cfg.out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(cfg.shipped, tmp)
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    os.replace(tmp, cfg.out_dir)
    print(f"{cfg.out_dir}: the shipped base {cfg.shipped} ({cfg.steps} steps on {cfg.documents} toy documents, "
          f"seed {cfg.seed}; `make base` pretrains it again, ~9 min on 2 cores)")


def main(argv=None):
    cfg = load_config(BaseConfig, argv, prog="python -m toy.base")
    if cfg.shipped is not None:
        return install_shipped(cfg)
    print(cfg)
    seed_everything(cfg.seed, deterministic=True)
    device = resolve_device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    out = cfg.out_dir
    tmp = out + ".tmp"              # the whole folder is built here and published by one rename when complete
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    t0 = time.time()

    # --- tokenizer, from the same documents the model reads
    docs = world.pretraining_text(cfg.documents, cfg.seed)
    train_tokenizer(docs, os.path.join(tmp, "tokenizer"), cfg.vocab_size)
    tok = Tokenizer(os.path.join(tmp, "tokenizer.model"))
    rows, dropped = pack_documents(tok, docs, cfg.seq_len)                                 # [N, T]
    with open(os.path.join(tmp, "data.json"), "w") as f:
        json.dump({"documents": len(docs), "seed": cfg.seed, "sha256": text_digest(docs)}, f)
    print(f"tokenizer: {tok.vocab_size} pieces; data: {len(docs)} documents, {rows.numel()} tokens in "
          f"{len(rows)} rows of {cfg.seq_len} ({dropped} tokens past the last full row dropped); "
          f"{cfg.steps * cfg.batch_size / len(rows):.2f} epochs")

    # --- model
    config = replace(TINY, vocab_size=tok.vocab_size, hidden_size=cfg.hidden_size,
                     intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                     num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
                     max_position_embeddings=cfg.max_position_embeddings, torch_dtype=cfg.dtype)
    model = Llama(config)
    model.init_weights(seed=cfg.seed)
    model.to(device=device, dtype=dtype).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters, {config.num_hidden_layers} layers, hidden {config.hidden_size}")
    optimizer = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay, cfg.betas, device)

    # --- loop
    logger = MetricsLogger(os.path.join(tmp, "metrics.jsonl"), enabled=True)
    progress = Progress(cfg.steps)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    order, losses, tokens = torch.empty(0, dtype=torch.long, device="cpu"), [], 0
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:                   # a new epoch: reshuffle the rows
            order = torch.cat([order, torch.randperm(len(rows), generator=generator)])
        input_ids, order = rows[order[:cfg.batch_size]].to(device), order[cfg.batch_size:]  # [B, T]
        logits = model(input_ids)                                                          # [B, T, V]
        loss = sft_loss(logits, labels=input_ids)         # every token is a target (shifted inside)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        lr = lr_at(step, cfg.steps, cfg.warmup_steps, cfg.lr, "cosine", cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += input_ids.numel()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            logger.log(step=step + 1, loss=sum(losses) / len(losses), lr=lr, **progress.update(step + 1, tokens),
                       peak_mem_gb=peak_memory_gb(device))
            losses, tokens = [], 0
    logger.close()

    # --- save: weights + config.json, the tokenizer's files beside them (transformers and vLLM need
    # tokenizer_config.json to prepend BOS), the resolved config
    save_pretrained(model.eval(), os.path.join(tmp, "model"), tokenizer=tok)
    for name in os.listdir(os.path.join(tmp, "model")):
        os.replace(os.path.join(tmp, "model", name), os.path.join(tmp, name))
    os.rmdir(os.path.join(tmp, "model"))
    dump_config(cfg, os.path.join(tmp, "train_config.toml"))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"saved {out}/ (config.json, model.safetensors, tokenizer.model and its configs) in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
