"""Find the files Tunesmith ships beside its code: sample data, icons, presets."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]


def resources_dir() -> Path:
    """`resources/` of a source checkout, else the copy installed under `<prefix>/share/tunesmith`."""
    for candidate in (_ROOT / "resources", Path(sys.prefix) / "share" / "tunesmith" / "resources"):
        if candidate.is_dir():
            return candidate
    return _ROOT / "resources"


def sample_dataset() -> Path:
    """The pirate-chef chat dataset that `tunesmith demo` trains on."""
    return resources_dir() / "data" / "pirate_chef.jsonl"


def example_files() -> dict[str, Path]:
    """One small example file per supported format, by file name."""
    folder = resources_dir() / "data" / "examples"
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}
