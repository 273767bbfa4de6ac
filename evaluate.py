"""Evaluate checkpoints: LM-Eval-Harness-style tasks, MT-Bench with an LLM judge, and the recipe's report.

    python evaluate.py harness --model PATH --tasks arc_challenge,hellaswag ...   log-likelihood / generative tasks
    python evaluate.py mt-bench --model PATH ...                                  answer MT-Bench, then judge
    python evaluate.py mt-bench-show JUDGMENT_JSONL [--json]                      FastChat's show_result figures
    python evaluate.py report ...                                                 `make eval`: base, SFT, DPO side by side

Each subcommand lives in one module of evals/; `python evaluate.py SUBCOMMAND --help` lists its options.
"""
import importlib
import sys

SUBCOMMANDS = {                          # name → (module, function taking argv)
    "harness": ("evals.harness_cli", "main"),
    "mt-bench": ("evals.mt_bench", "main"),
    "mt-bench-show": ("evals.mt_bench", "show_main"),
    "report": ("evals.report", "main"),
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        head = "" if not argv or argv[0] in ("-h", "--help") else f"evaluate.py: unknown subcommand {argv[0]!r}\n"
        sys.exit(f"{head}usage: python evaluate.py {{{','.join(SUBCOMMANDS)}}} ...\n\n{__doc__.strip()}")
    module, function = SUBCOMMANDS[argv[0]]
    return getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
