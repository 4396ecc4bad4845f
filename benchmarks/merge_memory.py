"""Peak RAM of `tunesmith export` (merged, then GGUF) for an 8B-shaped model, in a 16 GiB box.

Builds a random-weight model with the exact shapes of our catalogue's Llama-3.1-8B-Instruct
config, saved in bf16 as four ~5 GB safetensors shards (as Meta ships it), and a rank-16 LoRA
adapter on every linear layer of every block (random A and B, so every adapted weight really
changes). The tokenizer is the demo model's (49,152 tokens, padded to the 8B vocabulary in the
GGUF); weights and tokenizer are not the real model's, only the sizes are.

Then runs the real command line, `tunesmith export ADAPTER --format merged` and `--format gguf
--quant f16`, each in a child process. Where this machine allows (root, a cgroup v1 or v2 memory
controller) the child runs inside a cgroup whose memory limit is `--ram` (default 16 GiB: the
machine a hobbyist merges on), so the export sees that much RAM and is killed if it takes more.
The child's peak resident memory is the kernel's own high-water mark (ru_maxrss), and the RSS is
sampled every 0.25 s with the progress line it belonged to.

Goal (issue 16): the merge peaks under 2 x the largest base shard + the adapter.
Every run is appended to benchmarks/results/merge_memory-cpu.json and .md, never replaced.

Usage: python benchmarks/merge_memory.py [--work /tmp/tunesmith-merge-bench] [--ram 16] [--keep]
       [--model meta-llama--Llama-3.2-1B-Instruct --out /tmp/try]   (a quick try of the script itself)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
CATALOG = ROOT / "resources" / "catalog"
MODEL = "meta-llama--Llama-3.1-8B-Instruct"
SHARD_BYTES = 5 * 10**9
RANK, ALPHA = 16, 32
GIB = 2**30
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunesmith-merge-bench"))
    parser.add_argument("--ram", type=float, default=16.0, help="GiB the export may use (a cgroup limit)")
    parser.add_argument("--keep", action="store_true", help="keep the model files afterwards")
    parser.add_argument("--model", default=MODEL, help="a catalogue folder whose config gives the shapes (Llama only)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child)
    from benchmarks.common import commit, machine

    config = json.loads((CATALOG / args.model / "config.json").read_text())
    model_bytes = _parameters(config) * 2
    needed = model_bytes * 3.2
    args.work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.work).free
    if free < needed:
        print(f"{args.work}: {free / GIB:.0f} GiB free, this benchmark needs {needed / GIB:.0f} GiB "
              "(base, merged and GGUF copies of an 8B model); pass --work on a bigger disk", file=sys.stderr)
        return 2
    base, adapter = args.work / "base", args.work / "adapter"
    started = time.time()
    shards = build_base(base, config) if not (base / "model.safetensors.index.json").exists() else _shard_sizes(base)
    adapter_bytes = build_adapter(adapter, base, config)
    print(f"model written in {time.time() - started:.0f} s: {len(shards)} shards, largest "
          f"{max(shards) / GIB:.2f} GiB; adapter {adapter_bytes / 2**20:.0f} MiB", flush=True)
    cgroup = make_cgroup(int(args.ram * GIB))
    row = {"started": time.strftime("%Y-%m-%d %H:%M"), "commit": commit(), "machine": machine(),
           "model": f"{args.model.split('--')[-1]} shapes, random bf16 weights", "parameters": _parameters(config),
           "base_shards_bytes": shards, "adapter_bytes": adapter_bytes,
           "goal_bytes": 2 * max(shards) + adapter_bytes, "ram_limit_bytes": int(args.ram * GIB) if cgroup else None,
           "cgroup": str(cgroup) if cgroup else "none (no writable memory cgroup; peak still measured)",
           "exports": []}
    try:
        for fmt, extra in (("merged", ["--dtype", "bf16"]), ("gguf", ["--quant", "f16"])):
            out = args.work / f"export-{fmt}"
            shutil.rmtree(out, ignore_errors=True)
            result = run_export(adapter, out, fmt, extra, cgroup)
            result["files_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.exists() else 0
            row["exports"].append(result)
            print(f"{fmt}: exit {result['exit']}, peak RSS {result['peak_rss'] / GIB:.2f} GiB "
                  f"(goal {row['goal_bytes'] / GIB:.2f} GiB), {result['wall_s']:.0f} s", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if cgroup:
            cgroup.rmdir()
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    write(row, args.out / "merge_memory-cpu")
    return 0 if all(e["exit"] == 0 and e["peak_rss"] < row["goal_bytes"] for e in row["exports"]) else 1


# -- the model -----------------------------------------------------------------------------------------
def build_base(folder: Path, config: dict) -> list[int]:
    """Random bf16 weights with the config's shapes, in ~5 GB shards, plus the demo tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from app.core.models.demo_model import ensure_demo_model

    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in
                  AutoModelForCausalLM.from_config(LlamaConfig(**config)).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    shards, pending, size, weight_map = [], {}, 0, {}

    def flush():
        nonlocal pending, size
        name = f".shard-{len(shards) + 1}"
        save_file(pending, str(folder / name), metadata={"format": "pt"})
        shards.append((name, list(pending), size))
        pending, size = {}, 0

    for name, shape in shapes.items():
        tensor = torch.empty(shape, dtype=torch.float32)
        tensor.normal_(0, 1.0 if name.endswith("norm.weight") else 0.02, generator=generator)
        tensor = tensor.to(torch.bfloat16)
        if pending and size + tensor.numel() * 2 > SHARD_BYTES:
            flush()
        pending[name], size = tensor, size + tensor.numel() * 2
    flush()
    for number, (temporary, names, _) in enumerate(shards, 1):
        final = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        os.replace(folder / temporary, folder / final)
        weight_map.update(dict.fromkeys(names, final))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(s for *_, s in shards)}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps(config | {"torch_dtype": "bfloat16"}, indent=1))
    demo = Path(ensure_demo_model())
    for file in demo.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copyfile(file, folder / file.name)
    return _shard_sizes(folder)


def build_adapter(folder: Path, base: Path, config: dict) -> int:
    """Rank-16 LoRA factors for every linear layer of every block, in PEFT's file layout."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * (config.get("head_dim") or hidden // config["num_attention_heads"])
    dims = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, kv), "self_attn.v_proj": (hidden, kv),
            "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
            "mlp.down_proj": (inter, hidden)}
    generator, tensors = torch.Generator().manual_seed(1), {}
    for layer in range(config["num_hidden_layers"]):
        for module, (fan_in, fan_out) in dims.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, fan_in, generator=generator) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, RANK, generator=generator) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": RANK,
        "lora_alpha": ALPHA, "lora_dropout": 0.0, "target_modules": sorted({m.split(".")[1] for m in dims}),
        "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True}, indent=1))
    return (folder / "adapter_model.safetensors").stat().st_size


def _parameters(config: dict) -> int:
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * (config.get("head_dim") or hidden // config["num_attention_heads"])
    block = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden
    heads = 1 if config.get("tie_word_embeddings") else 2
    return layers * block + heads * config["vocab_size"] * hidden + hidden


def _shard_sizes(folder: Path) -> list[int]:
    return [f.stat().st_size for f in sorted(folder.glob("model-*.safetensors"))]


# -- the measured export -------------------------------------------------------------------------------
def make_cgroup(limit: int) -> Path | None:
    """A memory cgroup with `limit` below this process's own, or None where none can be made."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            parent, limit_file = Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max"
        elif "memory" in controllers.split(","):
            parent, limit_file = Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.limit_in_bytes"
        else:
            continue
        folder = parent / f"tunesmith-merge-bench-{os.getpid()}"
        try:
            folder.mkdir()
            (folder / limit_file).write_text(str(limit))
            return folder
        except OSError:
            try:
                folder.rmdir()
            except OSError:
                pass
    return None


def run_export(adapter: Path, out: Path, fmt: str, extra: list[str], cgroup: Path | None) -> dict:
    report = out.parent / f".{fmt}-child.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(report), "export", str(adapter),
               "--format", fmt, "--out", str(out), *extra]

    def enter_cgroup():
        if cgroup:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=enter_cgroup, cwd=ROOT)
    lines, samples, current = [], [], {"line": "starting"}

    def sample():
        while process.poll() is None:
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
                rss = int(next(x for x in status.splitlines() if x.startswith("VmRSS:")).split()[1]) * 1024
                samples.append((round(time.time() - started, 2), rss, current["line"]))
            except (OSError, StopIteration, ValueError):
                pass
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in process.stdout:
        line = line.rstrip()
        lines.append(line)
        current["line"] = line[:120]
        print(f"  {line}", flush=True)
    code = process.wait()
    sampler.join()
    child_report = json.loads(report.read_text()) if report.exists() else {}
    report.unlink(missing_ok=True)
    by_line: dict[str, int] = {}
    for _, rss, line in samples:
        by_line[line] = max(by_line.get(line, 0), rss)
    peak_line = max(by_line, key=by_line.get) if by_line else ""
    return {"format": fmt, "args": extra, "exit": code, "wall_s": round(time.time() - started, 1),
            "peak_rss": child_report.get("maxrss", max((s[1] for s in samples), default=0)),
            "peak_sampled": max((s[1] for s in samples), default=0), "peak_during": peak_line,
            "killed": code < 0, "output_tail": lines[-8:],
            "rss_by_step": [{"step": line, "max_rss": rss} for line, rss in by_line.items()]}


def child(argv: list[str]) -> int:
    """Run the command line in this process and leave its peak RSS beside it."""
    report, cli_args = Path(argv[0]), argv[1:]
    from app import cli

    code = 1
    try:
        code = cli.main(cli_args)
    finally:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        report.write_text(json.dumps({"exit": code, "maxrss": maxrss}))
    return code


def write(row: dict, stem: Path) -> None:
    from benchmarks.common import load_history, save_history

    history = load_history(stem)
    history["runs"].append(row)
    save_history(stem, history)
    lines = ["# Peak RAM of `tunesmith export` for an 8B-shaped model", "",
             "Written by `python benchmarks/merge_memory.py`; every run kept. Random bf16 weights with a catalogue "
             "model's shapes (Llama-3.1-8B-Instruct: 8.03B parameters, four ~5 GB shards) and a random rank-16 LoRA "
             "on every linear layer of the blocks; the real command line, each export in a child process inside a "
             "memory cgroup of the RAM limit shown. Peak RSS is the child's ru_maxrss; *peak during* is the "
             "progress line being shown when the sampled RSS was highest. Goal: under 2 x the largest base shard "
             "+ the adapter.", "",
             "| started | commit | CPU | model | RAM limit | export | exit | peak RSS GiB | goal GiB | peak during | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in history["runs"]:
        limit = f"{run['ram_limit_bytes'] / GIB:.0f} GiB cgroup" if run["ram_limit_bytes"] else "none"
        for export in run["exports"]:
            lines.append(f"| {run['started']} | {run['commit']} | {run['machine']['cpu']} | {run['model'].split()[0]} | {limit} | "
                         f"{export['format']} {' '.join(export['args'])} | {export['exit']} | "
                         f"{export['peak_rss'] / GIB:.2f} | {run['goal_bytes'] / GIB:.2f} | "
                         f"{export['peak_during'][:70].replace('|', '/')} | {export['wall_s']:.0f} |")
    lines += [""] + [f"- {run['started']}: {run['note']}" for run in history["runs"] if run.get("note")]
    lines += ["", "Base shards (GiB): " + ", ".join(f"{s / GIB:.2f}" for s in history["runs"][-1]["base_shards_bytes"])
              + f"; adapter {history['runs'][-1]['adapter_bytes'] / 2**20:.0f} MiB.", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
