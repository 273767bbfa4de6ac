"""Synthetic-data schemes for generate.py (lamini, evol_instruct, orca) and the records they append."""

from synth.records import RECORD_FIELDS, AppendLog

__all__ = ["RECORD_FIELDS", "AppendLog"]
