"""How closely the merged model matches base + adapter as tested, by merge target and precision.

Trains the demo (SmolLM2-135M-Instruct on the pirate-chef sample, the demo's own settings) twice in
a temporary Tunesmith home: once unquantised (what `tunesmith demo` does on a CPU) and once as a
QLoRA run on an NF4 base (bitsandbytes' CPU kernels). Then exports each as `--format merged` with
the real export code, and compares with base + adapter as tested (the export's own check: 4
held-out prompts and the 32-token greedy answers base + adapter gives them; for the QLoRA run the
reference base holds its NF4-rounded weights, computed in fp32):

- QLoRA run: `--merge-into trained` (the default) and `original`, each at f32 (the merge target's
  effect alone) and at the default precision (`--dtype auto`);
- both runs: `--dtype` bf16, f16, f32 and auto, and the bf16 and f16 files computed in fp32 (the
  storage's effect without the 16-bit compute's).

Every run is appended to benchmarks/results/merge_agreement-cpu.json and .md, never replaced.
Usage: python benchmarks/merge_agreement.py [--seed 0] [--work /tmp/tunesmith-merge-agreement]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results" / "merge_agreement-cpu"

from common import commit, load_history, machine, save_history  # noqa: E402


def train(quantize: str, seed: int) -> tuple[str, float]:
    from dataclasses import replace

    from app.core.demo import demo_config
    from app.core.train.trainer import run_training

    config = replace(demo_config(), name=f"demo-{quantize}", quantize=quantize, seed=seed)
    started = time.perf_counter()
    result = run_training(config)
    if result.status != "finished":
        raise SystemExit(f"the {quantize} demo run ended {result.status}: {result.reason}")
    return str(result.run_dir), time.perf_counter() - started


def fp32_compute(run_dir: str, merged_dir: Path) -> dict:
    """The stored 16-bit weights computed in fp32, against the export's own reference."""
    import torch
    from transformers import AutoModelForCausalLM

    from app.core.adapters import find_adapter
    from app.core.adapters import adapter_tokenizer
    from app.core.export.merged_model import _agreement, tested_reference
    from app.core.models.resolve import resolve_model

    source = find_adapter(run_dir)
    info = resolve_model(source.base)
    reference = tested_reference(source, info, adapter_tokenizer(source, info, False))
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        after = [model(ids).logits.float() for ids in reference.sequences]
    return _agreement(reference.logits, after, lambda message: None)


def export(run_dir: str, out: Path, dtype: str, into: str = "trained") -> dict:
    from app.core.export.exporter import ExportOptions, export_run

    started = time.perf_counter()
    result = export_run(run_dir, "merged", out, ExportOptions(dtype=dtype, merge_into=into, force=True))
    checks = result.checks
    return {"dtype": checks.get("dtype", dtype), "asked": dtype, "merge_into": checks.get("merged_into"),
            "top_token_agreement": checks.get("top_token_agreement"), "max_logit_diff": checks.get("max_logit_diff"),
            "dtype_choice": checks.get("dtype_choice", ""), "seconds": round(time.perf_counter() - started, 1)}


def measure(run_dir: str, work: Path, quantised: bool) -> list[dict]:
    rows = []
    targets = ("trained", "original") if quantised else ("trained",)
    for into in targets:
        for dtype in ("f32", "bf16", "f16", "auto"):
            out = work / f"merged-{Path(run_dir).name}-{into}-{dtype}"
            row = export(run_dir, out, dtype, into)
            rows.append({**row, "compute": row["dtype"]})
            if row["dtype"] in ("bf16", "f16") and dtype != "auto":
                rows.append({**row, **fp32_compute(run_dir, out), "compute": "f32"})
            shutil.rmtree(out, ignore_errors=True)
            print(rows[-1], flush=True)
    return rows


def write_markdown(history: dict) -> None:
    lines = ["# Merged model vs base + adapter as tested (CPU)", "",
             "`python benchmarks/merge_agreement.py`: the demo trained unquantised and as a QLoRA run, "
             "exported `--format merged` at each precision; agreement = the same next token as base + "
             "adapter as tested over 4 held-out prompts and their 32-token answers (the export's own "
             "check). `stored`/`compute`: the file's precision and the one it was run in.", ""]
    for number, run in enumerate(history["runs"], 1):
        lines += [f"## Run {number}: {run['date']}, commit {run['commit']}, seed {run['seed']}", "",
                  f"{run['machine']['cpu']}, {run['machine']['cores']} cores, AVX-512 "
                  f"{'yes' if run['machine']['avx512f'] else 'no'}; training: unquantised "
                  f"{run['train_seconds']['none']:.0f} s, QLoRA {run['train_seconds']['4bit']:.0f} s", "",
                  "| run | merge into | --dtype | stored | compute | same next token | max logit diff | why |",
                  "|---|---|---|---|---|---|---|---|"]
        for kind, rows in run["results"].items():
            for r in rows:
                lines.append(f"| {kind} | {r['merge_into']} | {r['asked']} | {r['dtype']} | {r['compute']} | "
                             f"{r['top_token_agreement']:.1%} | {r['max_logit_diff']:.3g} | {r['dtype_choice']} |")
        lines.append("")
    RESULTS.with_suffix(".md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunesmith-merge-agreement"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    os.environ["TUNESMITH_HOME"] = str(args.work / "home")
    seconds, results = {}, {}
    for quantize, kind in (("none", "unquantised"), ("4bit", "QLoRA (NF4 base)")):
        run_dir, seconds[quantize] = train(quantize, args.seed)
        results[kind] = measure(run_dir, args.work, quantize == "4bit")
    history = load_history(RESULTS)
    history["runs"].append({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit(),
                            "machine": machine(), "seed": args.seed,
                            "train_seconds": {k: round(v, 1) for k, v in seconds.items()}, "results": results})
    save_history(RESULTS, history)
    write_markdown(history)
    print(f"wrote {RESULTS.with_suffix('.md')}")


if __name__ == "__main__":
    main()
