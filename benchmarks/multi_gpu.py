"""A run on several processes against one, on equal work: the demo model, the same data, the same
global batch (N processes with accumulation 1 against one process accumulating N micro-batches),
the same seed and steps, LoRA dropout 0 so that the adapters can be compared; the N processes
once per strategy (DDP replicas, FSDP shards).

On a machine without a GPU the N processes are gloo workers sharing the CPU's cores (torchrun
gives each one thread; the single process uses them all), so this measures the overhead of the
multi-process path and checks the adapters agree, not a speed-up; on a machine with N GPUs (run it
there when one is lent) it measures the scaling. Per configuration: the whole run's wall time
(start-up included), the steps' tokens/s as the run reports it, the largest process's peak RSS,
and the max abs difference of the LoRA weights from the one-process run. Every run is appended to
benchmarks/results/multi_gpu-<device>.json and .md, never replaced.

Usage: python benchmarks/multi_gpu.py [--processes 2] [--steps 6] [--repeats 2] [--seq-len 512]
                                     [--strategies ddp,fsdp]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import commit, load_history, machine, save_history  # noqa: E402

DATA = ROOT / "resources" / "data" / "pirate_chef.jsonl"
# One configuration, in a fresh process, printing its result as JSON on the last line.
CHILD = r"""
import json, resource, sys, time
from app.core.config import TrainConfig
from app.core.events import StepMetrics
from app.core.runs import Run, read_history
from app.core.train.trainer import run_training
gpus, accum, steps, seq = (int(v) for v in sys.argv[1:5])
strategy = sys.argv[6]
speeds = []
started = time.perf_counter()
result = run_training(TrainConfig(model="demo", data=sys.argv[5], seq_len=seq, micro_batch=1, grad_accum=accum,
                                  max_steps=steps, save_every=1000, lora_dropout=0.0, quantize="4bit", gpus=gpus,
                                  strategy=strategy),
                      lambda e: speeds.append(e.tokens_per_s) if isinstance(e, StepMetrics) else None)
wall = time.perf_counter() - started
rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"status": result.status, "reason": result.reason, "wall_s": round(wall, 1),
                  "tokens_per_s": round(speeds[-1], 1) if speeds else None, "peak_rss_mib": round(rss / 1024),
                  "adapter": result.adapter_dir, "losses": read_history(Run(result.run_dir)).losses}))
"""


def run_one(gpus: int, accum: int, steps: int, seq: int, home: Path, strategy: str = "auto") -> dict:
    import os

    env = {**os.environ, "TUNESMITH_HOME": str(home)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(gpus), str(accum), str(steps), str(seq), str(DATA),
                           strategy],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"gpus={gpus}: the run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def convert_demo(home: Path) -> None:
    import os

    subprocess.run([sys.executable, "-c", "from app.core.models.demo_model import ensure_demo_model; "
                    "ensure_demo_model()"], check=True, env={**os.environ, "TUNESMITH_HOME": str(home)}, cwd=ROOT)


def max_difference(a: str, b: str) -> float:
    from safetensors.torch import load_file

    first = load_file(str(Path(a) / "adapter_model.safetensors"))
    second = load_file(str(Path(b) / "adapter_model.safetensors"))
    return max(float((first[k] - second[k]).abs().max()) for k in first)


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--strategies", default="ddp,fsdp", help="for the N processes (comma-separated)")
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shared = os.environ.get("TUNESMITH_HOME")
    rows = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            home = Path(shared) if shared else Path(tmp)
            convert_demo(home)  # once per home, before either run is timed
            one = run_one(1, args.processes, args.steps, args.seq_len, home)
            runs = [(1, "", one)] + [(args.processes, strategy, run_one(args.processes, 1, args.steps, args.seq_len,
                                                                        home, strategy))
                                     for strategy in args.strategies.split(",")]
            for processes, strategy, row in runs:
                difference = max_difference(one["adapter"], row["adapter"])
                rows.append({"repeat": repeat + 1, "processes": processes, "strategy": strategy,
                             "status": row["status"],
                             "wall_s": row["wall_s"], "tokens_per_s": row["tokens_per_s"],
                             "peak_rss_mib": row["peak_rss_mib"], "final_loss": row["losses"][-1],
                             "max_abs_lora_difference": difference})
                print(rows[-1], flush=True)
    results = ROOT / "benchmarks" / "results" / f"multi_gpu-{device}"
    history = load_history(results)
    history["runs"].append({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit(),
                            "machine": machine(), "device": device, "processes": args.processes,
                            "steps": args.steps, "seq_len": args.seq_len, "seed": 42, "rows": rows})
    save_history(results, history)
    write_markdown(results, history)


def write_markdown(results: Path, history: dict) -> None:
    lines = ["# One process against several, on equal work", "",
             "`python benchmarks/multi_gpu.py`: the demo model (4-bit), the pirate-chef data, packed rows of "
             "`seq_len` tokens, the same global batch (N processes with accumulation 1 against one with "
             "accumulation N; DDP: each process a replica, FSDP: the 4-bit weights, LoRA and optimizer state "
             "sharded), seed 42, LoRA dropout 0. Without a GPU the N processes are gloo workers "
             "sharing the same CPU cores (one thread each; the single process uses them all): this shows the "
             "multi-process path's overhead and that the adapters agree, not a speed-up. Wall time includes "
             "start-up (N processes each load the model); tokens/s is the run's own figure at its last step; "
             "RSS is the largest process's peak.", ""]
    for number, run in enumerate(history["runs"], 1):
        m = run["machine"]
        lines += [f"## Run {number}: {run['date']}, commit {run['commit']}", "",
                  f"{m['cpu']}, {m['cores']} cores, AVX-512 {'yes' if m['avx512f'] else 'no'}; {run['device']}, "
                  f"{run['steps']} steps of {run['seq_len']} tokens x {run['processes']}", "",
                  "| repeat | processes | strategy | wall | tokens/s | peak RSS | final loss "
                  "| max abs LoRA difference |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in run["rows"]:
            strategy = r.get("strategy", "ddp" if r["processes"] > 1 else "")  # runs before FSDP: DDP
            lines.append(f"| {r['repeat']} | {r['processes']} | {strategy or '-'} | {r['wall_s']:.1f} s | "
                         f"{r['tokens_per_s']:,.0f} | "
                         f"{r['peak_rss_mib']:,} MiB | {r['final_loss']:.4f} | {r['max_abs_lora_difference']:.2e} |")
        lines.append("")
    results.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
