"""One writer per run: an operating-system lock on a file in the run folder, held for as long as a
process trains, resumes, deletes or exports into that run.

The lock is the operating system's (flock on Linux and macOS, a byte-range lock on Windows), so it
is released the moment its process ends, however it ends (kill -9 and power loss included): a run
is "running" exactly while some process holds its lock, never because a PID that the system has
since reused happens to be alive. Two opens of the lock file conflict even inside one process, so
a window's Train tab and its Runs tab cannot both write one run either. Who holds it (process,
program, since when) is written beside the lock, for the message the second writer gets.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from app.core.errors import RunError

LOCK_NAME = ".lock"
HOLDER_NAME = ".lock-holder.json"
RETRY_S = 0.5  # a reader probing the lock holds it for microseconds; a writer waits that long


class RunLock:
    """The write lock of the run in `run_dir`; `acquire` raises RunError naming the holder."""

    def __init__(self, run_dir: Path, purpose: str = "training"):
        self.run_dir, self.purpose = Path(run_dir), purpose
        self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> RunLock:
        if self._handle is not None:
            return self
        deadline = time.monotonic() + RETRY_S
        while True:
            handle = _try_lock(self.run_dir / LOCK_NAME)
            if handle is not None:
                break
            if time.monotonic() >= deadline:
                raise RunError(in_use_message(self.run_dir))
            time.sleep(0.02)
        self._handle = handle
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                  "purpose": self.purpose, "program": _program()}
        try:
            (self.run_dir / HOLDER_NAME).write_text(json.dumps(holder) + "\n", encoding="utf-8")
        except OSError:
            pass  # the lock is what counts; the note is for messages only
        return self

    def release(self) -> None:
        if self._handle is None:
            return
        try:
            (self.run_dir / HOLDER_NAME).unlink(missing_ok=True)
        except OSError:
            pass
        _unlock(self._handle)
        self._handle = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def in_use(run_dir: Path) -> bool:
    """Whether some process (this one included) holds the run's lock."""
    run_dir = Path(run_dir)
    if not (run_dir / LOCK_NAME).exists():
        return False
    try:
        handle = _try_lock(run_dir / LOCK_NAME)
    except OSError:  # the folder went away or cannot be written: nobody can be writing it either
        return False
    if handle is None:
        return True
    _unlock(handle)
    return False


def in_use_message(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    try:
        holder = json.loads((run_dir / HOLDER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        holder = {}
    who = f"process {holder['pid']}" if holder.get("pid") else "another process"
    if holder.get("program"):
        who += f" ({holder['program']}, {holder.get('purpose', 'training')})"
    since = (f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['since']))}"
             if isinstance(holder.get("since"), (int, float)) else "")
    return (f"run {run_dir.name} is in use by {who}{since}; wait for it to finish or stop it there, "
            "then try again")


def _program() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return {"__main__.py": "tunesmith", "-c": "python", "": "python"}.get(name, name)


def _try_lock(path: Path) -> int | None:
    """An open file descriptor holding the exclusive lock on `path`, or None when another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if sys.platform == "win32":
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(handle: int) -> None:
    try:
        if sys.platform == "win32":
            import msvcrt

            os.lseek(handle, 0, os.SEEK_SET)
            msvcrt.locking(handle, msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        os.close(handle)
