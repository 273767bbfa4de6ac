"""Synthetic-data schemes for generate.py (lamini, evol_instruct, orca) and the JSONL records they write."""

from synth.records import RECORD_FIELDS, AppendLog, read_jsonl, write_jsonl_atomic

__all__ = ["RECORD_FIELDS", "AppendLog", "read_jsonl", "write_jsonl_atomic"]
