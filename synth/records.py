"""The data scripts' record files: the fields every generated record has, and outputs appended record by
record so that a killed run loses nothing and a re-run resumes (reading and whole-file writes: files.py).

The append log (AppendLog):
  - every record is one line, written with one write(), then flushed and fsynced before the next;
  - on open, the records already there are read back; the scripts skip jobs whose id is among them;
  - a run killed mid-write can leave a torn last line (no trailing newline): it is cut off and counted, and
    its job is simply done again. Any other bad line means the file was damaged: an error naming file:line.
So a killed-and-resumed run ends with each id exactly once, and the lines written before the kill untouched.
SCHEMA.md lists the fields of the generated records.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from files import read_jsonl

# The fields every generated record has (SCHEMA.md); train_sft.py and filter.py read these.
RECORD_FIELDS = {"id": str, "scheme": str, "instruction": str, "input": str, "response": str, "system": str}


def read_lines(path) -> list[str]:
    """Non-blank lines of a text file, stripped (topic lists)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


class AppendLog:
    """with AppendLog(path) as log: log.ids, log.records, log.write(record)

    key: the fields that identify a record, {name: type}; its id is the value of the one field (default: the
    string "id"), or the tuple of values of several (MT-Bench's judgments: question_id, model, turn)."""

    def __init__(self, path, key: dict | None = None):
        self.path = Path(path)
        self.key = key or {"id": str}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.torn = _cut_torn_tail(self.path)
        rows, _ = read_jsonl(self.path, self.key) if self.path.exists() else ([], 0)
        self.records = [record for _, record in rows]
        self.ids: set = set()
        for number, record in rows:
            if self.id_of(record) in self.ids:
                raise ValueError(f"{self.path}:{number}: duplicate id {self.id_of(record)!r}")
            self.ids.add(self.id_of(record))
        self._file = open(self.path, "a", encoding="utf-8")

    def id_of(self, record: dict):
        values = tuple(record[name] for name in self.key)
        return values[0] if len(values) == 1 else values

    def write(self, record: dict):
        assert self.id_of(record) not in self.ids, f"{self.id_of(record)} written twice to {self.path}"
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.ids.add(self.id_of(record))
        self.records.append(record)

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _cut_torn_tail(path: Path) -> int:
    """Truncate a last line that has no newline (a write cut short by a kill). Returns 1 if one was cut."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)  # -1 + 1 = 0 when the only line is torn
        f.flush()
        os.fsync(f.fileno())
    return 1

