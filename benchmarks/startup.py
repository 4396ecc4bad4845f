"""Desktop app start-up time: milliseconds from process start to the main window shown.

Runs `python -m app gui --smoke` several times in fresh processes. The smoke mode opens the
window, prints the ms since the process started (read from /proc on Linux) as its last line of
stdout, and exits; the subprocess's wall time (start to exit, so it also counts teardown) is
measured alongside as a cross-check. The first run is reported on its own as "cold": it may
find the interpreter, Qt and the app not yet in the OS file cache (truly cold only after a
reboot or dropping the page cache); the statistics (median, min, max, p90) are of the warm runs
after it, and the warm median is held against the start-up target. One more run under
`python -X importtime` records the five costliest imports (top-level by cumulative time, and any
by their own time) and whether torch or another training library was imported, which start-up
must never do.

Runs offscreen (`QT_QPA_PLATFORM=offscreen`) unless `--real-display` is passed, which needs
DISPLAY or WAYLAND_DISPLAY and keeps the session's own Qt platform.

Results go to benchmarks/results/startup-cpu.json and .md (startup-cpu-display.* with
--real-display).
Usage: python benchmarks/startup.py [--runs 7] [--target-ms 1500] [--real-display]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SMOKE = [sys.executable, "-m", "app", "gui", "--smoke"]
TRAINING_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="start-ups in all, the first counted as cold")
    parser.add_argument("--target-ms", type=int, default=1500, help="budget for the warm median")
    parser.add_argument("--real-display", action="store_true",
                        help="show the window on this session's display instead of offscreen")
    args = parser.parse_args()
    if args.runs < 2:
        parser.error("--runs must be at least 2 (the first run is cold and not in the statistics)")
    env = dict(os.environ)
    if args.real_display:
        if not (env.get("DISPLAY") or env.get("WAYLAND_DISPLAY")):
            parser.error("--real-display needs DISPLAY or WAYLAND_DISPLAY set; leave it off to measure offscreen")
    else:
        env["QT_QPA_PLATFORM"] = "offscreen"

    runs = []
    for index in range(args.runs):
        runs.append(start_once(env, index))
        print(f"run {index + 1}/{args.runs}: shown {runs[-1]['shown_ms']} ms, wall {runs[-1]['wall_ms']} ms")
    figures = summarise(runs, args, env)
    figures["imports"] = import_costs(env)
    write(figures)
    return 0


def start_once(env: dict, index: int) -> dict:
    """One start-up in a fresh process: the app's own figure and the subprocess's wall time, in ms."""
    started = time.perf_counter()
    done = subprocess.run(SMOKE, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    wall_ms = round((time.perf_counter() - started) * 1000)
    lines = done.stdout.strip().splitlines()
    try:
        shown_ms = int(lines[-1])
    except (IndexError, ValueError):
        tail = (done.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise SystemExit(f"run {index + 1}: `{' '.join(SMOKE[1:])}` exited {done.returncode} without printing "
                         f"the ms as its last stdout line; its stderr ends: {tail}") from None
    return {"shown_ms": shown_ms, "wall_ms": wall_ms}


def summarise(runs: list[dict], args, env: dict) -> dict:
    import PySide6

    warm = runs[1:]
    stats = {}
    for key in ("shown_ms", "wall_ms"):
        values = sorted(run[key] for run in warm)
        stats[key] = {"cold": runs[0][key], "median": round(statistics.median(values)), "min": values[0],
                      "max": values[-1], "p90": values[math.ceil(0.9 * len(values)) - 1]}  # nearest rank
    median = stats["shown_ms"]["median"]
    qpa = env.get("QT_QPA_PLATFORM") or ("wayland" if env.get("WAYLAND_DISPLAY") else "xcb")
    return {
        "benchmark": "startup",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyside6": PySide6.__version__,
        "qt_platform": qpa,
        "command": ("" if args.real_display else "QT_QPA_PLATFORM=offscreen ") + "python -m app gui --smoke",
        "benchmark_command": " ".join(["python benchmarks/startup.py", *sys.argv[1:]]),
        "runs": len(runs), "warm_runs": len(warm),
        "target_ms": args.target_ms,
        "target_met": median <= args.target_ms,
        "stats": stats,
        "per_run": runs,
    }


def import_costs(env: dict) -> dict:
    """One more smoke start under -X importtime: the costliest imports, and any training library imported."""
    done = subprocess.run([sys.executable, "-X", "importtime", *SMOKE[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    top_level, own, imported = [], [], set()
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        self_us, cumulative, name = line[len("import time:"):].split("|", 2)
        imported.add(name.strip().split(".")[0])
        own.append((int(self_us), name.strip()))
        if not name[1:].startswith(" "):  # nested imports are indented under the one that caused them
            top_level.append((int(cumulative), name.strip()))
    top_level.sort(reverse=True)
    own.sort(reverse=True)
    return {"top_level_ms": [[name, round(us / 1000, 1)] for us, name in top_level[:5]],
            "self_ms": [[name, round(us / 1000, 1)] for us, name in own[:5]],
            "training_libraries_imported": sorted(imported & set(TRAINING_LIBRARIES))}


def write(figures: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / ("startup-cpu-display" if figures["qt_platform"] != "offscreen" else "startup-cpu")
    stem.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
    shown, wall = figures["stats"]["shown_ms"], figures["stats"]["wall_ms"]
    verdict = "pass" if figures["target_met"] else "FAIL"
    rows = [("cold (first run)", shown["cold"], wall["cold"])] + [
        (f"{name} of {figures['warm_runs']} warm", shown[name], wall[name]) for name in ("median", "min", "max", "p90")]
    table = ["| start-up | shown (ms, from the app) | wall (ms, subprocess) |", "|---|---|---|"]
    table += [f"| {label} | {a} | {b} |" for label, a, b in rows]
    imports = figures["imports"]
    machine = ["| figure | value |", "|---|---|"] + [
        f"| {key} | {figures[key]} |" for key in ("date", "cpu_count", "platform", "python", "pyside6", "qt_platform")]
    lines = ["# Start-up time (process start to main window shown)", "",
             f"Command: `{figures['benchmark_command']}`, measuring `{figures['command']}`", "",
             *machine, "", *table, "",
             f"Target: warm median ≤ {figures['target_ms']} ms: **{verdict}** ({shown['median']} ms).", "",
             "Costliest top-level imports (`-X importtime`, cumulative): "
             + ", ".join(f"{name} {ms} ms" for name, ms in imports["top_level_ms"]) + ".", "",
             "Costliest imports by their own time (`-X importtime`, self): "
             + ", ".join(f"{name} {ms} ms" for name, ms in imports["self_ms"]) + ".", "",
             "Training libraries imported at start-up: " + (", ".join(imports["training_libraries_imported"]) or "none")
             + "."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print()
    print(f"{'':>16} {'shown ms':>9} {'wall ms':>8}")
    for label, a, b in rows:
        print(f"{label.split(' of ')[0]:>16} {a:>9} {b:>8}")
    print(f"target {figures['target_ms']} ms (warm median): {verdict}")
    print("top-level imports: " + ", ".join(f"{name} {ms} ms" for name, ms in imports["top_level_ms"]))
    print("imports by own time: " + ", ".join(f"{name} {ms} ms" for name, ms in imports["self_ms"]))
    print("training libraries imported: " + (", ".join(imports["training_libraries_imported"]) or "none"))
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    raise SystemExit(main())
