"""The largest training step's memory at long lengths, rung by rung of the long-context ladder (CPU).

Each rung is measured with benchmarks/memory_calibration.measure: a random-weight model with the
demo's shape (SmolLM2-135M-Instruct: hidden 576, MLP 1,536, 9 heads / 3 kv heads, 49,152 tokens;
`--model` another catalogued shape),
cut to `--layers` decoder layers so that a long step runs in minutes on a CPU (the per-layer terms
are what the rungs change; the weights are not), 4-bit base, rank 16, fp32 compute, one packed row
of `--tokens` tokens, the fused loss, one warm-up step then the measured one. The step's peak is the
allocator's own bookkeeping replayed from the torch profiler (memory_probe.PeakMemory).

Rungs: plain; gradient checkpointing; checkpointing + the MLP over tiles of `--tile` tokens;
checkpointing + each layer but attention over tiles of `--layer-tile` tokens (offloaded
checkpoints are CUDA-only: on the CPU the input stays where it is, so the figures would be
checkpointing's). Each row has the warm step's time (no profiler running), from the same run, side
by side. Every run is appended to benchmarks/results/long_context-cpu.json and .md, never replaced.

Usage: python benchmarks/long_context.py [--tokens 8192] [--layers 4] [--tile 1024] [--layer-tile 1024]
       [--model HuggingFaceTB/SmolLM2-1.7B-Instruct] [--rungs checkpointing,layer]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results" / "long_context-cpu"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

from common import commit, load_history, machine, save_history  # noqa: E402
from memory_calibration import measure  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--layer-tile", type=int, default=1024)
    parser.add_argument("--model", default=MODEL, help="a catalogued model whose shape to measure (random weights)")
    parser.add_argument("--rungs", default="plain,checkpointing,mlp,layer",
                        help="which rungs, comma-separated: plain, checkpointing, mlp, layer")
    args = parser.parse_args()
    rungs = {"plain": ("plain", False, 0, 0), "checkpointing": ("checkpointing", True, 0, 0),
             "mlp": (f"checkpointing + MLP tiles of {args.tile}", True, args.tile, 0),
             "layer": (f"checkpointing + layer tiles of {args.layer_tile}", True, 0, args.layer_tile)}
    rungs = [rungs[name] for name in args.rungs.split(",")]
    rows = []
    for name, checkpointing, tile, layer_tile in rungs:
        started = time.perf_counter()
        row = measure(args.model, args.tokens, 16, checkpointing, 1, device="cpu", dtype="float32", warm_steps=1,
                      loss="chunked", layers=args.layers, batching="packed", lora_dropout=0.05, mlp_tile=tile,
                      layer_tile=layer_tile)
        rows.append({"rung": name, "seconds_two_steps": round(time.perf_counter() - started, 1),
                     "warm_step_seconds": row["warm_step_seconds"],
                     "step_bytes": row["step_bytes"], "step_predicted": row["step_predicted"],
                     "peak_allocated": row["peak_allocated"], "peak_predicted": row["peak_predicted"]})
        print(rows[-1], flush=True)
    history = load_history(RESULTS)
    history["runs"].append({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit(),
                            "machine": machine(), "model": args.model, "layers": args.layers, "tokens": args.tokens,
                            "rows": rows})
    save_history(RESULTS, history)
    write_markdown(history)


def write_markdown(history: dict) -> None:
    lines = ["# Long-context rungs: the largest step's memory (CPU)", "",
             "`python benchmarks/long_context.py`: the demo's shape cut to a few layers, 4-bit base, "
             "rank 16, fp32, one packed row, fused loss; the step = memory a training step adds above "
             "the weights and optimizer state (allocator replay). `predicted` is the planner's "
             "estimate at that commit; run 1's (e07893b) did not count the MLP tiles yet: its tiled "
             "rung shows the untiled prediction.", ""]
    for number, run in enumerate(history["runs"], 1):
        m = run["machine"]
        lines += [f"## Run {number}: {run['date']}, commit {run['commit']}", "",
                  f"{m['cpu']}, {m['cores']} cores, AVX-512 {'yes' if m['avx512f'] else 'no'}; "
                  f"{run['model']} shape, {run['layers']} layers, {run['tokens']:,} tokens"
                  + (f". Note: {run['note']}" if run.get("note") else ""), "",
                  "| rung | step (measured) | step (predicted) | warm step | two steps and the model's build |",
                  "|---|---|---|---|---|"]
        for r in run["rows"]:
            warm = f"{r['warm_step_seconds']:.1f} s" if r.get("warm_step_seconds") else "not timed"
            lines.append(f"| {r['rung']} | {r['step_bytes'] / 2**20:,.0f} MiB | {r['step_predicted'] / 2**20:,.0f} MiB "
                         f"| {warm} | {r['seconds_two_steps']:.0f} s |")
        lines.append("")
    RESULTS.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
