"""Evaluate checkpoints: LM-Eval-Harness-style tasks, MT-Bench with an LLM judge, and the recipe's report.

    python evaluate.py harness --model PATH --tasks arc_challenge,hellaswag ...   log-likelihood / generative tasks
    python evaluate.py mt-bench --model PATH ...                                  answer MT-Bench, then judge
    python evaluate.py mt-bench-show JUDGMENT_JSONL [--json]                      FastChat's show_result figures
    python evaluate.py report ...                                                 `make eval`: base, SFT, DPO side by side

Each subcommand lives in one module of evals/; `python evaluate.py SUBCOMMAND --help` lists its options.
"""
import sys

from config import run_cli

USAGE = "usage: python evaluate.py {harness,mt-bench,mt-bench-show,report} ..."


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv else (None, [])
    # Each branch imports only its own module, so no subcommand loads another's dependencies (report's matplotlib).
    if command == "harness":
        from evals import harness_cli
        return harness_cli.main(rest)
    if command == "mt-bench":
        from evals import mt_bench
        return mt_bench.main(rest)
    if command == "mt-bench-show":
        from evals import mt_bench
        return mt_bench.show_main(rest)
    if command == "report":
        from evals import report
        return report.main(rest)
    head = "" if command in (None, "-h", "--help") else f"evaluate.py: unknown subcommand {command!r}\n"
    sys.exit(f"{head}{USAGE}\n\n{__doc__.strip()}")


if __name__ == "__main__":
    run_cli(main)
