"""Where an export goes: the rules for `--out`, and replacing an earlier export without ever deleting
a file of the user's or leaving `--out` missing.

Every export's marker (MARKER, written last) lists each file the export wrote with its size, and
the SHA-256 of those under HASHED_BELOW bytes (the card, the Modelfile, configs): that list is the
licence `--force` needs. A folder holding anything the list does not name, or a listed file
changed since, is never replaced, and neither is a folder whose marker has no list (a copied
marker, an older Tunesmith's export).

An export is written into a staging sibling `.NAME.<random>.tmp` (its first file, STAGING, says
so) and swapped in: `--out` renamed to `.NAME.<random>.old`, the staging folder renamed to
`--out`, the old one removed. A process killed between those two renames leaves `--out` missing;
`repair`, which every export to that place runs first, finishes the swap (a staging folder whose
marker is written is complete) or puts the old export back, and removes staging folders that a
killed export left, each said in one line. One export at a time writes a place: ExportLock holds
an operating-system lock on `.NAME.export-lock` beside it while the export runs. What an export
may never replace at all (the home folder, a run, what is being exported): `protected_reason`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.core.adapters import find_adapter
from app.core.atomic import file_sha256, fsync_dir, write_json
from app.core.errors import ExportError
from app.core.paths import cache_dir, config_dir, data_dir, runs_dir
from app.core.portable import replace as _rename
from app.core.run_lock import FileLock
from app.core.runs import is_run_folder
from app.core.units import size_text

MARKER = ".tunesmith-export"  # in every export folder, written last: what the export wrote
STAGING = ".tunesmith-staging"  # the first file of a staging folder: an export not yet complete
HASHED_BELOW = 1 << 20  # files smaller than this are listed with their SHA-256 (large ones by size)
NAMED = 3  # files a refusal names


def write_marker(folder: Path, about: dict) -> list[str]:
    """List every file of the finished export in `folder` in its MARKER (written last); the files."""
    (folder / STAGING).unlink(missing_ok=True)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER):
        entry = {"bytes": path.stat().st_size}
        if entry["bytes"] < HASHED_BELOW:
            entry["sha256"] = file_sha256(path)
        files[path.relative_to(folder).as_posix()] = entry
    write_json(folder / MARKER, {**about, "written_by": "tunesmith export", "files": files})
    return list(files)


def check_target(out: Path, force: bool) -> bool:
    """Whether the export replaces `out` (else it makes it): an empty folder, or an earlier export
    holding only what its marker lists, and that only with `force`. ExportError otherwise."""
    if not out.exists() and not out.is_symlink():
        return False
    if not out.is_dir() or out.is_symlink():
        raise ExportError(f"{out}: is a file; choose a folder for --out")
    if not any(out.iterdir()):
        return True
    listed = _listed_files(out)
    if listed is None:
        if (out / MARKER).exists():
            raise ExportError(f"{out}: its {MARKER} does not list what the export wrote (an older Tunesmith's "
                              "export, or a marker copied in): it is never replaced, even with --force. Choose a "
                              "new folder for --out, or empty this one yourself")
        raise ExportError(f"{out}: already exists and holds files Tunesmith did not write (no {MARKER}); it is "
                          "never replaced, even with --force. Choose a new folder for --out")
    foreign, changed = _not_ours(out, listed)
    if foreign or changed:
        said = []
        if foreign:
            said.append(f"{_some(foreign)} that the export did not write")
        if changed:
            said.append(f"{_some(changed)} changed since it was written")
        raise ExportError(f"{out}: holds {' and '.join(said)}; it is never replaced while it does, even with "
                          "--force. Move those out of it, or choose a new folder for --out")
    if not force:
        raise ExportError(f"{out}: already holds an earlier export; pass --force to replace it, or choose "
                          "another --out")
    return True


def repair(out: Path) -> list[str]:
    """Finish or undo a replacement that a killed export left half done at `out`, and remove the
    staging folders killed exports left beside it; one line for each thing done."""
    said = []
    parent = out.parent
    if not parent.is_dir():
        return said
    staged = sorted(parent.glob(f".{out.name}.*.tmp"), key=lambda p: p.stat().st_mtime)
    complete = [p for p in staged if p.is_dir() and _listed_files(p) is not None]
    olds = [p for p in parent.glob(f".{out.name}.*.old") if p.is_dir() and _listed_files(p) is not None]
    if not out.exists() and not out.is_symlink():
        if complete:
            _rename(complete[-1], out)
            said.append(f"{out}: finished replacing the earlier export, which a stopped export had left half done")
        elif olds:
            _rename(max(olds, key=lambda p: p.stat().st_mtime), out)
            said.append(f"{out}: put the earlier export back, which a stopped export had moved aside")
        fsync_dir(parent)
    removed, freed = 0, 0
    for leftover in [p for p in staged if p.exists()] + [p for p in olds if p.exists()]:
        if leftover.is_dir() and (leftover in olds or _listed_files(leftover) is not None
                                  or (leftover / STAGING).exists() or not any(leftover.iterdir())):
            freed += _size(leftover)
            shutil.rmtree(leftover, ignore_errors=True)
            removed += 1
    if removed:
        said.append(f"removed {removed} folder{'s' if removed > 1 else ''} a stopped export had left beside "
                    f"{out.name} ({size_text(freed)})")
    return said


@contextmanager
def staging(out: Path, replace: bool) -> Iterator[Path]:
    """A staging folder beside `out` for the export to write into; on success it becomes `out` (the
    earlier export swapped out and removed when `replace`), on any error it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        (tmp / STAGING).write_text(json.dumps({"pid": os.getpid(), "since": time.time()}) + "\n", encoding="utf-8")
        yield tmp
        if replace and (out.exists() or out.is_symlink()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            old.rmdir()  # a fresh name of ours
            _rename(out, old)
            _rename(tmp, out)  # a process killed before this leaves `out` missing: repair() mends it
            fsync_dir(out.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            _rename(tmp, out)
            fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ExportLock(FileLock):
    """One export at a time into `out`: a lock on `.NAME.export-lock` beside it."""

    def __init__(self, out: Path):
        super().__init__(out.parent / f".{out.name}.export-lock", "exporting", remove=True)
        self.out = out

    def acquire(self):
        self.out.parent.mkdir(parents=True, exist_ok=True)
        return super().acquire()

    def busy_message(self, holder: str) -> str:
        return (f"another export is writing {self.out} ({holder}); wait for it to finish, or choose another "
                "--out")


# -- helpers ----------------------------------------------------------------------------------------
def _listed_files(folder: Path) -> dict | None:
    """The files `folder`'s marker lists, or None without a marker that lists them."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        return None
    return files


def _not_ours(out: Path, listed: dict) -> tuple[list[str], list[str]]:
    """What in `out` the marker does not license (files, links, folders holding none of its files,
    named by their top-most path), and the listed files whose size or checksum changed."""
    folders = {str(Path(name).parent.as_posix()) for name in listed}
    folders = {f for name in folders for f in _ancestors(name)}
    foreign, changed = [], []
    for root, dirs, files in os.walk(out):
        here = Path(root).relative_to(out).as_posix()
        for name in sorted(dirs):
            rel = name if here == "." else f"{here}/{name}"
            if Path(root, name).is_symlink() or rel not in folders:
                foreign.append(rel + "/")
                dirs.remove(name)
        for name in sorted(files):
            rel = name if here == "." else f"{here}/{name}"
            path = Path(root, name)
            if rel == MARKER and here == ".":
                continue
            entry = listed.get(rel)
            if entry is None or path.is_symlink():
                foreign.append(rel)
            elif path.stat().st_size != entry.get("bytes") or (
                    "sha256" in entry and file_sha256(path) != entry["sha256"]):
                changed.append(rel)
    return sorted(foreign, key=str.lower), sorted(changed, key=str.lower)


def _ancestors(folder: str) -> list[str]:
    parts = [] if folder in ("", ".") else folder.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:NAMED]) + (f" and {len(names) - NAMED} more" if len(names) > NAMED else "")
    return shown


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def protected_reason(out: Path, also: list[Path | None] = ()) -> str:
    """Why `out` must never be replaced by an export ("" when it may be): it is, or contains, the
    home folder, the current folder, one of Tunesmith's folders, a run, or a path in `also`
    (the adapter and base model being exported)."""
    out = Path(out).expanduser().resolve()
    named = [(Path.home(), "your home folder"), (Path.cwd(), "the current folder"),
             (data_dir(), "Tunesmith's data folder"), (runs_dir(), "Tunesmith's run store"),
             (cache_dir(), "Tunesmith's cache"), (config_dir(), "Tunesmith's settings folder")]
    named += [(path, "what is being exported") for path in also if path is not None]
    for path, what in named:
        path = Path(path).expanduser().resolve()
        if out == path or out in path.parents:
            return (f"{out}: refused: {'it is' if out == path else 'it contains'} {what} ({path}); an export "
                    "never replaces that. Choose a new folder for --out")
    if out.parent == Path(runs_dir()).resolve() or is_run_folder(out) or out == Path(out.anchor):
        return f"{out}: refused: it is a run folder or a drive's root; choose a new folder for --out"
    run = next((p for p in out.parents if is_run_folder(p)), None)
    if run is not None:
        return (f"{out}: refused: it is inside the run {run.name} ({run}), whose folder holds the run's own "
                "files; choose a folder outside it for --out")
    return ""


def replace_problem(out: Path, ref: str) -> str:
    """For a window about to ask "replace?": why `out` cannot be replaced by exporting `ref`, or ""."""
    try:
        source = find_adapter(ref)
        problem = protected_reason(out, [source.adapter_dir, source.run_dir])
        if not problem:
            check_target(Path(out).expanduser().resolve(), True)
    except ExportError as err:
        return str(err)
    except Exception:  # noqa: BLE001 - the export itself reports anything else, in full
        return ""
    return problem
