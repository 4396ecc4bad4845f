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


class FileLock:
    """An exclusive operating-system lock on the file `path` (made if missing), with a note of who
    holds it beside it; `acquire` raises RunError with `busy_message` when another holds it."""

    def __init__(self, path: Path, purpose: str, holder: Path | None = None, remove: bool = False):
        """`remove`: delete the lock file (and its note) on release, for a lock beside a user's folder.
        The file is deleted while still locked, and a lock taken on a file since deleted is let go and
        taken again, so that two processes never both hold "the" lock on two files of one name."""
        self.path, self.purpose, self.remove = Path(path), purpose, remove
        self.holder = Path(holder) if holder else self.path.with_name(self.path.name + "-holder.json")
        self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def busy_message(self, holder: str) -> str:
        return f"{self.path} is held by {holder}; try again when it is done"

    def acquire(self):
        if self._handle is not None:
            return self
        deadline = time.monotonic() + RETRY_S
        while True:
            handle = _try_lock(self.path)
            if handle is not None and self.remove and not _same_file(handle, self.path):
                _unlock(handle)  # locked a file its holder deleted on release: take the new one
                continue
            if handle is not None:
                break
            if time.monotonic() >= deadline:
                raise RunError(self.busy_message(holder_text(self.holder)))
            time.sleep(0.02)
        self._handle = handle
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                  "purpose": self.purpose, "program": _program()}
        try:
            self.holder.write_text(json.dumps(holder) + "\n", encoding="utf-8")
        except OSError:
            pass  # the lock is what counts; the note is for messages only
        return self

    def release(self) -> None:
        if self._handle is None:
            return
        try:
            self.holder.unlink(missing_ok=True)
            if self.remove:
                self.path.unlink(missing_ok=True)  # still locked: a waiter sees the file gone and retries
        except OSError:
            pass  # Windows keeps a file others have open: it stays, locked by nobody
        _unlock(self._handle)
        self._handle = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RunLock(FileLock):
    """The write lock of the run in `run_dir`; `acquire` raises RunError naming the holder."""

    def __init__(self, run_dir: Path, purpose: str = "training"):
        self.run_dir = Path(run_dir)
        super().__init__(self.run_dir / LOCK_NAME, purpose, self.run_dir / HOLDER_NAME)

    def busy_message(self, holder: str) -> str:
        return in_use_message(self.run_dir)


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
    return (f"run {run_dir.name} is in use by {holder_text(run_dir / HOLDER_NAME)}; wait for it to finish or "
            "stop it there, then try again")


def holder_text(note: Path) -> str:
    """Who holds a lock, from its note: "process 123 (tunesmith, training) since 2026-12-06 10:00:00"."""
    try:
        holder = json.loads(Path(note).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict):
        holder = {}
    who = f"process {holder['pid']}" if holder.get("pid") else "another process"
    if holder.get("program"):
        who += f" ({holder['program']}, {holder.get('purpose', 'training')})"
    since = (f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['since']))}"
             if isinstance(holder.get("since"), (int, float)) else "")
    return who + since


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


def _same_file(handle: int, path: Path) -> bool:
    """Whether the open `handle` is still the file at `path` (not one deleted since it was opened)."""
    try:
        return os.path.samestat(os.fstat(handle), os.stat(path))
    except OSError:
        return False


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
