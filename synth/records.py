"""JSONL in and out for the data scripts: inputs read with errors that name file:line, outputs appended
record by record so that a killed run loses nothing and a re-run resumes.

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
import tempfile
from pathlib import Path

# The fields every generated record has (SCHEMA.md); train_sft.py and filter.py read these.
RECORD_FIELDS = {"id": str, "scheme": str, "instruction": str, "input": str, "response": str, "system": str}


def check_fields(record, fields: dict, where: str):
    """Raise ValueError naming `where` (file:line) unless record is an object with each field of the given type."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name, kind in fields.items():
        if name not in record:
            raise ValueError(f"{where}: missing field {name!r} (expected {kind.__name__})")
        if not isinstance(record[name], kind):
            raise ValueError(f"{where}: field {name!r} should be {kind.__name__}, got {type(record[name]).__name__}")


def read_jsonl(path, fields: dict | None = None, skip_bad: bool = False) -> tuple[list[tuple[int, dict]], int]:
    """[(line number, record)] for each non-blank line, and the number of bad lines skipped.

    A line that is not JSON or lacks a field is a ValueError naming path:line, or, with skip_bad, counted."""
    rows, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err})") from None
                check_fields(record, fields or {}, f"{path}:{number}")
            except ValueError:
                if not skip_bad:
                    raise
                bad += 1
                continue
            rows.append((number, record))
    return rows, bad


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


def write_jsonl_atomic(path, records):
    """Write the whole file at once: temp file in the same folder, fsync, rename over the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it private (0600); the file it replaces was an ordinary one
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
