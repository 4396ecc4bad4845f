"""What every benchmark's results file records about where it ran: the commit and the machine."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The short commit of this checkout, noting uncommitted edits in app/."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "app"], capture_output=True, text=True, cwd=ROOT)
    return done.stdout.strip() + (" + uncommitted changes in app/" if dirty.stdout.strip() else "")


def machine() -> dict:
    """CPU model, cores, whether it has AVX-512 or only AVX2 (2-3x apart on the same training), Python."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = next((set(line.split(":", 1)[1].split()) for line in info.splitlines() if line.startswith("flags")), set())
    return {"cpu": model, "cores": os.cpu_count(), "avx512f": "avx512f" in flags, "avx2": "avx2" in flags,
            "python": platform.python_version()}


def load_history(stem: Path) -> dict:
    """Every earlier run of a benchmark: `stem`.json, or none yet."""
    file = Path(stem).with_suffix(".json")
    return json.loads(file.read_text()) if file.exists() else {"runs": []}


def save_history(stem: Path, history: dict) -> None:
    """`stem`.json with every run (the .md beside it is the caller's)."""
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    Path(stem).with_suffix(".json").write_text(json.dumps(history, indent=2) + "\n")
