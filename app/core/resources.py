"""Find the files Tunesmith ships beside its code: sample data, icons, the catalogue, presets."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]


def shipped_dir(name: str) -> Path:
    """`name/` ("resources", "presets") of a source checkout, else the copy installed under
    `<prefix>/share/tunesmith`, or beside the code by `pip install --target DIR` (DIR/share/tunesmith)."""
    for candidate in (_ROOT / name, Path(sys.prefix) / "share" / "tunesmith" / name,
                      _ROOT / "share" / "tunesmith" / name):
        if candidate.is_dir():
            return candidate
    return _ROOT / name


def resources_dir() -> Path:
    """Icons, sample data and the model catalogue."""
    return shipped_dir("resources")


def sample_dataset() -> Path:
    """The pirate-chef chat dataset that `tunesmith demo` trains on."""
    return resources_dir() / "data" / "pirate_chef.jsonl"
