"""Lock files: held while a recorded process runs, replaced when stale, released only by their holder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from lora2.lockfile import HOST, LockFile, alive, process_start


def _finished_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_lock_is_held_by_a_live_process_and_released_by_it(tmp_path):
    lock = LockFile(tmp_path / "job.lock")
    assert lock.acquire(stage="train") is None
    record = json.loads(lock.path.read_text())
    assert record["host"] == HOST and record["pids"][0][0] == os.getpid() and record["stage"] == "train"
    assert lock.acquire(stage="eval") == record  # held: a second taker gets the holder and changes nothing
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.add_process(child.pid)
        assert [pid for pid, _ in json.loads(lock.path.read_text())["pids"]] == [os.getpid(), child.pid]
    finally:
        child.kill()
        child.wait()
    lock.release()
    assert not lock.path.exists()


def test_a_stale_lock_is_replaced(tmp_path):
    gone = _finished_pid()
    assert process_start(gone) is None and not alive(gone, None)
    lock = LockFile(tmp_path / "job.lock")
    lock.path.write_text(json.dumps({"host": HOST, "pids": [[gone, "1"]]}))
    assert lock.holder() is None
    assert lock.acquire() is None and json.loads(lock.path.read_text())["pids"][0][0] == os.getpid()


def test_a_reused_pid_does_not_hold_the_lock(tmp_path):
    """Our own pid with another start time: a process that died, whose pid now belongs to someone else."""
    lock = LockFile(tmp_path / "job.lock")
    lock.path.write_text(json.dumps({"host": HOST, "pids": [[os.getpid(), "0"]]}))
    assert alive(os.getpid(), process_start(os.getpid())) and lock.holder() is None


def test_a_lock_of_another_host_counts_as_held_and_is_not_released(tmp_path):
    lock = LockFile(tmp_path / "job.lock")
    record = {"host": HOST + "-elsewhere", "pids": [[os.getpid(), None]]}
    lock.path.write_text(json.dumps(record))
    assert lock.acquire() == record
    lock.release()
    assert json.loads(lock.path.read_text()) == record
