"""Evaluation: harness-style tasks (harness.py, tasks.py), MT-Bench (mt_bench.py), the recipe report (report.py)."""
