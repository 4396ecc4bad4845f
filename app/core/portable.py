"""What Windows does differently from Linux and macOS, in one place, each testable on any system
(pass `windows=True`): the names it refuses, its path length, replacing a file a reader holds
open, and consoles whose code page cannot print every character.

- Names: CON, PRN, AUX, NUL, COM1-9 and LPT1-9 (with any extension: `con.txt` too) are devices,
  not files; a trailing dot or space is silently dropped, so `run.` and `run` are one folder;
  `<>:"/\\|?*` and control characters are refused.
- Length: a path of 260 characters or more fails (ERROR_PATH_NOT_FOUND) unless long paths are
  switched on in the registry and the program says it is long-path aware.
- Replacing: `os.replace` over a file another process has open fails with PermissionError
  (Python opens files without FILE_SHARE_DELETE), so a reader polling status.json for a
  millisecond can break a writer's atomic replace; the writer retries for a moment.
- Consoles: output redirected to a file or a pipe, and some terminals, use the ANSI code page
  (cp1252 in western Europe), which has no `→` and no user name in Japanese; printing one raises
  UnicodeEncodeError at the end of a run that otherwise went well.
"""

from __future__ import annotations

import codecs
import os
import sys
import time
from pathlib import Path, PureWindowsPath

RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", *(f"{d}{n}" for d in ("COM", "LPT") for n in
                                                              (*"123456789", "\u00b9", "\u00b2", "\u00b3"))}
FORBIDDEN = set('<>:"/\\|?*') | {chr(c) for c in range(32)}
MAX_PATH = 260  # Windows' limit, counting the terminating NUL: paths of up to 259 characters work
RUN_INNER = 64  # characters a run adds below its folder (checkpoints/step-0000001/adapter_model.safetensors)
REPLACE_TRIES_S = 2.0


def on_windows() -> bool:
    return sys.platform == "win32"


def _windows(asked: bool | None) -> bool:
    return on_windows() if asked is None else asked


def _device(name: str) -> str:
    """The device `name` opens on Windows (CON for `con.txt`), or ""."""
    stem = name.split(".")[0].rstrip(" ").upper()
    return stem if stem in RESERVED else ""


def name_problem(name: str) -> str:
    """Why Windows cannot have a file or folder called `name` ("" when it can)."""
    bad = sorted({c for c in name if c in FORBIDDEN})
    if bad:
        shown = " ".join(repr(c) if c.isprintable() else f"\\x{ord(c):02x}" for c in bad)
        return f"'{name}' has characters Windows does not allow in a name ({shown})"
    if name != name.rstrip(". "):
        return f"'{name}' ends with a dot or a space, which Windows drops"
    if _device(name):
        return f"'{name}' is a device name on Windows ({_device(name)}), not a file name"
    return ""


def path_problem(path: str | Path, windows: bool | None = None, reserve: int = 0) -> str:
    """Why Windows could not write `path` (or, with `reserve`, files that many characters below
    it): a bad name in it, or a path too long; "" when it could, and always "" off Windows
    unless `windows` is True."""
    if not _windows(windows):
        return ""
    pure = PureWindowsPath(path)
    for part in pure.parts[1:] if pure.anchor else pure.parts:
        if part not in (".", "..") and (problem := name_problem(part)):
            return problem
    length = len(str(pure)) + (reserve + 1 if reserve else 0)
    if length >= MAX_PATH and not long_paths_enabled():
        return (f"{pure} is too long for Windows ({length} characters with what goes inside it, the "
                f"limit is {MAX_PATH - 1}); use a shorter folder, or switch on long paths (LongPathsEnabled)")
    return ""


def long_paths_enabled() -> bool:
    """Whether Windows' registry allows paths past MAX_PATH (False off Windows: nothing to ask)."""
    if not on_windows():
        return False
    try:
        import winreg

        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SYSTEM\CurrentControlSet\Control\FileSystem") as key:
            return winreg.QueryValueEx(key, "LongPathsEnabled")[0] == 1
    except (ImportError, OSError):
        return False


def safe_name(name: str, fallback: str) -> str:
    """`name` made a name every system can hold: no trailing dots or spaces, no device name."""
    name = name.rstrip(". ").lstrip(".")
    if not name:
        return fallback
    return "_" + name if _device(name) else name


def replace(source: str | Path, target: str | Path, windows: bool | None = None) -> None:
    """os.replace, retried for up to REPLACE_TRIES_S on Windows while a reader holds `target` open."""
    deadline = time.monotonic() + REPLACE_TRIES_S
    wait = 0.01
    while True:
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if not _windows(windows) or time.monotonic() >= deadline:
                raise
            time.sleep(wait)
            wait = min(0.2, wait * 2)


def console_safe(*streams) -> None:
    """Let `streams` (stdout and stderr) print any text: characters their encoding lacks become `?`
    instead of raising. UTF-8 streams, and streams that are gone (a windowed app's), are left as
    they are."""
    for stream in streams:
        encoding = getattr(stream, "encoding", None)
        if not encoding or not hasattr(stream, "reconfigure"):
            continue
        try:
            if codecs.lookup(encoding).name == "utf-8":
                continue
            stream.reconfigure(errors="replace")
        except (LookupError, ValueError, OSError):
            continue


def python_command(*args: str) -> list[str]:
    """The command that runs `python *args` (such as "-m", module, ...): this interpreter, or in
    the frozen app its command-line launcher (the desktop one would open a window), which runs
    `-m module` as python does (packaging/launcher.py)."""
    if not getattr(sys, "frozen", False):
        return [sys.executable, *args]
    exe = Path(sys.executable)
    stem = exe.stem[:-len("-cli")] if exe.stem.lower().endswith("-cli") else exe.stem
    return [str(exe.with_name(f"{stem}-cli{exe.suffix}")), *args]


def child_env() -> dict[str, str]:
    """The environment for a Python child process whose output goes to a log: UTF-8 whatever the
    console's code page (the log is read as UTF-8)."""
    return {**os.environ, "PYTHONIOENCODING": "utf-8"}
