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

One run per folder. `with lock_folder(folder):` holds <folder>/.lock, a file holding "pid host started" made
with O_CREAT | O_EXCL (of two processes, exactly one creates it) and removed on the way out (normal end,
exception, SystemExit). A second run on the folder stops at once with one line naming the folder and the
holder. A lock whose pid is no longer running on this host (SIGKILL, a power cut) is stale: it is taken
over with a one-line notice. Lock takers hold an flock on the folder while they look (the kernel drops it if
one dies), so two of them cannot both take over one stale lock. remove_stale_temp(folder) then deletes the
`.NAME.tmp-PID` files and folders that a killed writer (model/loading.py's checkpoint folders) left behind.

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

import datetime
import fcntl
import gzip
import json
import os
import re
import shutil
import socket
import sys
from contextlib import contextmanager


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


# --- one run per folder ----------------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    """True if process `pid` exists on this machine (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                              # another user's process: alive
        return True
    return True


@contextmanager
def lock_folder(folder, output=None):
    """Hold the lock of `folder` (created if missing) for the `with` block: <folder>/.lock, or, with `output`
    (a file name in folder, for scripts that each write one file of a shared folder), <folder>/.<output>.lock.
    SystemExit with one line if a running process holds it; see the module docstring."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    subject = os.path.join(folder, output) if output else folder
    lock = os.path.join(folder, f".{output}.lock" if output else ".lock")
    me = f"{os.getpid()} {socket.gethostname()} {datetime.datetime.now().isoformat(timespec='seconds')}\n"
    guard = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)                # held while looking; released below
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with open(lock, encoding="utf-8", errors="replace") as f:
                holder = f.read().split()
            pid = int(holder[0]) if holder and holder[0].isdigit() else None
            host = holder[1] if len(holder) > 1 else "?"
            if pid is not None and (host != socket.gethostname() or (pid != os.getpid() and pid_alive(pid))):
                since = f" since {holder[2]}" if len(holder) > 2 else ""
                elsewhere = "; another host, so it cannot be checked from here" if host != socket.gethostname() else ""
                raise SystemExit(f"{subject}: in use by pid {pid} on {host}{since} ({lock}{elsewhere}); wait for "
                                 f"that run to end or use another folder") from None
            print(f"{subject}: taking over the lock of pid {pid if pid is not None else '?'} on {host}, which is "
                  f"no longer running", file=sys.stderr, flush=True)
            os.remove(lock)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(me)
    finally:
        os.close(guard)                                  # closing drops the flock
    try:
        yield lock
    finally:
        try:
            with open(lock, encoding="utf-8") as f:
                ours = f.read() == me
            if ours:
                os.remove(lock)
        except FileNotFoundError:
            pass


def remove_stale_temp(folder):
    """Delete what killed writers left in `folder`: `.NAME.tmp-PID` files or folders whose PID is no longer
    running (model/loading.py builds a checkpoint folder as one, then renames it), each with a notice on
    stderr. Call while holding the folder's lock, so no live run of this folder is writing one."""
    if not os.path.isdir(folder):
        return
    for name in sorted(os.listdir(folder)):
        match = re.fullmatch(r"\..+\.tmp-(\d+)", name)
        if not match or int(match.group(1)) == os.getpid() or pid_alive(int(match.group(1))):
            continue
        path = os.path.join(folder, name)
        print(f"{path}: removing what pid {match.group(1)} left there (killed before it finished writing)",
              file=sys.stderr, flush=True)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


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
