"""The CPU plan's predicted peak against what it predicts: the training process's peak resident RAM.

Each case trains the demo model (SmolLM2-135M-Instruct) for a few steps in a fresh process, as
`tunesmith train` does: the plan is made for this CPU (whatever preset is named: a card preset on a
machine without one re-plans for the CPU), the process's peak RSS is counted from the moment the
plan is made (Linux: /proc/self/clear_refs, VmHWM), through loading, the steps and the adapter's
save. The goal (issue 36): measured / predicted within [0.87, 1.0] in every case, never above.

Cases: the shipped sample set at the auto, 8gb, 12gb and 24gb presets; the long-tail chat set of
benchmarks/throughput.py (400 chats, median ~200 tokens, a few at 2,048) at auto and 8gb, and with
gradient checkpointing on. Every run is kept in results/estimator_rss-cpu.json; the .md shows them all.

Usage: python benchmarks/estimator_rss.py [--steps 2] [--cases sample-auto,longtail-auto,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import commit, load_history, machine, save_history  # noqa: E402

STEM = ROOT / "benchmarks" / "results" / "estimator_rss-cpu"
LOW, HIGH = 0.87, 1.0
CASES = {  # name: (data set, preset, fixed settings)
    "sample-auto": ("sample", "auto", {}),
    "sample-8gb": ("sample", "8gb", {}),
    "sample-12gb": ("sample", "12gb", {}),
    "sample-24gb": ("sample", "24gb", {}),
    "longtail-auto": ("longtail", "auto", {}),
    "longtail-8gb": ("longtail", "8gb", {}),
    "longtail-checkpointing": ("longtail", "auto", {"grad_checkpointing": True}),
    # the demo's and the walk-through's shape: one 256-token row a step (a first run's)
    "sample-256x1": ("sample", "auto", {"seq_len": 256, "micro_batch": 1, "grad_accum": 1}),
    # between the two: how the heap beyond the tensors grows with a step's tokens
    "sample-128x1": ("sample", "auto", {"seq_len": 128, "micro_batch": 1, "grad_accum": 1}),
    "sample-256x2": ("sample", "auto", {"seq_len": 256, "micro_batch": 2, "grad_accum": 1}),
    "sample-512x1": ("sample", "auto", {"seq_len": 512, "micro_batch": 1, "grad_accum": 1}),
    "sample-256x4": ("sample", "auto", {"seq_len": 256, "micro_batch": 4, "grad_accum": 1}),
    "longtail-1024x1": ("longtail", "auto", {"seq_len": 1024, "micro_batch": 1, "grad_accum": 1}),
    # the same passes, six of them a step (the auto plans accumulate): does the heap grow with them?
    "sample-256x1-accum6": ("sample", "auto", {"seq_len": 256, "micro_batch": 1, "grad_accum": 6}),
    "sample-192x4-accum1": ("sample", "auto", {"seq_len": 192, "micro_batch": 4, "grad_accum": 1}),
}
LONG_TAIL_CHATS = 400


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per case (the peak comes in the first)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    names = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in names if name not in CASES]
    if unknown:
        print(f"estimator_rss: no case {unknown[0]!r}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    history = load_history(STEM)
    run = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit(), "machine": machine(),
           "load_average_start": list(os.getloadavg()), "steps": args.steps, "rows": []}
    history["runs"].append(run)
    with tempfile.TemporaryDirectory() as scratch:
        sets = {}
        for name in names:
            data, preset, fixed = CASES[name]
            if data not in sets:
                sets[data] = make_set(data, Path(scratch))
            started = time.monotonic()
            row = run_child({"data": str(sets[data]), "preset": preset, "fixed": fixed, "steps": args.steps,
                             "home": str(Path(scratch) / "home")})
            row.update(case=name, preset=preset, wall_s=round(time.monotonic() - started, 1))
            run["rows"].append(row)
            print(_line(row), flush=True)
            save_history(STEM, history)
            write_markdown(history)
    run["load_average_end"] = list(os.getloadavg())
    save_history(STEM, history)
    write_markdown(history)
    bad = [row for row in run["rows"] if not row.get("in_range")]
    return 1 if bad else 0


def make_set(name: str, folder: Path) -> Path:
    if name == "sample":
        from app.core.resources import sample_dataset

        return sample_dataset()
    from benchmarks.throughput import long_tail_chats

    path = folder / "longtail.jsonl"
    path.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in long_tail_chats("demo", LONG_TAIL_CHATS)))
    return path


def run_child(spec: dict) -> dict:
    done = subprocess.run([sys.executable, str(Path(__file__)), "--child", json.dumps(spec)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "TUNESMITH_HOME": spec["home"]})
    if done.returncode != 0:
        return {"failed": (done.stderr.strip().splitlines() or ["no output"])[-1], "in_range": False}
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(spec: dict) -> dict:
    """One run in this fresh process: the plan, the peaks, the ratio."""
    from app.core import host
    from app.core.config import TrainConfig
    from app.core.events import StepMetrics
    from app.core.train.prepare import prepare_training
    from app.core.train.trainer import train_prepared

    config = TrainConfig(model="demo", data=spec["data"], preset=spec["preset"], max_steps=spec["steps"],
                         save_every=1000, **spec["fixed"])
    prepared = prepare_training(config)  # the plan, for this CPU; the peak counted from here
    plan = prepared.plan
    step_peaks: list[int] = []
    result = train_prepared(prepared, lambda event: step_peaks.append(max(event.memory, default=0))
                            if isinstance(event, StepMetrics) else None)
    whole = host.process_peak_ram()
    predicted = plan.predicted_peak_bytes
    return {"status": result.status, "device": plan.device, "seq_len": plan.seq_len, "micro_batch": plan.micro_batch,
            "batching": plan.batching, "grad_checkpointing": plan.grad_checkpointing, "quantize": plan.quantize,
            "threads": plan.threads or _threads(), "baseline_bytes": plan.breakdown.get("process_baseline", 0),
            "predicted_bytes": predicted, "steps_peak_bytes": max(step_peaks, default=0), "run_peak_bytes": whole,
            "ratio": round(whole / predicted, 4), "in_range": LOW <= whole / predicted <= HIGH,
            "breakdown": plan.breakdown}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _line(row: dict) -> str:
    if "failed" in row:
        return f"{row['case']}: failed: {row['failed']}"
    return (f"{row['case']}: predicted {row['predicted_bytes'] / 2**30:.3f} GiB, peak RSS {row['run_peak_bytes'] / 2**30:.3f} "
            f"GiB, ratio {row['ratio']:.3f} {'ok' if row['in_range'] else 'OUT OF RANGE'} ({row['wall_s']} s)")


def write_markdown(history: dict) -> None:
    lines = ["# The CPU plan's predicted peak against the process's peak resident RAM",
             "", f"Written by `benchmarks/estimator_rss.py`. Goal: measured / predicted in [{LOW}, {HIGH}] "
             "(never above the prediction, at most 15 % over). Peak RSS counted from the moment the plan is made "
             "(VmHWM after clear_refs) through loading, the steps and the save; the demo model, "
             "each case in a fresh process. Every run is listed, newest first.", ""]
    for run in reversed(history["runs"]):
        m = run["machine"]
        lines += [f"## {run['date']} · commit {run['commit']} · {m['cpu']}, {m['cores']} cores, "
                  f"{'AVX-512' if m['avx512f'] else 'AVX2 only'} · {run['steps']} steps a case · load "
                  f"{run['load_average_start'][0]:.1f} at the start", "",
                  "| case | preset | plan | threads | baseline | predicted | peak in steps | peak of the run | "
                  "ratio | in range |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in run["rows"]:
            if "failed" in row:
                lines.append(f"| {row['case']} | {row['preset']} | failed: {row['failed']} | | | | | | | no |")
                continue
            plan = (f"{row['device']}, {row['batching']} {row['micro_batch']} x {row['seq_len']}, "
                    f"checkpointing {'on' if row['grad_checkpointing'] else 'off'}, {row['quantize']}")
            lines.append(f"| {row['case']} | {row['preset']} | {plan} | {row['threads']} | "
                         f"{row['baseline_bytes'] / 2**30:.3f} | {row['predicted_bytes'] / 2**30:.3f} | "
                         f"{row['steps_peak_bytes'] / 2**30:.3f} | {row['run_peak_bytes'] / 2**30:.3f} | "
                         f"{row['ratio']:.3f} | {'yes' if row['in_range'] else '**no**'} |")
        lines.append("")
    STEM.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
