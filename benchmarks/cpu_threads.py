"""CPU threads beside another busy program: torch's threads against the cores actually free.

On a 2-core machine where one other program keeps a core busy, torch's default (one thread per
core) makes every matmul wait for the thread that shares the busy core. The planner therefore
takes only the cores other programs leave free (planner.cpu_threads, measured from /proc/stat as
the run is planned). This script measures that choice side by side: the demo model trains a few
steps in a fresh process per case, with 1 thread, with every core, and with the planner's choice,
first on an idle machine and then beside one busy process (a Python loop spinning on one core),
the cases interleaved and repeated. It reports the median step time (the first step left out) and
the planner's choice for each.

Every run is kept in results/cpu_threads-cpu.json; the .md shows them all.

Usage: python benchmarks/cpu_threads.py [--repeats 2] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import commit, load_history, machine, save_history  # noqa: E402

STEM = ROOT / "benchmarks" / "results" / "cpu_threads-cpu"
SPIN = "while True:\n    pass\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="rounds of every case (interleaved)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps a case (the first is left out)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    settings = [("1 thread", 1), (f"{cores} threads", cores), ("planner", 0)]
    history = load_history(STEM)
    run = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit(), "machine": machine(), "cores": cores,
           "steps": args.steps, "repeats": args.repeats, "load_average_start": list(os.getloadavg()), "rows": []}
    history["runs"].append(run)
    with tempfile.TemporaryDirectory() as scratch:
        for busy in (0, 1):
            spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
            try:
                time.sleep(1.0 if busy else 0.0)  # the spinner shows in /proc/stat before the plan looks
                for repeat in range(args.repeats):
                    for name, threads in settings:
                        row = run_child({"threads": threads, "steps": args.steps,
                                         "home": str(Path(scratch) / "home")})
                        row.update(setting=name, busy_programs=busy, repeat=repeat + 1)
                        run["rows"].append(row)
                        print(_line(row), flush=True)
                        save_history(STEM, history)
                        write_markdown(history)
            finally:
                for spinner in spinners:
                    spinner.kill()
                    spinner.wait()
    run["load_average_end"] = list(os.getloadavg())
    save_history(STEM, history)
    write_markdown(history)
    return 0


def run_child(spec: dict) -> dict:
    done = subprocess.run([sys.executable, str(Path(__file__)), "--child", json.dumps(spec)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "TUNESMITH_HOME": spec["home"]})
    if done.returncode != 0:
        return {"failed": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(spec: dict) -> dict:
    """The demo on the sample set, 256-token rows of 2, in this fresh process: its step times."""
    from app.core.config import TrainConfig
    from app.core.resources import sample_dataset
    from app.core.events import StepMetrics
    from app.core.train.prepare import prepare_training
    from app.core.train.trainer import train_prepared

    config = TrainConfig(model="demo", data=str(sample_dataset()), max_steps=spec["steps"], seq_len=256,
                         micro_batch=2, grad_accum=1, save_every=1000, threads=spec["threads"] or None)
    prepared = prepare_training(config)
    marks: list[float] = []
    result = train_prepared(prepared, lambda event: marks.append(time.monotonic())
                            if isinstance(event, StepMetrics) else None)
    steps = [b - a for a, b in zip(marks, marks[1:])]  # from the end of step 1 on
    return {"status": result.status, "threads": prepared.plan.threads,
            "reason": prepared.plan.reasons.get("threads", ""),
            "step_s": [round(s, 3) for s in steps], "median_step_s": round(statistics.median(steps), 3)}


def _line(row: dict) -> str:
    if "failed" in row:
        return f"{row['busy_programs']} busy, {row['setting']}: failed: {row['failed']}"
    return (f"{row['busy_programs']} busy, {row['setting']} ({row['threads']} threads): median step "
            f"{row['median_step_s']:.2f} s {row['step_s']}")


def write_markdown(history: dict) -> None:
    lines = ["# CPU threads beside another busy program", "",
             "Written by `benchmarks/cpu_threads.py`: the demo model, 256-token rows of 2, a few steps in a fresh "
             "process per case; median step time with the first step left out. Busy: one Python loop spinning on a "
             "core. 'planner' is the thread count the plan chose (the cores other programs leave free, measured "
             "from /proc/stat). Cases interleaved; every run is listed, newest first.", ""]
    for run in reversed(history["runs"]):
        m = run["machine"]
        lines += [f"## {run['date']} · commit {run['commit']} · {m['cpu']}, {run['cores']} cores, "
                  f"{'AVX-512' if m['avx512f'] else 'AVX2 only'} · load {run['load_average_start'][0]:.1f} at the "
                  "start", "", "| busy programs | setting | threads | median step (s) | steps (s) | the plan's reason |",
                  "|---|---|---|---|---|---|"]
        for row in run["rows"]:
            if "failed" in row:
                lines.append(f"| {row['busy_programs']} | {row['setting']} | failed: {row['failed']} | | | |")
                continue
            lines.append(f"| {row['busy_programs']} | {row['setting']} | {row['threads']} | {row['median_step_s']:.2f} | "
                         f"{', '.join(f'{s:.2f}' for s in row['step_s'])} | {row['reason']} |")
        summary = _summary(run)
        if summary:
            lines += ["", summary]
        lines.append("")
    STEM.with_suffix(".md").write_text("\n".join(lines))


def _summary(run: dict) -> str:
    """Medians over the repeats: each setting's step time, beside the busy program and without."""
    parts = []
    for busy in (0, 1):
        times = {}
        for row in run["rows"]:
            if row.get("busy_programs") == busy and "median_step_s" in row:
                times.setdefault(row["setting"], []).append(row["median_step_s"])
        if times:
            parts.append(f"{busy} busy: " + ", ".join(f"{name} {statistics.median(v):.2f} s" for name, v in times.items()))
    return "Medians: " + "; ".join(parts) if parts else ""


if __name__ == "__main__":
    raise SystemExit(main())
