"""Check the memory estimator against real QLoRA steps, and record the figures.

For each configuration of a grid (model x sequence length x rank x checkpointing x micro-batch)
it builds a random-weight model from a catalogue config.json (no download), loads it in NF4 with
double quantisation exactly as training does, wraps it with LoRA and runs real optimizer steps
through `QLoraSession`. It then measures:

- the bytes of the 4-bit weights, the 16-bit weights kept, the LoRA weights and optimizer state,
  counted from the tensors themselves;
- the peak of one training step: `torch.cuda.max_memory_allocated`/`reserved` and the NVML peak
  on CUDA; on CPU the torch profiler's allocator events (the same bookkeeping);

and writes them next to `app.core.plan.memory.estimate_memory`'s prediction, with the ratio, as
`benchmarks/results/memory_calibration-<device>.{json,md}`.

    python benchmarks/memory_calibration.py            # CPU: a small grid (about 5 minutes)
    python benchmarks/memory_calibration.py --full     # CUDA: the full grid, 7-8B at 2k and 8k
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("app") is None:  # the installed Tunesmith (an offline kit's), else this checkout
    sys.path.insert(0, str(ROOT))

from app.core.config import Plan, TrainConfig  # noqa: E402
from app.core.models.architecture import arch_facts  # noqa: E402
from app.core.models.random_weights import shape_config as model_config  # noqa: E402,F401 - the benchmarks' name
from app.core.models.random_weights import write_random_model  # noqa: E402,F401
from app.core.plan.memory import MemorySetup, estimate_memory  # noqa: E402
from app.core.units import GIB  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# (catalogue id, seq_len, rank, checkpointing, micro_batch)
CPU_GRID = [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", 256, 16, False, 1),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", 512, 16, False, 1),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", 256, 16, False, 2),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", 512, 64, False, 1),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", 512, 16, True, 1),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", 1024, 16, True, 2),
    ("Qwen/Qwen2.5-0.5B-Instruct", 256, 16, False, 1),
    ("Qwen/Qwen2.5-0.5B-Instruct", 512, 16, True, 1),
]
GPU_GRID = [
    (model, seq, rank, ckpt, micro)
    for model, seqs in [("Qwen/Qwen2.5-0.5B-Instruct", (512, 2048)),
                        ("meta-llama/Llama-3.2-1B-Instruct", (512, 2048)),
                        ("meta-llama/Llama-3.2-3B-Instruct", (2048,)),
                        ("meta-llama/Llama-3.1-8B-Instruct", (2048, 8192)),
                        ("Qwen/Qwen2.5-7B-Instruct", (2048,))]
    for seq in seqs
    for rank, ckpt, micro in [(16, True, 1), (16, False, 1), (64, True, 2)]
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the GPU grid (needs CUDA)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps before the measured one")
    parser.add_argument("--only", default="", help="run only models whose id contains this")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="compute dtype (default: bfloat16 on CUDA, float32 on CPU as training uses)")
    args = parser.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    grid = GPU_GRID if args.full else CPU_GRID
    rows = []
    for spec in grid:
        if args.only and args.only.lower() not in spec[0].lower():
            continue
        dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
        row = measure(*spec, device=device, dtype=dtype, warm_steps=args.steps)
        rows.append(row)
        print(_line(row), flush=True)
    write_results(rows, device, args.dtype)
    return 0


def measure(model_id: str, seq_len: int, rank: int, checkpointing: bool, micro_batch: int,
            device: str, dtype: str, warm_steps: int, loss: str = "plain", layers: int | None = None,
            folder: Path | None = None, batching: str = "grouped", attention: str = "",
            quantize: str = "4bit", examples_per_row: int = 1, lora_dropout: float = 0.05,
            mlp_tile: int = 0, offload_checkpoints: bool = False, layer_tile: int = 0, method: str = "sft") -> dict:
    """Build, load, train a few steps and measure one configuration. `method` "dpo"/"orpo": the
    examples are preference pairs (a packed row of whole pairs; padded, `micro_batch` pairs of two
    rows each, one side nearly `seq_len` long), DPO's reference computed before the first step. `folder`: the random model
    already written by `write_random_model` for the same `model_id` and `layers`. `batching`
    "packed": each micro-batch is one row of `micro_batch x seq_len` tokens made of
    `examples_per_row` examples of different lengths, attended by `attention` (default: what a
    CPU plan picks, SDPA per example); "grouped": `micro_batch` padded rows of `seq_len` tokens.
    `quantize` "none": the base unquantised in `dtype`, as the planner's 16-bit-base plans."""

    from app.core.plan.kernel_choice import PACKED_LOOP, choose_attention
    from app.core.train.memory_probe import PeakMemory, optimizer_bytes, weight_bytes
    from app.core.train.session import QLoraSession

    config = model_config(model_id, layers)
    facts = arch_facts(config)
    packed = batching == "packed"
    if not attention:  # what a CPU plan picks: SDPA per example when packed; SDPA, or eager for Gemma 2
        attention = PACKED_LOOP if packed else choose_attention(False, "cpu", None, "auto", facts.attention_softcap)[0]
    plan = Plan(rank=rank, lora_alpha=2 * rank, seq_len=seq_len, micro_batch=micro_batch, grad_accum=1,
                grad_checkpointing=checkpointing, total_steps=warm_steps + 1, steps_per_epoch=1,
                compute_dtype=dtype, device=device, loss=loss, batching=batching, attention=attention,
                quantize=quantize, optimizer="paged_adamw_8bit" if device == "cuda" else "adamw_torch",
                mlp_tile=mlp_tile, offload_checkpoints=offload_checkpoints, layer_tile=layer_tile)
    with tempfile.TemporaryDirectory() as tmp:
        if folder is None:
            folder = Path(tmp)
            write_random_model(config, folder, dtype)
        session = QLoraSession(_prepared(folder, config, plan, lora_dropout, method))
        batch = (_packed_row(facts.vocab, seq_len * micro_batch, examples_per_row) if packed
                 else _batch(facts.vocab, seq_len, micro_batch))
        if method != "sft":
            batch = _as_pairs(batch, seq_len, packed)
            _reference(session, batch)
        for _ in range(warm_steps):
            started = time.perf_counter()
            session.train_step([batch])
            warm_seconds = time.perf_counter() - started  # the last warm step's time (no profiler)
        nvml = _NvmlPeak(device)
        with PeakMemory(device) as probe:
            session.train_step([batch])
        nvml.stop()
        weights = weight_bytes(session.model)
        state = optimizer_bytes(session.optimizer)
        lora_params = session.trainable_parameters
        ran = session.plan  # the self-test may have replaced the optimizer or attention
        session.release()
    rows = 2 if method != "sft" and not packed else 1  # the planner's rows_per_example
    estimate = predict(facts, rank=rank, seq_len=seq_len, micro_batch=micro_batch * rows, checkpointing=checkpointing,
                       dtype=dtype, optimizer=ran.optimizer, device=device, loss=loss, attention=ran.attention,
                       quantize=quantize, lora_dropout=lora_dropout, mlp_tile=mlp_tile,
                       offload_checkpoints=offload_checkpoints, layer_tile=layer_tile)
    static = weights.quantized + weights.kept + weights.lora + state
    measured_peak = static + probe.peak
    predicted_step = (estimate.activations + estimate.logits + estimate.transient + estimate.lora_gradients)
    predicted_peak = estimate.peak - estimate.runtime_overhead
    gc.collect()
    return {
        "model": model_id, "layers": facts.layers, "params": facts.total_params, "seq_len": seq_len,
        "rank": rank, "method": method, "loss": loss, "batching": batching, "attention": ran.attention, "quantize": quantize,
        "examples_per_row": examples_per_row if packed else 1, "lora_dropout": lora_dropout,
        "checkpointing": checkpointing, "mlp_tile": mlp_tile, "offload_checkpoints": offload_checkpoints,
        "layer_tile": layer_tile,
        "micro_batch": micro_batch, "dtype": dtype, "host_offload_predicted": estimate.host_offload,
        "quantized_bytes": weights.quantized, "quantized_predicted": estimate.quantized_weights,
        "kept_bytes": weights.kept, "kept_predicted": estimate.kept_weights,
        "lora_params": lora_params, "lora_params_predicted": estimate.lora_params,
        "optimizer_bytes": state, "optimizer_predicted": estimate.optimizer_state,
        "step_bytes": probe.peak, "step_predicted": predicted_step,
        "peak_allocated": measured_peak, "peak_predicted": predicted_peak,
        "peak_reserved": probe.reserved, "nvml_peak": nvml.peak,
        "predicted_with_overhead": estimate.peak, "warm_step_seconds": round(warm_seconds, 2) if warm_steps else None,
    }


def predict(facts, *, rank: int, seq_len: int, micro_batch: int, checkpointing: bool, dtype: str, optimizer: str,
            device: str, loss: str, attention: str, quantize: str = "4bit", lora_dropout: float = 0.05,
            mlp_tile: int = 0, offload_checkpoints: bool = False, layer_tile: int = 0):
    """The estimator's figures for one configuration as `measure` trains it; `.peak -
    .runtime_overhead` is what `measure` calls peak_predicted."""
    return estimate_memory(facts, MemorySetup(rank=rank, seq_len=seq_len, micro_batch=micro_batch,
                                              grad_checkpointing=checkpointing, mlp_tile=mlp_tile,
                                              offload_checkpoints=offload_checkpoints, layer_tile=layer_tile,
                                              compute_dtype=dtype, optimizer=optimizer, device=device, loss=loss,
                                              attention=attention, quantize=quantize, lora_dropout=lora_dropout > 0))


def _as_pairs(examples: list, seq_len: int, packed: bool) -> list:
    """The examples as preference pairs: packed, each example split in two sides (the row stays
    the same tokens); padded, each row a pair whose chosen side is all but 8 of its tokens."""
    from app.core.data.tokenize import Tokenized

    pairs = []
    for example in examples:
        n = len(example.input_ids)
        split = n // 2 if packed else n - 8
        ids = example.input_ids if packed else example.input_ids[:split] + example.input_ids[:8]
        pairs.append(Tokenized(example.line, ids, list(ids), split=split))
    return pairs


def _reference(session, pairs: list) -> None:
    """DPO's reference log-probs of `pairs` (the adapter off, no gradients), as a run computes them."""
    from app.core.train.preference import compute_reference

    if session.preference.method == "dpo":
        numbered = [replace(pair, line=index) for index, pair in enumerate(pairs)]
        pairs[:] = numbered
        session.preference.reference = compute_reference(session.model, session.collate, len(pairs),
                                                         {"train": pairs}, session.device, adapter_off=True)


def _prepared(folder: Path, config: dict, plan: Plan, lora_dropout: float = 0.05, method: str = "sft"):
    from app.core.models.facts import ModelFacts, arch_or_none
    from app.core.train.prepare import Prepared

    info = ModelFacts(folder.name, "folder", str(folder), folder, folder / "config.json", config,
                      arch_or_none(config), list(folder.glob("*.safetensors")))
    return Prepared(TrainConfig(model=str(folder), data="(random tokens)", lora_dropout=lora_dropout, method=method),
                    info, SimpleNamespace(pad_token_id=0), [], [], None, plan, {})


def _batch(vocab: int, seq_len: int, micro_batch: int):
    import torch

    from app.core.data.tokenize import Tokenized

    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(micro_batch):
        ids = torch.randint(1, vocab, (seq_len,), generator=generator).tolist()
        rows.append(Tokenized(0, ids, ids))
    return rows


def _packed_row(vocab: int, tokens: int, count: int):
    """`count` examples of different lengths (each about twice the one before) filling one
    packed row of `tokens` tokens, every token trained (the estimator's worst case)."""
    import torch

    from app.core.data.tokenize import Tokenized

    weights = [2 ** k for k in range(count)]
    lengths = [max(2, tokens * w // sum(weights)) for w in weights]
    lengths[-1] += tokens - sum(lengths)
    generator = torch.Generator().manual_seed(1)
    rows = []
    for index, n in enumerate(lengths):
        ids = torch.randint(1, vocab, (n,), generator=generator).tolist()
        rows.append(Tokenized(index, ids, ids))
    return rows


class _NvmlPeak:
    """Highest NVML `used` memory of GPU 0 seen by a 50 ms poller while the step runs."""

    def __init__(self, device: str):
        self.peak = 0
        self._stop = None
        if device != "cuda":
            return
        import threading

        from app.gpu.nvml import GpuPoller

        self._stop, poller = threading.Event(), GpuPoller(0)

        def poll():
            while not self._stop.wait(0.05):
                sample = poller.poll()
                self.peak = max(self.peak, (sample and sample.used_bytes) or 0)
            poller.close()

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join()


def write_results(rows: list[dict], device: str, dtype: str | None) -> None:
    import torch

    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": device, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "command": "python benchmarks/memory_calibration.py " + " ".join(sys.argv[1:])}
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(0)
    stem = RESULTS / f"memory_calibration-{device}{'-' + dtype if dtype else ''}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# Memory estimator vs measured ({device})", "",
             f"{meta['date']}, torch {meta['torch']}, `{meta['command']}`", "",
             "| model | seq | rank | ckpt | micro | 4-bit weights (meas / pred) | LoRA params (meas / pred) "
             "| step peak (meas / pred) | peak allocated (meas / pred) | pred / meas |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model'].split('/')[-1]} | {r['seq_len']} | {r['rank']} | {'on' if r['checkpointing'] else 'off'} "
            f"| {r['micro_batch']} | {_gib(r['quantized_bytes'])} / {_gib(r['quantized_predicted'])} "
            f"| {r['lora_params']:,} / {r['lora_params_predicted']:,} "
            f"| {_gib(r['step_bytes'])} / {_gib(r['step_predicted'])} "
            f"| {_gib(r['peak_allocated'])} / {_gib(r['peak_predicted'])} "
            f"| {r['peak_predicted'] / r['peak_allocated']:.3f} |")
    if device == "cuda":
        lines += ["", "| model | seq | max reserved | NVML peak | predicted with CUDA overhead |", "|---|---|---|---|---|"]
        lines += [f"| {r['model'].split('/')[-1]} | {r['seq_len']} | {_gib(r['peak_reserved'])} "
                  f"| {_gib(r['nvml_peak'])} | {_gib(r['predicted_with_overhead'])} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md")


def _gib(value: float) -> str:
    return f"{value / GIB:.3f} GiB"


def _line(r: dict) -> str:
    return (f"{r['model'].split('/')[-1]:24} seq {r['seq_len']:5} r{r['rank']:<3} ckpt {str(r['checkpointing']):5} "
            f"mb {r['micro_batch']}  4-bit {r['quantized_bytes'] / r['quantized_predicted']:.4f}x  "
            f"step {_gib(r['step_bytes'])} pred {_gib(r['step_predicted'])}  "
            f"peak {_gib(r['peak_allocated'])} pred {_gib(r['peak_predicted'])} "
            f"({r['peak_predicted'] / r['peak_allocated']:.3f})")


if __name__ == "__main__":
    raise SystemExit(main())
