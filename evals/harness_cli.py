"""`python evaluate.py harness`: score a checkpoint on harness tasks, print the table, write lm-eval's JSON.

    python evaluate.py harness --model checkpoints/open_llama_3b_v2 --tasks arc_easy,piqa --limit 200
    python evaluate.py harness --model runs/sft/merged --preset open_llm_v1 --dtype bfloat16 --device cuda
    python evaluate.py harness --model runs/base --tasks toy_mc,toy_gen

Tasks come from the benchmarks' own files in --data-dir ($BEZOAR_DATA, else ../shared/data); see
evals/tasks.py for the formulations and evals/harness.py for the scoring. The results JSON has
lm-evaluation-harness's layout (results → task → "acc,none", "acc_stderr,none", …, configs, n-shot,
config); with --log-samples every item's requests and scores go to <output>.samples.jsonl.
"""
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from config import config_to_dict, load_config
from evals.harness import evaluate, format_table
from evals.tasks import PRESETS, default_data_dir
from files import write_jsonl_atomic, write_text_atomic
from model.loading import load_pretrained
from model.tokenizer import Tokenizer, check_vocab
from training import resolve_device


@dataclass
class HarnessConfig:
    """Harness-style evaluation of one checkpoint (evaluate.py harness)."""
    model: str = ""                       # checkpoint folder (config.json + weights, Hugging Face layout)
    tokenizer: Optional[str] = None       # SentencePiece tokenizer.model; none = <model>/tokenizer.model
    adapter: Optional[str] = None         # a PEFT LoRA adapter folder applied on the model (e.g. DPO's)
    # Task names, comma-separated: arc_challenge, arc_easy, hellaswag, mmlu (its 57 subjects) or
    # mmlu_<subject>, truthfulqa_mc1, truthfulqa_mc2, boolq, piqa, openbookqa, gsm8k, winogrande,
    # toy_mc, toy_format_mc, toy_gen
    tasks: list[str] = field(default_factory=list)
    # Instead of tasks: open_llm_v1 = the Open LLM Leaderboard v1 (ARC-Challenge 25-shot acc_norm,
    # HellaSwag 10-shot acc_norm, MMLU 5-shot acc, TruthfulQA 0-shot mc2, Winogrande 5-shot acc when its
    # file is there, GSM8K 5-shot exact match)
    preset: Optional[str] = None
    num_fewshot: Optional[int] = None     # few-shot examples for every task; none = the task's (or preset's) own
    limit: Optional[float] = None         # the first N items of each task (a fraction when < 1); none = all
    batch_size: int = 16                  # requests (answer choices) per forward pass
    data_dir: Optional[str] = None        # the benchmark copies; none = $BEZOAR_DATA, else ../shared/data
    dtype: str = "auto"                   # auto (the checkpoint's), float32, bfloat16, float16
    device: Optional[str] = None          # cpu, cuda, cuda:1; none = cuda if available, else cpu
    quantize: Optional[str] = None        # nf4: QLoRA's 4-bit base (needs CUDA for speed)
    fewshot_seed: int = 1234              # lm-eval's default fewshot_random_seed
    output: Optional[str] = None          # results JSON; none = runs/harness/<model folder name>.json
    log_samples: bool = False             # also write every item's requests and scores (JSONL)
    progress: bool = True                 # progress bars (rate, ETA) on stderr

    def __post_init__(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset is {self.preset!r}, expected one of {', '.join(PRESETS)}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype is {self.dtype!r}, expected auto, float32, bfloat16 or float16")
        if self.batch_size < 1:
            raise ValueError(f"batch_size is {self.batch_size}, expected a positive integer")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit is {self.limit}, expected a positive number")


def main(argv=None):
    cfg = load_config(HarnessConfig, argv, prog="evaluate.py harness")
    if not cfg.model:
        raise SystemExit("evaluate.py harness: --model PATH is required (a checkpoint folder)")
    if bool(cfg.tasks) == bool(cfg.preset):
        raise SystemExit("evaluate.py harness: give either --tasks a,b,… or --preset open_llm_v1")
    data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    limit = int(cfg.limit) if cfg.limit is not None and cfg.limit >= 1 else cfg.limit

    names, num_fewshot, highlight, skipped = list(cfg.tasks), cfg.num_fewshot, None, {}
    if cfg.preset:
        preset = PRESETS[cfg.preset]
        names = list(preset)
        if not (data_dir / "winogrande" / "dev.jsonl").is_file():   # no public copy: run without it, say so
            skipped["winogrande"] = f"no {data_dir / 'winogrande' / 'dev.jsonl'}"
            names.remove("winogrande")
        num_fewshot = cfg.num_fewshot if cfg.num_fewshot is not None else {t: k for t, (k, _) in preset.items()}
        highlight = {t: metric for t, (_, metric) in preset.items()}
    for task, why in skipped.items():
        print(f"evaluate.py harness: skipping {task}: {why}", file=sys.stderr)

    device = resolve_device(cfg.device, "--device")
    try:
        model = load_pretrained(cfg.model, dtype=None if cfg.dtype == "auto" else getattr(torch, cfg.dtype),
                                device=device, quantize=cfg.quantize)
        if cfg.adapter:
            from lora.adapters import load_adapter
            load_adapter(model, cfg.adapter)
        tokenizer = Tokenizer(cfg.tokenizer or Path(cfg.model) / "tokenizer.model")
        check_vocab(tokenizer, model.config.vocab_size, Path(cfg.model) / "config.json")
        out = evaluate(model, tokenizer, names, num_fewshot=num_fewshot, limit=limit, batch_size=cfg.batch_size,
                       data_dir=data_dir, fewshot_seed=cfg.fewshot_seed, progress=cfg.progress,
                       log_samples=cfg.log_samples, model_path=cfg.model)
    except ValueError as e:
        raise SystemExit(f"evaluate.py harness: {e}") from None

    out["config"].update(adapter=cfg.adapter, preset=cfg.preset, skipped_tasks=skipped,
                         harness_config=config_to_dict(cfg))
    if cfg.preset:          # the leaderboard's columns and their average (over the tasks that ran)
        scores = {t: out["results"][t][metric] for t, metric in highlight.items() if t in out["results"]}
        out["leaderboard"] = {"preset": cfg.preset, "scores": scores,
                              "average": sum(scores.values()) / len(scores), "missing": sorted(skipped)}
    samples = out.pop("samples", None)
    print(format_table(out, highlight))
    if cfg.preset:
        print(f"{cfg.preset} average over {len(out['leaderboard']['scores'])} tasks (* above): "
              f"{out['leaderboard']['average']:.4f}" + (f"; missing: {', '.join(skipped)}" if skipped else ""))
    path = Path(cfg.output or Path("runs") / "harness" / f"{Path(cfg.model).resolve().name}.json")
    write_text_atomic(path, json.dumps(out, indent=2, ensure_ascii=False, default=str) + "\n")
    print(f"wrote {path}")
    if samples is not None:
        spath = path.with_name(path.stem + ".samples.jsonl")
        write_jsonl_atomic(spath, ({"task": task, **row} for task, rows in samples.items() for row in rows))
        print(f"wrote {spath}")


if __name__ == "__main__":
    main()
