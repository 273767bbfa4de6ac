"""One run per output folder (files.lock_folder): of two processes started together on one folder exactly one
proceeds, the other stops at once with one line naming the folder and the holder; a lock left by a dead
process is taken over with a notice; what a killed writer left (`.NAME.tmp-PID`) is removed. Every script
that writes a run folder or an output file takes the lock: train_sft.py, train_dpo.py, generate.py,
filter.py, `evaluate.py mt-bench` and `make data` (synth/pipeline.py)."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from files import lock_folder, remove_stale_temp
from micro_model import ENV, REPO, micro_model, run_apart

HOST = socket.gethostname()


@pytest.fixture
def sleeper():
    """A live process that is not this one: the fake holder of a lock."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def held_message(subject, pid):
    return re.compile(rf"{re.escape(str(subject))}: in use by pid {pid} on {re.escape(HOST)} since \S+ "
                      rf"\(.*\.lock\); wait for that run to end or use another folder")


# --- the lock itself ----------------------------------------------------------------------------------

def test_the_lock_file_holds_pid_and_host_and_goes_at_exit_normal_or_not(tmp_path):
    with lock_folder(tmp_path / "run") as lock:
        pid, host, _ = open(lock).read().split()
        assert (int(pid), host) == (os.getpid(), HOST) and lock == str(tmp_path / "run" / ".lock")
    assert os.listdir(tmp_path / "run") == []
    with pytest.raises(KeyError):
        with lock_folder(tmp_path / "run", output="a.jsonl") as lock:
            assert lock == str(tmp_path / "run" / ".a.jsonl.lock")
            raise KeyError("a bug")
    assert os.listdir(tmp_path / "run") == []


def test_a_folder_held_by_a_live_process_is_refused_in_one_line_naming_folder_and_holder(tmp_path, sleeper):
    (tmp_path / ".lock").write_text(f"{sleeper} {HOST} 2024-01-01T00:00:00\n")
    with pytest.raises(SystemExit) as e:
        with lock_folder(tmp_path):
            pytest.fail("entered a held folder")
    assert held_message(tmp_path, sleeper).fullmatch(str(e.value)), e.value
    assert (tmp_path / ".lock").read_text() == f"{sleeper} {HOST} 2024-01-01T00:00:00\n"   # still the holder's
    (tmp_path / ".lock").write_text(f"{sleeper} elsewhere.example 2024-01-01T00:00:00\n")
    with pytest.raises(SystemExit, match=f"in use by pid {sleeper} on elsewhere.example .*another host"):
        with lock_folder(tmp_path):
            pass


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_one_line_notice(tmp_path, capsys):
    pid = dead_pid()
    (tmp_path / ".lock").write_text(f"{pid} {HOST} 2024-01-01T00:00:00\n")
    with lock_folder(tmp_path) as lock:
        assert open(lock).read().split()[0] == str(os.getpid())
    assert capsys.readouterr().err == f"{tmp_path}: taking over the lock of pid {pid} on {HOST}, which is no " \
                                      f"longer running\n"
    (tmp_path / ".lock").write_text("")                  # killed between creating the file and writing it
    with lock_folder(tmp_path):
        pass
    assert "taking over the lock of pid ?" in capsys.readouterr().err


LOCKER = """
import sys, time
sys.path.insert(0, {repo!r})
from files import lock_folder
print("ready", flush=True)
sys.stdin.readline()                                     # all start at once
with lock_folder({folder!r}):
    print("won", flush=True)
    time.sleep(1.5)
"""


@pytest.mark.parametrize("stale", [False, True])
def test_of_six_processes_started_together_exactly_one_takes_the_lock(tmp_path, stale):
    """Also over a stale lock, which all six find and try to take over at the same moment."""
    if stale:
        (tmp_path / ".lock").write_text(f"{dead_pid()} {HOST} 2024-01-01T00:00:00\n")
    code = LOCKER.format(repo=REPO, folder=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    for p in procs:
        assert p.stdout.readline() == "ready\n"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [(p.wait(timeout=30), p.stdout.read(), p.stderr.read()) for p in procs]
    winners = [r for r in results if r[0] == 0]
    assert len(winners) == 1 and winners[0][1] == "won\n", results
    for code, out, err in results:
        if code != 0:
            assert out == "" and len(err.splitlines()) == 1 and " in use by pid " in err, err
    assert not (tmp_path / ".lock").exists()


def test_temp_folders_of_dead_writers_are_removed_with_a_notice_and_live_ones_kept(tmp_path, sleeper, capsys):
    dead = dead_pid()
    for name in (f".merged.partial.tmp-{dead}", f".merged.partial.tmp-{sleeper}", f".merged.partial.tmp-{os.getpid()}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".config.json.tmp-{dead}").write_text("{")
    (tmp_path / "merged.tmp-1").mkdir()                  # not a hidden temp name: not ours to touch
    remove_stale_temp(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([f".merged.partial.tmp-{sleeper}",
                                                   f".merged.partial.tmp-{os.getpid()}", "merged.tmp-1"])
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{tmp_path}/.config.json.tmp-{dead}: removing what pid {dead} left there (killed before it "
                   f"finished writing)",
                   f"{tmp_path}/.merged.partial.tmp-{dead}: removing what pid {dead} left there (killed before it "
                   f"finished writing)"]


# --- every script takes it ----------------------------------------------------------------------------

def script_cases(tmp):
    """(name, argv, folder, output): each script with arguments that reach its lock, and where the lock is."""
    base = tmp / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")             # train_dpo.py looks for it before the lock
    toml = tmp / "sft.toml"
    toml.write_text('[[stages]]\nname = "lamini"\ndata = ["none.jsonl"]\n')
    (tmp / "in.jsonl").write_text("")
    data = tmp / "data"
    return [("train_sft", ["train_sft.py", "--config", toml, "--out_dir", tmp / "sft", "--device", "cpu"],
             tmp / "sft", None),
            ("train_dpo", ["train_dpo.py", "--base", base, "--out_dir", tmp / "dpo", "--device", "cpu"],
             tmp / "dpo", None),
            ("generate", ["generate.py", "--scheme", "orca", "--tasks", tmp / "in.jsonl", "--out", data / "orca.jsonl",
                          "--generator-url", "http://127.0.0.1:9", "--generator-model", "m"], data, "orca.jsonl"),
            ("filter", ["filter.py", "--in", tmp / "in.jsonl", "--out", data / "judged.jsonl", "--filtered",
                        data / "kept.jsonl", "--rating-column", "gpt4_rating"], data, "judged.jsonl"),
            ("mt-bench", ["evaluate.py", "mt-bench", "--answers-from", tmp / "in.jsonl", "--no-judge",
                          "--out-dir", tmp / "mt"], tmp / "mt", None),
            ("make data", ["-m", "synth.pipeline", "--out", tmp / "rd"], tmp / "rd", None)]


@pytest.mark.parametrize("case", range(6),
                         ids=["train_sft", "train_dpo", "generate", "filter", "mt-bench", "make-data"])
def test_each_script_stops_at_once_on_a_folder_held_by_another_run(tmp_path, sleeper, case):
    name, argv, folder, output = script_cases(tmp_path)[case]
    lock = folder / (f".{output}.lock" if output else ".lock")
    folder.mkdir(exist_ok=True)
    lock.write_text(f"{sleeper} {HOST} 2024-01-01T00:00:00\n")
    started = time.perf_counter()
    run = subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 1, (run.stdout + run.stderr)[-2000:]
    assert len(run.stderr.splitlines()) == 1, run.stderr
    assert held_message(folder / output if output else folder, sleeper).fullmatch(run.stderr.strip()), run.stderr
    assert lock.read_text().startswith(f"{sleeper} ")    # the holder's lock is left as it was
    assert time.perf_counter() - started < 30
    assert sorted(os.listdir(folder)) == [lock.name]    # nothing else written


HOLDER = """
import contextlib, runpy, sys
sys.path.insert(0, {repo!r})
import files
taken = files.lock_folder


@contextlib.contextmanager
def lock_and_hold(*args, **kwargs):          # the script's own lock_folder, then held until the test says
    with taken(*args, **kwargs) as lock:
        sys.stdin.readline()
        yield lock


files.lock_folder = lock_and_hold
print("ready", flush=True)
sys.stdin.readline()                         # both start the script at once
sys.argv = {argv!r}
if sys.argv[0] == "-m":
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("case", range(6),
                         ids=["train_sft", "train_dpo", "generate", "filter", "mt-bench", "make-data"])
def test_of_two_runs_of_each_script_started_together_one_holds_the_folder_and_the_other_stops(tmp_path, case):
    """Each process runs the script itself (its argument parsing, its imports, its own call of lock_folder),
    released together; the one that takes the lock keeps it until the other has exited, so the two overlap
    whatever their start-up times."""
    name, argv, folder, output = script_cases(tmp_path)[case]
    code = HOLDER.format(repo=REPO, argv=[str(a) for a in argv])
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline() == "ready\n"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        deadline = time.monotonic() + 60
        while all(p.poll() is None for p in procs):      # the holder waits on stdin: only the other can end
            assert time.monotonic() < deadline, "neither stopped: both hold the folder"
            time.sleep(0.05)
        (loser,) = [p for p in procs if p.poll() is not None]
        (holder,) = [p for p in procs if p is not loser]
        err = loser.stderr.read()
        assert loser.returncode == 1 and len(err.splitlines()) == 1, err[-2000:]
        assert held_message(folder / output if output else folder, holder.pid).fullmatch(err.strip()), err
        lock = folder / (f".{output}.lock" if output else ".lock")
        assert lock.read_text().startswith(f"{holder.pid} {HOST} ")
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return micro_model(tmp_path_factory.mktemp("base"))[0]


def test_two_train_sft_runs_started_together_on_one_out_dir_one_trains_the_other_stops(tmp_path, base):
    from test_train_sft import micro_toml
    toml = micro_toml(tmp_path, base, stages=("lamini",))
    argv = [sys.executable, "-u", "train_sft.py", "--config", str(toml), "--out_dir", str(tmp_path / "run")]
    procs = [subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.pid, p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    (winner,) = [r for r in results if r[1] == 0]
    (loser,) = [r for r in results if r[1] != 0]
    assert loser[1] == 1 and loser[2] == "" and held_message(tmp_path / "run", winner[0]).fullmatch(loser[3].strip())
    assert "[lamini] saved" in winner[2]
    steps = [(r["stage"], r["step"]) for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))]
    assert steps == [("lamini", s) for s in range(1, 17)]        # one run's rows, each once
    assert not (tmp_path / "run" / ".lock").exists()
