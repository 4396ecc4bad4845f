"""Packed-row attention on this CPU: SDPA per example (the loop) against one masked SDPA call.

For each shape (query/kv heads and head dim of a real model, a row of 1,024 or 4,096 tokens
holding 1, 4 or 20 examples of seeded uneven lengths) it times one layer's attention forward and
backward in fp32 (the CPU's compute dtype), the two paths alternating, `--repeats` times each
after a warm-up, and reports the median, the spread (min-max) and the ratio masked / loop. The
mask is built once per batch and shared by the layers, so its build is timed apart (once per
batch, not per layer) and not in the per-layer times. Ratios are what to read; absolute times
depend on the machine, stated at the top of the results.
Results: benchmarks/results/packed_attention-cpu.md and .json.

Usage: python benchmarks/packed_attention_cpu.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MODELS = {"SmolLM2-135M": (9, 3, 64), "Qwen2.5-0.5B": (14, 2, 64)}  # heads, kv heads, head dim
ROWS = (1024, 4096)
EXAMPLES = (1, 4, 20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each path per shape")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    rows = []
    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    for model, (heads, kv_heads, dim) in MODELS.items():
        for tokens in ROWS:
            for count in EXAMPLES:
                row = measure(torch, heads, kv_heads, dim, tokens, count, args.repeats)
                rows.append({"model": model, "heads": heads, "kv_heads": kv_heads, "head_dim": dim, **row})
                print(f"{model} {tokens} tokens, {count} examples: loop {row['loop_ms']['median']} ms, "
                      f"masked {row['masked_ms']['median']} ms, masked/loop {row['ratio']}x", flush=True)
    write(rows, args, time.perf_counter() - started, load_before)
    return 0


def measure(torch, heads: int, kv_heads: int, dim: int, tokens: int, count: int, repeats: int) -> dict:
    from app.core.train.memory_savers import packed_attention

    generator = torch.Generator().manual_seed(tokens * 100 + count)
    q, k, v = (torch.randn(1, h, tokens, dim, generator=generator) for h in (heads, kv_heads, kv_heads))
    segments = split(tokens, count, seed=count)
    layer = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    paths = {"loop": packed_attention.packed_loop, "masked": packed_attention.packed_masked_sdpa}
    times = {name: [] for name in paths}
    for run in range(repeats + 1):  # the first round warms up and is not counted
        for name, function in paths.items():
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            begin = time.perf_counter()
            out, _ = function(layer, qq, kk, vv, None, scaling=dim ** -0.5, segments=segments)
            out.sum().backward()
            if run:
                times[name].append((time.perf_counter() - begin) * 1000)
    builds = []
    for _ in range(3):
        packed_attention.clear_mask_cache()
        begin = time.perf_counter()
        packed_attention.block_causal_mask(segments, torch.float32, "cpu")
        builds.append((time.perf_counter() - begin) * 1000)
    packed_attention.clear_mask_cache()
    loop, masked = (summary(times[name]) for name in paths)
    return {"tokens": tokens, "examples": count, "lengths": [e - s for s, e in segments],
            "loop_ms": loop, "masked_ms": masked, "ratio": round(masked["median"] / loop["median"], 2),
            "mask_build_ms_per_batch": round(statistics.median(builds), 2) if count > 1 else 0.0}


def split(tokens: int, count: int, seed: int) -> tuple[tuple[int, int], ...]:
    cuts = sorted(random.Random(seed).sample(range(1, tokens), count - 1))
    bounds = [0, *cuts, tokens]
    return tuple(zip(bounds[:-1], bounds[1:]))


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "runs": [round(x, 2) for x in values]}


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    import torch

    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}


def write(rows: list[dict], args, seconds: float, load_before: list[float]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    facts = machine() | {"load_average_at_start": load_before}
    command = f"python benchmarks/packed_attention_cpu.py --repeats {args.repeats}"
    data = {"benchmark": "packed_attention-cpu", "date": time.strftime("%Y-%m-%d %H:%M"), "command": command,
            "dtype": "float32", "pass": "forward + backward of one layer's attention", "machine": facts,
            "seconds": round(seconds, 1), "rows": rows}
    (RESULTS / "packed_attention-cpu.json").write_text(json.dumps(data, indent=2) + "\n")
    flags = ", ".join(f"{flag} {'yes' if facts[flag] else 'no'}" for flag in ("avx2", "avx512f", "avx512_bf16",
                                                                            "amx_bf16"))
    lines = [
        f"# Packed attention on the CPU: SDPA per example (loop) vs one masked SDPA call ({facts['cpu']})", "",
        f"Command: `{command}`  ",
        f"Date: {data['date']}; {facts['cpu']}, {facts['cores']} cores, torch {facts['torch']} with "
        f"{facts['torch_threads']} threads; {flags}; load average (1, 5, 15 min) "
        f"{facts['load_average_at_start']} at the start, {facts['load_average_at_end']} at the end "
        "(other work on the machine slows the loop's many small calls the most).  ",
        "One layer's attention, forward + backward, fp32; median of the timed runs (the range in brackets), "
        "the two paths alternating. The mask is built once per batch and shared by every layer, so its build "
        "is a column of its own, not part of the per-layer times.", "",
        "| model (heads / kv heads x dim) | row tokens | examples | loop ms | masked ms | masked / loop | "
        "mask build ms per batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        loop, masked = row["loop_ms"], row["masked_ms"]
        lines.append(f"| {row['model']} ({row['heads']} / {row['kv_heads']} x {row['head_dim']}) | {row['tokens']} "
                     f"| {row['examples']} | {loop['median']} [{loop['min']}-{loop['max']}] | {masked['median']} "
                     f"[{masked['min']}-{masked['max']}] | {row['ratio']}x | {row['mask_build_ms_per_batch']} |")
    ratios = [row["ratio"] for row in rows if row["examples"] > 1]
    lines += ["", f"Rows of several examples: the masked call takes {min(ratios)}x-{max(ratios)}x the loop's time "
              "(it computes the whole tokens x tokens square; the loop only each example's own triangle). "
              "With one example the masked path is plain causal SDPA, the same work as the loop. Hence "
              "`batched_path_for('cpu', None) == 'loop'` in app/core/train/memory_savers/packed_attention.py.",
              f"Total benchmark time: {data['seconds']} s.", ""]
    (RESULTS / "packed_attention-cpu.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
