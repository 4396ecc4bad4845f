"""Atomic file and folder writes: write beside the target, then rename into place.

A reader (or a crash) sees either the old content or the new, never half of it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from app.core.portable import replace as _replace


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically (fsync, then rename)."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically (fsync, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _replace(tmp, path)  # retried on Windows while a reader has `path` open
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Replace `path` with `data` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def append_line(path: Path, line: str) -> None:
    """Append one whole line; a line is written in one call so readers never see a partial line
    except possibly the very last after a crash, which `read_jsonl` skips."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSON-lines log, skipping a torn last line left by a crash."""
    rows = []
    if not Path(path).exists():
        return rows
    for raw in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(raw))
        except json.JSONDecodeError:
            continue
    return rows


MANIFEST = "manifest.json"


def write_manifest(folder: Path) -> None:
    """Flush every file of `folder` to disk and record its size and SHA-256 in MANIFEST (written
    last, and flushed too): a folder whose manifest matches was completely written."""
    files = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        _fsync_file(path)
    write_json(Path(folder) / MANIFEST, {"files": files})
    fsync_dir(folder)


def manifest_problem(folder: Path, checksums: bool = True) -> str:
    """"" when `folder`'s files match its manifest (sizes, and checksums unless `checksums` is
    False); else what does not (a missing manifest included)."""
    try:
        files = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MANIFEST}"
    for name, expected in files.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected.get("bytes"):
            return f"{name} has {path.stat().st_size:,} bytes, the manifest says {expected.get('bytes'):,}"
        if checksums and file_sha256(path) != expected.get("sha256"):
            return f"{name} does not match its checksum"
    return ""


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read a megabyte at a time."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def staged_dir(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success rename it to `target`.

    On any error the temporary folder is removed and `target` is untouched. With `replace`,
    an existing `target` is swapped out only after the new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists() and replace:
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            old.rmdir()  # a fresh name of ours: never a folder of the user's
            _replace(target, old)
            _replace(tmp, target)
            fsync_dir(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            _replace(tmp, target)
            fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
