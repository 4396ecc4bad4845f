"""Training throughput of the demo model: real (non-padding) tokens/s and peak memory.

Trains SmolLM2-135M-Instruct (the demo model) with the QLoRA recipe on the sample dataset for a
few steps, on CUDA when present, else CPU, and prints and records:
- tokens/s over the steps after the first two (warm-up excluded),
- peak memory: torch's max allocated/reserved on CUDA, the process's peak RSS on CPU.

Results go to benchmarks/results/train_throughput-<device>.json and .md.
Usage: python benchmarks/train_throughput.py [--steps 20] [--batch 4] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    if args.steps < 4:
        parser.error("--steps must be at least 4 (two warm-up steps are not measured)")
    warnings.filterwarnings("ignore")

    from app.core.paths import cache_dir

    shared_cache = cache_dir()
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-") as home:
        shared_cache.mkdir(parents=True, exist_ok=True)
        (Path(home) / "cache").symlink_to(shared_cache, target_is_directory=True)
        os.environ["TUNESMITH_HOME"] = home  # runs go to a throw-away store, the model cache is kept
        figures = measure(args)
    write(figures)
    return 0


def measure(args) -> dict:
    import torch

    from app.core.config import TrainConfig
    from app.core.events import StepMetrics
    from app.core.resources import sample_dataset
    from app.core.trainer import run_training

    steps: list[StepMetrics] = []
    config = TrainConfig(model="demo", data=str(sample_dataset()), rank=16, seq_len=args.seq_len,
                         micro_batch=args.batch, grad_accum=1, max_steps=args.steps, save_every=10_000)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    result = run_training(config, lambda e: steps.append(e) if isinstance(e, StepMetrics) else None)
    wall = time.monotonic() - started
    if result.status != "finished":
        raise SystemExit(f"benchmark run {result.status}: {result.reason}")
    measured = steps[2:]  # the first two steps warm up allocators and kernels
    span = steps[-1].elapsed_s - steps[1].elapsed_s
    tokens = sum(s.tokens for s in measured)
    figures = {
        "benchmark": "train_throughput",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores, {platform.machine()})",
        "torch": torch.__version__,
        "model": "SmolLM2-135M-Instruct (demo), NF4 + double quant, LoRA r16 all-linear",
        "micro_batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
        "measured_steps": len(measured),
        "tokens_per_s": round(tokens / span, 1),
        "mean_step_s": round(span / len(measured), 3),
        "wall_s_including_load": round(wall, 1),
    }
    if cuda:
        figures["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        figures["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    else:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        figures["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30, 3)
    return figures


def write(figures: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    kind = "cuda" if "peak_reserved_gib" in figures else "cpu"
    (RESULTS / f"train_throughput-{kind}.json").write_text(json.dumps(figures, indent=2) + "\n")
    lines = ["# Training throughput (demo model)", "", "Command: `python benchmarks/train_throughput.py`", "",
             "| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in figures.items()]
    (RESULTS / f"train_throughput-{kind}.md").write_text("\n".join(lines) + "\n")
    for key, value in figures.items():
        print(f"{key:>24}: {value}")


if __name__ == "__main__":
    raise SystemExit(main())
