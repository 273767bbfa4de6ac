"""Files written whole or not at all, and JSON lines read with errors that name file:line.

Writing. atomic_write(path, write) is the one way bezoar replaces a file:

    write(tmp)          the caller fills a temp file beside path (same folder, so the rename stays on one disk)
    fsync(tmp)          its bytes are on disk before the rename makes them visible
    os.replace          the rename: a reader sees the old file or the new one, whole, never a mix
    fsync(folder)       the rename itself survives a power cut

If anything fails on the way (including KeyboardInterrupt), the temp file is removed and path is untouched.
The temp name is fixed, `{path}.tmp`: what a process killed outright (SIGKILL) leaves there is never read, and
the next write of the same file replaces it, so leftovers never pile up (each file has one writer: rank 0, or
the one script that owns it). The writer opens the temp file itself, so its permissions follow the umask as
any new file's do. write_text_atomic and write_jsonl_atomic are atomic_write for the two formats most callers
write.

Not here: files appended record by record (synth/records.py AppendLog, training.MetricsLogger) and whole
folders published by one rename (model/loading.py's checkpoint folders, a stage's merged/, toy/base.py's
base), which are built in a temporary folder and renamed once complete; download.py's NAME.part, kept across
runs so that a download resumes.

Reading. iter_jsonl(path) reads raw bytes (gzip for .gz) and splits them at b"\\n" only, so line numbers are
exact (1-based; blank lines count, and are skipped); each line is decoded as UTF-8 and parsed as one JSON
object. A bad line (not UTF-8, not JSON, not an object) is a ValueError naming path:line (and, for bytes
that are not UTF-8, their byte offset in the file); with skip_bad it is yielded as (line, None) instead, for
the caller to count. read_jsonl(path, fields, skip_bad) is the whole file as a list, field types checked,
with the number of bad lines skipped.
"""
from __future__ import annotations

import gzip
import json
import os


# --- writing -----------------------------------------------------------------------------------------

def fsync_dir(folder):
    """Make a rename (or a new file) in `folder` durable: fsync the folder itself."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Replace `path` by the file that write(tmp) creates at the temp path `tmp` (a str: path + ".tmp"; the
    folder is created if missing); see the module docstring for the steps. Returns path as a str."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:                              # includes KeyboardInterrupt / SystemExit
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(folder)
    return path


def write_text_atomic(path, text: str):
    """atomic_write of a UTF-8 text file."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, write)


def write_jsonl_atomic(path, records):
    """atomic_write of JSON lines, one record (a dict) per line, non-ASCII kept as UTF-8; gzip if path ends
    in .gz (the gzip header names the file as path, not as the temp file)."""
    def write(tmp):
        if os.fspath(path).endswith(".gz"):
            with open(tmp, "wb") as raw, gzip.GzipFile(os.path.basename(os.fspath(path)), "wb", fileobj=raw) as f:
                f.writelines((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8") for r in records)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return atomic_write(path, write)


# --- reading -----------------------------------------------------------------------------------------

def iter_jsonl(path, skip_bad: bool = False):
    """Yield (line number, record) for each non-blank line of a JSONL file (.gz through gzip); with skip_bad,
    (line number, None) for a bad line instead of the ValueError naming path:line. A file that cannot be read
    (missing, a cut-off gzip stream) is a ValueError naming it, skip_bad or not."""
    gz = os.fspath(path).endswith(".gz")
    try:
        f = gzip.open(path, "rb") if gz else open(path, "rb")
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found (expected {'gzip-compressed ' if gz else ''}JSONL)") from None
    with f:
        number, offset, lines = 0, 0, iter(f)            # binary lines end at b"\n" only
        while True:
            try:
                raw = next(lines, None)
            except (OSError, EOFError) as err:           # bad gzip data, a cut-off file
                raise ValueError(f"{path}:{number + 1}: cannot read ({err})") from None
            if raw is None:
                return
            number, start, offset = number + 1, offset, offset + len(raw)
            try:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path}:{number}: not UTF-8 at byte offset {start + err.start} "
                                     f"({err.reason})") from None
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except ValueError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            except ValueError:
                if not skip_bad:
                    raise
                record = None
            yield number, record


def check_fields(record: dict, fields: dict, where: str):
    """ValueError naming `where` (file:line) unless record has each field of {name: type} with that type."""
    for name, kind in fields.items():
        if name not in record:
            raise ValueError(f"{where}: missing field {name!r} (expected {kind.__name__})")
        if not isinstance(record[name], kind):
            raise ValueError(f"{where}: field {name!r} should be {kind.__name__}, got {type(record[name]).__name__}")


def read_jsonl(path, fields: dict | None = None, skip_bad: bool = False) -> tuple[list[tuple[int, dict]], int]:
    """([(line number, record)] for each good non-blank line, the number of bad lines skipped).

    A bad line (iter_jsonl's, or one lacking a field of `fields`, {name: type}) is a ValueError naming
    path:line, or, with skip_bad, skipped and counted."""
    rows, bad = [], 0
    for number, record in iter_jsonl(path, skip_bad):
        if record is not None:
            try:
                check_fields(record, fields or {}, f"{path}:{number}")
            except ValueError:
                if not skip_bad:
                    raise
                record = None
        if record is None:
            bad += 1
        else:
            rows.append((number, record))
    return rows, bad
