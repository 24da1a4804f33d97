"""Lock files that know whether their holder still runs, and child processes that die with their parent.

A lock file holds JSON ``{"host", "pids": [[pid, start], ...], ...}``: the processes that hold it, each with its
start time (``/proc/<pid>/stat`` field 22, clock ticks since boot), so that a pid reused by another process after a
crash does not count as the holder. The lock is held while any of them runs (not a zombie) on this host; a lock
written on another host cannot be checked and counts as held. It is created with its content in one step (a
temporary file hard-linked to the lock name, which fails if the name exists), so no process ever reads a half
written lock.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

HOST = socket.gethostname()
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def process_start(pid: int) -> str | None:
    """The start time of a running process; None when none runs under ``pid`` (or it is a zombie); "" when this
    system has no /proc (the pid's existence is then all that is known)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").is_file():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 (state) onwards
    return None if fields[0] in ("Z", "X") else fields[19]


def alive(pid: int, start: str | None) -> bool:
    """Whether the process ``pid`` that started at ``start`` (from ``process_start``) still runs."""
    now = process_start(pid)
    return now is not None and (not start or not now or now == start)


class LockFile:
    """A lock file at ``path`` (see the module docstring); ``acquire`` replaces a stale one."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self) -> dict | None:
        """The lock's record, or None when there is no lock."""
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"host": "?", "pids": [], "unreadable": True}  # not written by LockFile: a person must look
        return record if isinstance(record, dict) else {"host": "?", "pids": [], "unreadable": True}

    def holder(self) -> dict | None:
        """The record of a live holder, or None when the lock is free or stale."""
        record = self.read()
        if record is None:
            return None
        if record.get("host") != HOST:
            return record
        pids = record.get("pids") or []
        return record if any(alive(int(pid), start) for pid, start in pids) else None

    def acquire(self, **fields) -> dict | None:
        """Take the lock for this process; None when taken, else the live holder's record (nothing changed)."""
        holder = self.holder()
        if holder is not None:
            return holder
        stale = self.read()
        if stale is not None:
            logger.warning("%s: removing the stale lock of pids %s (no longer running)", self.path, stale.get("pids"))
            self.path.unlink(missing_ok=True)
        record = {"host": HOST, "pids": [[os.getpid(), process_start(os.getpid())]], **fields}
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record), encoding="utf-8")
        try:
            os.link(tmp, self.path)
        except FileExistsError:  # another process took it between our check and now
            return self.read() or {"host": "?", "pids": []}
        finally:
            tmp.unlink(missing_ok=True)
        return None

    def add_process(self, pid: int, **fields) -> None:
        """Record one more holder (a child started for the lock's work), replacing the file atomically."""
        record = self.read() or {"host": HOST, "pids": []}
        record["pids"] = [*record.get("pids", []), [pid, process_start(pid)]]
        record.update(fields)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record), encoding="utf-8")
        tmp.replace(self.path)

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        record = self.read() or {}
        pids = record.get("pids") or []
        if record.get("host") == HOST and pids and pids[0][0] == os.getpid():
            self.path.unlink(missing_ok=True)


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen`` (Linux) after which the child gets SIGTERM when this process dies,
    even by SIGKILL (``prctl(PR_SET_PDEATHSIG)``), so a killed bench leaves no job running; SIGTERM (not SIGKILL)
    lets a trainer write its checkpoint. None elsewhere. The signal follows the death of the thread that started
    the child, so children must be started from a thread that lives as long as they should (the main thread).
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(143)

    return preexec
