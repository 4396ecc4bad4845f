"""How fast training ran here: each run's measured speed (real tokens a second), kept per model and
way of training (device, card, threads, 4-bit or not, checkpointing), so that the next plan of the
same can say how long it will take. A plan with nothing measured yet says so instead of guessing.

Kept in the data folder as speeds.json: {key: {"tokens_per_s": x, "when": t, "run": id}}.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from app.core.atomic import write_json
from app.core.paths import data_dir

MIN_TOKENS = 2_000  # a run shorter than this measured its start-up more than its speed
KEEP = 200


def speeds_file() -> Path:
    return data_dir() / "speeds.json"


def speed_key(model: str, plan) -> str:
    """What a speed depends on most: the model, where and how it trains."""
    where = plan.gpu or plan.device
    threads = f"{plan.threads} threads" if plan.device == "cpu" and getattr(plan, "threads", 0) else ""
    parts = [Path(model.rstrip("/\\")).name or model, where, threads, getattr(plan, "quantize", "4bit") or "4bit",
             "checkpointing" if plan.grad_checkpointing else "", f"{plan.gpus} processes" if plan.gpus > 1 else ""]
    return " | ".join(part for part in parts if part)


def _read() -> dict:
    try:
        data = json.loads(speeds_file().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def remember_speed(model: str, plan, tokens: int, seconds: float, run_id: str) -> None:
    """Keep a run's measured speed (its real tokens over its training time, this session's)."""
    if tokens < MIN_TOKENS or seconds <= 0:
        return
    data = _read()
    data[speed_key(model, plan)] = {"tokens_per_s": tokens / seconds, "when": time.time(), "run": run_id}
    newest = sorted(data.items(), key=lambda item: item[1].get("when", 0), reverse=True)[:KEEP]
    try:
        write_json(speeds_file(), dict(newest))
    except OSError:
        pass  # a read-only data folder: the next plan just has no figure


def known_speed(model: str, plan) -> dict | None:
    """The last measured speed of this model trained this way here, or None."""
    entry = _read().get(speed_key(model, plan))
    return entry if isinstance(entry, dict) and entry.get("tokens_per_s", 0) > 0 else None
