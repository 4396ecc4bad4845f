"""Throughput: Tunesmith's plan against TRL's SFTTrainer, on the same data and the same real tokens.

For each data set (the shipped sample set, and a synthetic long-tail chat set this script generates,
see `long_tail_chats`) and each seed, three recipes train the same model, each in its own process
(so its peak memory is its own), in an order rotated from seed to seed (so background load falls on
all of them alike):

- **trl-seed**: TRL's SFTTrainer with the seed QLoRA recipe, padded batches (benchmarks/trl_recipes.py);
- **trl-best**: TRL's fastest documented setting for the job: padding-free BFD packing (trl_recipes.py);
- **tunesmith**: the plan Tunesmith makes within the memory our estimator predicts for trl-seed.

All three use the same examples, rendered and truncated to the same sequence length (the planner's),
the same trained tokens (assistant turns; TRL's tokens are checked against ours), LoRA r16/alpha32
on all linear layers, NF4 with double quantisation, lr 2e-4 cosine with 3 % warmup, grad norm 0.3,
and about the same real tokens per optimizer step. Each stops at the first optimizer step whose
running total of real (non-padding) input tokens reaches --tokens N, its schedule sized to end there.

Reported per run: real tokens/s over the timed steps (all but the first, a warm-up: tokens of steps
2..k over the time from the end of step 1 to the end of step k), peak memory (CPU: the training
process's peak RSS; CUDA: torch max allocated), and the held-out loss at exactly N tokens: the mean
token loss on the assistant tokens of the held-out examples, computed by one evaluator
(`evaluate_adapters`) for the adapters saved after steps k-1 and k, interpolated linearly to N.
Every run is written to benchmarks/results/throughput-trl-<device>.md/.json as it finishes.

Usage: python benchmarks/throughput.py [--tokens 20000] [--seeds 0,1,2] [--sets sample,longtail]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_recipes import describe_trl, peak_bytes, run_trl, trl_settings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HELD_OUT = 24  # examples of each set kept for the loss comparison
SETS = ("sample", "longtail")
RECIPES = ("trl-seed", "trl-best", "tunesmith")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000, help="real tokens each run trains on (N)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; each trains every recipe")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated: sample, longtail")
    parser.add_argument("--model", default="demo", help="model to train (default: the demo model)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results files "
                        "(default benchmarks/results; a trial run of the script goes elsewhere)")
    parser.add_argument("--add-base-losses", type=Path, metavar="RESULTS_JSON",
                        help="measure only the base models' held-out losses and add them to a results file "
                             "written before the runs measured them")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        work = {"tunesmith": train_tunesmith, "eval": evaluate_adapters}.get(job["recipe"], run_trl)
        print(json.dumps(work(job)))
        return 0
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not sets or any(s not in SETS for s in sets) or not seeds:
        parser.error(f"--sets takes a comma-separated list of {', '.join(SETS)}; --seeds one of integers")

    from app.core.paths import cache_dir

    if args.add_base_losses:
        return add_base_losses(args.add_base_losses)
    report = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M"), "tokens": args.tokens,
              "seeds": seeds, "model": args.model, "command": "python benchmarks/throughput.py " + " ".join(
                  f"--{k} {v}" for k, v in (("tokens", args.tokens), ("seeds", args.seeds), ("sets", args.sets),
                                            ("model", args.model))),
              "requested_sets": sets, "sets": {}, "rows": [], "out": str(args.out)}
    shared_cache = cache_dir()
    with tempfile.TemporaryDirectory(prefix="tunesmith-throughput-") as home:
        shared_cache.mkdir(parents=True, exist_ok=True)
        (Path(home) / "cache").symlink_to(shared_cache, target_is_directory=True)
        os.environ["TUNESMITH_HOME"] = home  # runs go to a throw-away store, the model cache is kept
        for name in sets:
            train, val = make_set(name, args.model, Path(home))
            setup = set_up(name, args.model, train, args.tokens)
            report["sets"][name] = setup["info"]
            setup["info"]["base_held_out_loss"] = base_losses(args.model, val, setup["plan"], Path(home))
            for position, seed in enumerate(seeds):
                order = RECIPES[position % 3:] + RECIPES[:position % 3]
                for slot, recipe in enumerate(order):
                    row = run_one(name, recipe, seed, slot, setup, train, val, args, Path(home))
                    report["rows"].append(row)
                    write(report, partial=True)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    write(report, partial=False)
    return 0


# -- data ---------------------------------------------------------------------------------------
def make_set(name: str, model: str, folder: Path) -> tuple[Path, Path]:
    """The training and held-out files of set `name`, written to `folder`."""
    if name == "sample":
        from app.core.resources import sample_dataset

        lines = sample_dataset().read_text(encoding="utf-8").splitlines()
        lines = [line for line in lines if line.strip()]
    else:
        lines = [json.dumps({"messages": m}) for m in long_tail_chats(model, 2000 + HELD_OUT)]
    random.Random(7).shuffle(lines)
    train, val = folder / f"{name}-train.jsonl", folder / f"{name}-val.jsonl"
    train.write_text("\n".join(lines[HELD_OUT:]) + "\n", encoding="utf-8")
    val.write_text("\n".join(lines[:HELD_OUT]) + "\n", encoding="utf-8")
    return train, val


LONG_TAIL = ("2,024 chats (system, user, assistant), token lengths drawn from a log-normal with median 200 "
             "and sigma 0.9, clipped to 32-2,048, every 200th chat exactly 2,048; the tasks cycle through "
             "counting, repeating 8 words and reversing 6 words, the answer grown to the drawn length")


def long_tail_chats(model: str, count: int, seed: int = 0) -> list[list[dict]]:
    """`count` chats whose token lengths follow a long tail between 32 and 2,048 (median ~200):
    counting, repeating and reversing tasks whose answers grow to the drawn length."""
    from app.core.models.load import load_tokenizer
    from app.core.models.resolve import resolve_model

    tokenizer = load_tokenizer(resolve_model(model))
    rng = random.Random(seed)
    words = ("amber basil cedar delta ember fable garnet harbor iris juniper kettle lantern meadow "
             "nutmeg orchid pepper quartz river saffron timber umber velvet willow yarrow zephyr").split()
    chats = []
    for k in range(count):
        target = 2048 if k % 200 == 0 else min(2048, max(32, round(rng.lognormvariate(math.log(200), 0.9))))
        task = k % 3
        if task == 0:
            start, step = rng.randint(1, 500), rng.randint(1, 9)
            prompt = f"Count from {start} in steps of {step}."
            items = [str(start + i * step) for i in range(1200)]
        elif task == 1:
            chosen = [rng.choice(words) for _ in range(8)]
            prompt = "Repeat these words over and over: " + " ".join(chosen)
            items = [chosen[i % len(chosen)] for i in range(2400)]
        else:
            chosen = [rng.choice(words) for _ in range(6)]
            prompt = "Say these words backwards, again and again: " + " ".join(chosen)
            items = [chosen[::-1][i % len(chosen)] for i in range(2400)]
        system = {"role": "system", "content": "Answer briefly."}

        def chat(n: int) -> list[dict]:
            return [system, {"role": "user", "content": prompt},
                    {"role": "assistant", "content": ", ".join(items[:max(1, n)])}]

        def length(n: int) -> int:
            return len(tokenizer.apply_chat_template(chat(n), tokenize=True, return_dict=False))

        low, high = 1, len(items)  # the most items whose chat fits the target length
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if length(mid) <= target else (low, mid - 1)
        chats.append(chat(low))
    return chats


# -- plans --------------------------------------------------------------------------------------
def set_up(name: str, model: str, train: Path, tokens: int) -> dict:
    """Everything the runs of one set share: the planner's sequence length, Tunesmith's plan within
    the memory our estimator predicts for the TRL seed recipe, the TRL settings, and the examples."""
    from app.core.config import TrainConfig
    from app.core.data.validate import check_file
    from app.core.plan.memory import estimate_memory, setup_for
    from app.core.plan.planner import plan_run
    from app.core.plan.presets import training_budget
    from app.core.train.prepare import prepare_training
    from app.core.units import gib

    base = TrainConfig(model=model, data=str(train), rank=16, save_every=100_000, lora_dropout=0.05)
    prepared = prepare_training(base)
    lengths = [len(e.input_ids) for e in prepared.train]  # truncated to the planned sequence length
    facts = prepared.model.arch
    budget, seq = training_budget("auto"), prepared.plan.seq_len
    seed_like = replace(base, seq_len=seq, micro_batch=4, grad_checkpointing=True, packing=False)
    seed_plan = plan_run(seed_like, prepared.stats, lengths, False, facts, budget)
    # TRL's SFTTrainer computes its loss through a chunked LM head, never the full logits
    predicted = estimate_memory(facts, setup_for(replace(seed_plan, loss="chunked"))).peak
    within = replace(budget, usable_bytes=predicted, source="our estimate of the TRL seed recipe's peak")
    ours = plan_run(replace(base, seq_len=seq), prepared.stats, lengths, False, facts, within)
    per_step = sum(lengths) / ours.steps_per_epoch
    trl = {r: trl_settings(r, ours.to_dict(), statistics.mean(lengths), per_step) for r in RECIPES[:2]}
    stats = sorted(lengths)
    info = {
        "examples": len(lengths), "held_out": HELD_OUT, "seq_len": seq, "real_tokens_per_epoch": sum(lengths),
        "trained_tokens_per_epoch": sum(e.trained_tokens for e in prepared.train),
        "lengths": {"mean": round(statistics.mean(stats)), "p50": stats[len(stats) // 2],
                    "p90": stats[int(0.9 * len(stats))], "p99": stats[int(0.99 * len(stats))], "max": stats[-1]},
        "distribution": LONG_TAIL if name == "longtail" else "the shipped sample set (resources/data)",
        "budget": f"{gib(predicted)} ({within.source})", "tunesmith_reasons": ours.reasons,
        "recipes": {"tunesmith": describe(ours.to_dict()), **{r: describe_trl(s, seq) for r, s in trl.items()}},
    }
    return {"info": info, "plan": ours, "lengths": lengths, "trl": trl, "model_path": str(prepared.model.path),
            "messages": [e.messages for e in check_file(str(train)).examples],
            "ours": {"input_ids": [e.input_ids for e in prepared.train], "labels": [e.labels for e in prepared.train]}}


def describe(plan: dict) -> str:
    shape = (f"packed rows of {plan['micro_batch'] * plan['seq_len']} tokens" if plan["batching"] == "packed"
             else f"{plan['micro_batch']} x up to {plan['seq_len']} tokens, {plan['batching']} padded")
    return (f"{shape}, x{plan['grad_accum']} per step, checkpointing {'on' if plan['grad_checkpointing'] else 'off'}, "
            f"{plan['loss']} loss, attention {plan['attention'] or 'sdpa'}, base {plan.get('quantize', '4bit')}")


def steps_to_reach(plan, lengths: list[int], seed: int, tokens: int) -> int:
    """The first optimizer step of `plan` at which the run has trained `tokens` real tokens."""
    from app.core.data.batches import EpochBatches

    order, steps, seen = EpochBatches(lengths, plan, seed), 0, 0
    while seen < tokens:
        seen += sum(min(lengths[i], plan.seq_len) for batch in order.for_step(steps) for i in batch)
        steps += 1
    return steps


# -- one run, in its own process ------------------------------------------------------------------
def run_one(name: str, recipe: str, seed: int, slot: int, setup: dict, train: Path, val: Path, args,
            home: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"{name}-{recipe}-{seed}-", dir=home))
    job = {"recipe": recipe, "seed": seed, "tokens": args.tokens, "model": args.model, "train": str(train),
           "out": str(out)}
    if recipe == "tunesmith":
        steps = steps_to_reach(setup["plan"], setup["lengths"], seed, args.tokens)
        job["plan"] = replace(setup["plan"], total_steps=steps, warmup_steps=math.ceil(0.03 * steps), eval_every=0,
                              save_every=max(1, steps - 1)).to_dict()
    else:
        job |= {"plan": setup["plan"].to_dict(), "settings": setup["trl"][recipe], "model_path": setup["model_path"],
                "train_messages": setup["messages"], "ours": setup["ours"]}
    print(f"[{name}] seed {seed}: training {recipe}", flush=True)
    began = time.monotonic()
    figures = run_worker(job, out)
    wall = time.monotonic() - began
    adapters = [figures["adapter"]] + ([figures["adapter_before"]] if len(figures["step_tokens"]) > 1 else [])
    # each adapter is evaluated on the base it was trained on: TRL's on NF4, ours on the plan's
    quantize = setup["plan"].quantize if recipe == "tunesmith" else "4bit"
    losses = run_worker({"recipe": "eval", "model": args.model, "val": str(val), "adapters": adapters,
                         "plan": setup["plan"].to_dict(), "quantize": quantize}, out)["losses"]
    cumulative = [sum(figures["step_tokens"][:i + 1]) for i in range(len(figures["step_tokens"]))]
    at_n = losses[0]
    if len(losses) == 2:  # interpolate between the steps before and after N
        (t0, t1), (l1, l0) = cumulative[-2:], losses
        at_n = l0 + (l1 - l0) * (args.tokens - t0) / (t1 - t0)
    timed = figures["elapsed_s"][-1] - figures["elapsed_s"][0]
    row = {"set": name, "seed": seed, "slot": slot + 1, "recipe": recipe, "steps": len(cumulative),
           "real_tokens": cumulative[-1], "tokens_before_last_step": cumulative[-2] if len(cumulative) > 1 else 0,
           "tokens_per_s": round(sum(figures["step_tokens"][1:]) / timed, 1) if timed > 0 else None,
           "peak_gib": round(figures["peak_bytes"] / 2 ** 30, 3), "held_out_loss": round(at_n, 4),
           "held_out_loss_last_step": round(losses[0], 4), "train_loss": figures["train_loss"],
           "run_wall_s": round(wall, 1), "step_tokens": figures["step_tokens"],
           "step_elapsed_s": [round(t, 2) for t in figures["elapsed_s"]], "load_average": list(os.getloadavg()),
           "notes": figures.get("notes", "") or figures.get("tokens_match", "")}
    print(f"[{name}] seed {seed} {recipe}: {row['steps']} steps, {row['real_tokens']} real tokens, "
          f"{row['tokens_per_s']} tokens/s, peak {row['peak_gib']} GiB, held-out loss {row['held_out_loss']}",
          flush=True)
    return row


def base_losses(model: str, val: Path, plan, home: Path) -> dict:
    """The held-out loss of the base model without an adapter, on each base the recipes train on
    (TRL's NF4, and the plan's own when it differs): where each recipe started from."""
    out = Path(tempfile.mkdtemp(prefix="base-", dir=home))
    return {quantize: round(run_worker({"recipe": "eval", "model": model, "val": str(val), "adapters": [None],
                                        "plan": plan.to_dict(), "quantize": quantize}, out)["losses"][0], 4)
            for quantize in dict.fromkeys(["4bit", plan.quantize])}


def add_base_losses(results: Path) -> int:
    """Add the base losses to a results file whose runs finished before the script measured them:
    the same sets (rebuilt: their examples and held-out split are deterministic) and plans."""
    from dataclasses import replace as _replace

    from app.core.config import Plan
    from app.core.paths import cache_dir

    report = json.loads(results.read_text())
    with tempfile.TemporaryDirectory(prefix="tunesmith-throughput-") as home:
        (Path(home) / "cache").symlink_to(cache_dir(), target_is_directory=True)
        os.environ["TUNESMITH_HOME"] = home
        for name, info in report["sets"].items():
            _, val = make_set(name, report["model"], Path(home))
            quantize = "none" if "base none" in info["recipes"]["tunesmith"] else "4bit"
            plan = _replace(Plan(), seq_len=info["seq_len"], quantize=quantize, device=report["machine"]["kind"],
                            compute_dtype="float32" if report["machine"]["kind"] == "cpu" else "bfloat16")
            info["base_held_out_loss"] = base_losses(report["model"], val, plan, Path(home))
            info["base_held_out_loss_note"] = (f"measured {time.strftime('%Y-%m-%d %H:%M')} by --add-base-losses "
                                               f"at commit {machine()['app_commit']}, after the runs")
    report["out"] = str(results.parent)
    write(report, partial=report.get("partial", False))
    return 0


def run_worker(job: dict, out: Path) -> dict:
    path = out / f"job-{job['recipe']}.json"
    path.write_text(json.dumps(job))
    done = subprocess.run([sys.executable, __file__, "--worker", str(path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise SystemExit(f"{job['recipe']} worker failed:\n{done.stderr[-3000:]}{done.stdout[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def train_tunesmith(job: dict) -> dict:
    import torch

    from app.core.config import Plan, TrainConfig
    from app.core.events import PlanAdjusted, StepMetrics
    from app.core.train.prepare import prepare_training
    from app.core.train.trainer import train_prepared

    plan = Plan.from_dict(job["plan"])
    config = TrainConfig(model=job["model"], data=job["train"], rank=plan.rank, seq_len=plan.seq_len,
                         lora_dropout=0.05, seed=job["seed"], save_every=plan.save_every)
    prepared = prepare_training(config, plan=plan)
    steps, notes = [], []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train_prepared(prepared, lambda e: (steps.append(e) if isinstance(e, StepMetrics) else
                                                 notes.append(e.message) if isinstance(e, PlanAdjusted) else None))
    if result.status != "finished":
        raise SystemExit(f"run {result.status}: {result.reason}")
    peak = peak_bytes(torch.cuda.is_available())
    before = Path(result.run_dir) / "checkpoints" / f"step-{plan.total_steps - 1:07d}"
    return {"step_tokens": [s.tokens for s in steps], "elapsed_s": [s.elapsed_s for s in steps], "peak_bytes": peak,
            "train_loss": round(steps[-1].loss, 4), "adapter": result.adapter_dir, "adapter_before": str(before),
            "notes": "; ".join(notes)}


def evaluate_adapters(job: dict) -> dict:
    """The held-out loss of each adapter: summed cross-entropy over the assistant tokens of every
    held-out example (one at a time, no padding) over their number; one function for all recipes,
    on the base the adapters were trained on (`job["quantize"]`: NF4 or unquantised)."""
    import torch
    from peft import PeftModel

    from app.core.config import Plan
    from app.core.data.packing import collate_padded
    from app.core.data.tokenize import ensure_chat_template, tokenize_examples
    from app.core.data.validate import check_file
    from app.core.models.load import load_base_model, load_tokenizer
    from app.core.models.resolve import resolve_model
    from app.core.train.prepare import truncate
    from app.core.train.loss import loss_sum

    plan = Plan.from_dict(job["plan"])
    info = resolve_model(job["model"])
    tokenizer = load_tokenizer(info)
    ensure_chat_template(tokenizer)
    examples, _, _ = truncate(tokenize_examples(tokenizer, check_file(job["val"]).examples, job["val"]).examples,
                              plan.seq_len)
    base = load_base_model(info, getattr(torch, plan.compute_dtype), plan.device, attention="sdpa",
                           quantize=job["quantize"])
    base.config.use_cache = False
    losses = []
    for adapter in job["adapters"]:  # None: the base model itself
        model = (PeftModel.from_pretrained(base, adapter) if adapter else base).eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for example in examples:
                batch = collate_padded([example], tokenizer.pad_token_id)
                total += float(loss_sum(model, batch, torch.device(plan.device), "plain"))
                count += batch.trained_tokens
        losses.append(total / count)
        base = model.unload() if adapter else base
    return {"losses": losses}


# -- report -------------------------------------------------------------------------------------
def machine() -> dict:
    import torch

    flags = set()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    versions = {}
    for package in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = "not installed"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "app"], capture_output=True, text=True,
                           cwd=Path(__file__).parent).stdout.strip()
    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name(0) if cuda else f"CPU: {cpu}, {os.cpu_count()} cores",
            "kind": "cuda" if cuda else "cpu", "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY", ""), "threads": torch.get_num_threads(),
            "load_average_start": list(os.getloadavg()), "versions": versions,
            "app_commit": commit + (" + uncommitted changes in app/" if dirty else ""), "python": platform.python_version()}


def summarise(rows: list[dict]) -> list[dict]:
    summary = []
    for name in dict.fromkeys(r["set"] for r in rows):
        by = {k: [r for r in rows if r["set"] == name and r["recipe"] == k] for k in RECIPES}
        for recipe, runs in by.items():
            if not runs:
                continue
            speeds = [r["tokens_per_s"] for r in runs]
            entry = {"set": name, "recipe": recipe, "runs": len(runs), "tokens_per_s_median": statistics.median(speeds),
                     "tokens_per_s_min": min(speeds), "tokens_per_s_max": max(speeds),
                     "peak_gib_median": statistics.median(r["peak_gib"] for r in runs),
                     "held_out_loss_mean": round(statistics.mean(r["held_out_loss"] for r in runs), 4),
                     "held_out_loss_min": min(r["held_out_loss"] for r in runs),
                     "held_out_loss_max": max(r["held_out_loss"] for r in runs)}
            ours = by["tunesmith"]
            if recipe != "tunesmith" and ours:
                paired = [(o, t) for o in ours for t in runs if o["seed"] == t["seed"]]
                ratios = [o["tokens_per_s"] / t["tokens_per_s"] for o, t in paired]
                entry |= {"tunesmith_speedup": round(statistics.median(r["tokens_per_s"] for r in ours)
                                                     / entry["tokens_per_s_median"], 2),
                          "speedup_per_seed": [round(x, 2) for x in ratios],
                          "tunesmith_peak_ratio": round(statistics.median(r["peak_gib"] for r in ours)
                                                        / entry["peak_gib_median"], 2),
                          "tunesmith_loss_diff_pct": round(100 * (statistics.mean(r["held_out_loss"] for r in ours)
                                                                  / entry["held_out_loss_mean"] - 1), 2)}
            summary.append(entry)
    return summary


def write(report: dict, partial: bool) -> None:
    m = report["machine"]
    capability = f"-{m['ATEN_CPU_CAPABILITY']}" if m["ATEN_CPU_CAPABILITY"] else ""
    sets = "" if report["requested_sets"] == list(SETS) else "-" + "-".join(report["requested_sets"])
    stem = f"throughput-trl-{m['kind']}{capability}{sets}"
    report["summary"], report["partial"] = summarise(report["rows"]), partial
    out = Path(report["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    memory = "peak RSS of the training process" if m["kind"] == "cpu" else "torch max allocated"
    lines = [f"# Throughput: Tunesmith against TRL's SFTTrainer ({m['device']})", "",
             f"Command: `{report['command']}`" + (f" with ATEN_CPU_CAPABILITY={m['ATEN_CPU_CAPABILITY']}"
                                                   if m["ATEN_CPU_CAPABILITY"] else "") + "  ",
             f"Started {report['started']}; app at commit {m['app_commit']}; " + ", ".join(
                 f"{k} {v}" for k, v in m["versions"].items()) + f"; python {m['python']}.  ",
             f"Machine: {m['device']}; CPU flags {' '.join(m['cpu_flags'])}; torch's CPU kernels "
             f"{m['torch_cpu_capability']}; {m['threads']} threads; load average (1, 5, 15 min) at start "
             f"{m['load_average_start']}, at end {m.get('load_average_end', 'n/a (still running)')}.  ",
             f"N = {report['tokens']:,} real tokens per run; seeds {report['seeds']}; model {report['model']}; "
             f"{HELD_OUT} held-out examples per set." + (" **Partial: the benchmark is still running.**" if partial else ""),
             ""]
    for name, info in report["sets"].items():
        lines += [f"## {name}", "", f"{info['examples']} training examples ({info['distribution']}); token lengths "
                  f"{info['lengths']}; sequence length {info['seq_len']}; {info['real_tokens_per_epoch']:,} real, "
                  f"{info['trained_tokens_per_epoch']:,} trained tokens per epoch. Memory budget for Tunesmith's "
                  f"plan: {info['budget']}." + (" Held-out loss of the base model without an adapter: " + ", ".join(
                      f"{loss} ({'NF4' if q == '4bit' else 'unquantised'})" for q, loss in
                      info["base_held_out_loss"].items()) + "." if info.get("base_held_out_loss") else ""), ""]
        lines += [f"- **{recipe}**: {text}" for recipe, text in info["recipes"].items()]
        lines += ["", "| seed | order | recipe | steps | real tokens (before last step) | real tokens/s | "
                  f"{memory} GiB | held-out loss at N (at last step) | train loss | run s | load avg (1 min) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['seed']} | {r['slot']} | {r['recipe']} | {r['steps']} | {r['real_tokens']:,} "
                  f"({r['tokens_before_last_step']:,}) | {r['tokens_per_s']} | {r['peak_gib']} | {r['held_out_loss']} "
                  f"({r['held_out_loss_last_step']}) | {r['train_loss']} | {r['run_wall_s']} | {r['load_average'][0]:.2f} |"
                  for r in report["rows"] if r["set"] == name]
        lines += ["", "| recipe | runs | real tokens/s: median (min-max) | peak GiB (median) | held-out loss: mean "
                  "(min-max) | Tunesmith speed-up: of medians (per seed) | Tunesmith memory ratio | Tunesmith loss diff |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in (s for s in report["summary"] if s["set"] == name):
            ratio = (f"**{s['tunesmith_speedup']}x** ({', '.join(f'{x}x' for x in s['speedup_per_seed'])})"
                     if "tunesmith_speedup" in s else "")
            lines.append(f"| {s['recipe']} | {s['runs']} | {s['tokens_per_s_median']} ({s['tokens_per_s_min']}-"
                         f"{s['tokens_per_s_max']}) | {s['peak_gib_median']} | {s['held_out_loss_mean']} "
                         f"({s['held_out_loss_min']}-{s['held_out_loss_max']}) | {ratio} | "
                         f"{s.get('tunesmith_peak_ratio', '')} | "
                         + (f"{s['tunesmith_loss_diff_pct']:+.2f} %" if "tunesmith_loss_diff_pct" in s else "") + " |")
        bases = info.get("base_held_out_loss") or {}
        if len(bases) > 1:  # the recipes started from different bases: compare how far each fell
            ours = "4bit" if "base 4bit" in info["recipes"]["tunesmith"] else "none"
            falls = []
            for s in (s for s in report["summary"] if s["set"] == name):
                start = bases[ours if s["recipe"] == "tunesmith" else "4bit"]
                falls.append(f"{s['recipe']} {100 * (1 - s['held_out_loss_mean'] / start):.1f} % (from {start})")
            lines += ["", "The recipes start from different bases (TRL's NF4, Tunesmith's unquantised), so their "
                      "held-out losses differ before any training; the fall of each from its own base's loss: "
                      + "; ".join(falls) + "."]
        lines.append("")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
