"""Tunesmith's plan against the standard QLoRA recipe, side by side on the same data.

For each data set (the shipped sample set, and a synthetic long-tail chat set of 2,000 examples
of 32-2,048 tokens that this script generates) it trains the same model twice, each in its own
process so that peak memory is measured cleanly, alternating recipes:

- **baseline**, the standard recipe: micro-batches of 4 examples in shuffled order padded to the
  longest, gradient checkpointing always on, plain cross-entropy over full fp32 logits;
- **tunesmith**, the plan Tunesmith makes within the memory the baseline is predicted to need:
  padding-free packed rows, checkpointing only if that memory needs it, the fused loss.

Both use the planner's sequence length and tokens per optimizer step, the QLoRA recipe (NF4,
LoRA r16 on all linear layers, lr 2e-4, warmup 3 %, grad norm 0.3) and stop after the same number
of real (non-padding) tokens, then evaluate the same held-out examples. Reported: real tokens/s
(steps after the first two), peak memory (CUDA: max allocated; CPU: the process's peak RSS), the
held-out loss, and the ratios. Results: benchmarks/results/throughput-<device>.md and .json.

Usage: python benchmarks/throughput.py [--tokens 24000] [--sets sample,longtail] [--model demo]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
HELD_OUT = 24  # examples of each set kept for the loss comparison
SETS = ("sample", "longtail")
RECIPES = ("baseline", "tunesmith")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=24_000, help="real tokens each recipe trains on")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated: sample, longtail")
    parser.add_argument("--model", default="demo", help="model to train (default: the demo model)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.worker:
        return worker(json.loads(args.worker))
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if not sets or any(s not in SETS for s in sets):
        parser.error(f"--sets takes a comma-separated list of {', '.join(SETS)}")

    from app.core.paths import cache_dir

    shared_cache = cache_dir()
    with tempfile.TemporaryDirectory(prefix="tunesmith-throughput-") as home:
        shared_cache.mkdir(parents=True, exist_ok=True)
        (Path(home) / "cache").symlink_to(shared_cache, target_is_directory=True)
        os.environ["TUNESMITH_HOME"] = home  # runs go to a throw-away store, the model cache is kept
        rows = []
        for name in sets:
            train, val = make_set(name, args.model, Path(home))
            plans = make_plans(args.model, train, args.tokens)
            for recipe in RECIPES:
                print(f"[{name}] training {recipe}: {describe(plans[recipe])}", flush=True)
                job = {"model": args.model, "train": str(train), "val": str(val), "plan": plans[recipe]}
                figures = run_worker(job)
                figures |= run_worker({**job, "probe": True})
                rows.append({"set": name, "recipe": recipe, **figures, "plan": describe(plans[recipe])})
                print(f"[{name}] {recipe}: {figures['tokens_per_s']} real tokens/s, peak "
                      f"{figures['peak_gib']} GiB, held-out loss {figures['eval_loss']:.4f}", flush=True)
    write(rows, args)
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


def long_tail_chats(model: str, count: int, seed: int = 0) -> list[list[dict]]:
    """`count` chats whose token lengths follow a long tail between 32 and 2,048 (median ~200):
    counting, repeating and reversing tasks whose answers grow to the drawn length."""
    from app.core.models import load_tokenizer, resolve_model

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
def make_plans(model: str, train: Path, tokens: int) -> dict[str, dict]:
    """The baseline's and Tunesmith's plans for `train`, each trained until `tokens` real tokens."""
    from app.core.config import TrainConfig
    from app.core.data.batches import EpochBatches
    from app.core.memory import estimate_memory, setup_for
    from app.core.planner import plan_run
    from app.core.prepare import _arch_or_none, prepare_training
    from app.core.presets import training_budget

    base = TrainConfig(model=model, data=str(train), rank=16, save_every=100_000, lora_dropout=0.05)
    prepared = prepare_training(base)
    lengths = [len(e.input_ids) for e in prepared.train]
    facts = _arch_or_none(prepared.model.facts.config)
    budget = training_budget("auto")
    fixed = replace(base, seq_len=prepared.plan.seq_len, micro_batch=4, grad_checkpointing=True, packing=False)
    baseline = plan_run(fixed, prepared.stats, lengths, True, facts, budget)
    estimate = estimate_memory(facts, setup_for(replace(baseline, loss="plain")))
    baseline = replace(baseline, batching="random", loss="plain", predicted_peak_bytes=estimate.peak,
                       breakdown=estimate.to_dict())
    within = replace(budget, usable_bytes=estimate.peak, source="the baseline's predicted peak")
    ours = plan_run(replace(base, seq_len=prepared.plan.seq_len), prepared.stats, lengths, True, facts, within)
    plans = {}
    for name, plan in (("baseline", baseline), ("tunesmith", ours)):
        order = EpochBatches(lengths, plan, base.seed)
        steps, seen = 0, 0
        while seen < tokens:
            seen += sum(min(lengths[i], plan.seq_len) for batch in order.for_step(steps) for i in batch)
            steps += 1
        plans[name] = replace(plan, total_steps=steps, warmup_steps=math.ceil(0.03 * steps),
                              eval_every=steps, save_every=steps + 1).to_dict()
    return plans


def describe(plan: dict) -> str:
    shape = (f"packed rows of {plan['micro_batch'] * plan['seq_len']} tokens" if plan["batching"] == "packed"
             else f"{plan['micro_batch']} x up to {plan['seq_len']} tokens, {plan['batching']} padded")
    return (f"{shape}, x{plan['grad_accum']} per step, {plan['total_steps']} steps, checkpointing "
            f"{'on' if plan['grad_checkpointing'] else 'off'}, {plan['loss']} loss")


# -- one recipe, in its own process ------------------------------------------------------------
def run_worker(job: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise SystemExit(f"worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker(job: dict) -> int:
    if job.get("probe"):
        return probe_worst_step(job)
    import torch

    from app.core.config import Plan, TrainConfig
    from app.core.events import EvalMetrics, StepMetrics
    from app.core.prepare import prepare_training
    from app.core.trainer import train_prepared

    plan = Plan.from_dict(job["plan"])
    config = TrainConfig(model=job["model"], data=job["train"], val_data=job["val"], rank=plan.rank,
                         seq_len=plan.seq_len, lora_dropout=0.05, save_every=100_000)
    prepared = prepare_training(config, plan=plan)
    steps, evals = [], []
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = train_prepared(prepared, lambda e: (steps.append(e) if isinstance(e, StepMetrics) else
                                                 evals.append(e) if isinstance(e, EvalMetrics) else None))
    if result.status != "finished":
        raise SystemExit(f"run {result.status}: {result.reason}")
    measured = steps[2:]
    span = steps[-1].elapsed_s - steps[1].elapsed_s
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    print(json.dumps({
        "steps": len(steps), "real_tokens": sum(s.tokens for s in steps),
        "tokens_per_s": round(sum(s.tokens for s in measured) / span, 1),
        "peak_gib": round(peak / 2 ** 30, 3), "predicted_peak_gib": round(plan.predicted_peak_bytes / 2 ** 30, 3),
        "train_loss": round(steps[-1].loss, 4), "eval_loss": round(evals[-1].eval_loss, 4),
        "train_s": round(steps[-1].elapsed_s, 1),
    }))
    return 0


def probe_worst_step(job: dict) -> int:
    """The tensor memory of the recipe's largest possible micro-batch: a step on the 4 longest
    examples padded (baseline) or on the fullest packed row (Tunesmith), measured like
    `torch.cuda.max_memory_allocated` (on CPU by replaying the profiler's allocator events)."""
    from app.core.config import Plan, TrainConfig
    from app.core.data.packing import pack_examples
    from app.core.memory_probe import PeakMemory
    from app.core.prepare import prepare_training
    from app.core.qlora import QLoraSession

    plan = Plan.from_dict(job["plan"])
    config = TrainConfig(model=job["model"], data=job["train"], rank=plan.rank, seq_len=plan.seq_len,
                         lora_dropout=0.05, save_every=100_000)
    prepared = prepare_training(config, plan=plan)
    lengths = [len(e.input_ids) for e in prepared.train]
    if plan.batching == "packed":
        worst = max(pack_examples(lengths, plan.micro_batch * plan.seq_len, config.seed),
                    key=lambda b: sum(lengths[i] for i in b))
    else:
        worst = sorted(range(len(lengths)), key=lambda i: -lengths[i])[:plan.micro_batch]
    session = QLoraSession(prepared)
    try:
        with PeakMemory(plan.device) as probe:
            session.train_step([[prepared.train[i] for i in worst]])
    finally:
        session.release()
    print(json.dumps({"worst_step_gib": round(probe.peak / 2 ** 30, 3),
                      "worst_step_tokens": sum(lengths[i] for i in worst)}))
    return 0


# -- report -------------------------------------------------------------------------------------
def write(rows: list[dict], args) -> None:
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    kind = ("cuda" if cuda else "cpu") + ("" if args.sets == ",".join(SETS) else "-" + args.sets.replace(",", "-"))
    command = f"python benchmarks/throughput.py --tokens {args.tokens} --sets {args.sets} --model {args.model}"
    summary = []
    for name in dict.fromkeys(r["set"] for r in rows):
        base, ours = (next(r for r in rows if r["set"] == name and r["recipe"] == k) for k in RECIPES)
        summary.append({
            "set": name, "speedup": round(ours["tokens_per_s"] / base["tokens_per_s"], 2),
            "peak_ratio": round(ours["worst_step_gib"] / base["worst_step_gib"], 3),
            "rss_ratio": round(ours["peak_gib"] / base["peak_gib"], 3),
            "loss_diff_pct": round(100 * (ours["eval_loss"] - base["eval_loss"]) / base["eval_loss"], 2)})
    figures = {"benchmark": "throughput", "date": time.strftime("%Y-%m-%d %H:%M"), "device": device,
               "torch": torch.__version__, "model": args.model, "tokens": args.tokens, "command": command,
               "rows": rows, "summary": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"throughput-{kind}.json").write_text(json.dumps(figures, indent=2) + "\n")
    rss = "max allocated (torch)" if cuda else "peak RSS of the process"
    lines = [f"# Throughput: Tunesmith's plan vs the standard QLoRA recipe ({device})", "",
             f"Command: `{command}`  ", f"Date: {figures['date']}, torch {torch.__version__}, model {args.model}, "
             f"{args.tokens:,} real tokens per recipe, {HELD_OUT} held-out examples per set.", "",
             "| set | recipe | plan | real tokens/s | largest step GiB (tokens) | predicted peak GiB | "
             f"run {rss} GiB | held-out loss | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['set']} | {r['recipe']} | {r['plan']} | {r['tokens_per_s']} | {r['worst_step_gib']} "
              f"({r['worst_step_tokens']}) | {r['predicted_peak_gib']} | {r['peak_gib']} | {r['eval_loss']} | "
              f"{r['train_s']} |" for r in rows]
    lines += ["", "| set | speed-up (real tokens/s) | largest-step memory ratio | run peak ratio | held-out loss difference |",
              "|---|---|---|---|---|"]
    lines += [f"| {s['set']} | {s['speedup']}x | {s['peak_ratio']} | {s['rss_ratio']} | {s['loss_diff_pct']:+.2f} % |"
              for s in summary]
    lines += ["", "Largest step: the tensor memory of one training step on the largest micro-batch the recipe can "
              "form from the set (the 4 longest examples padded; the fullest packed row), above the loaded model, "
              "counted like torch.cuda.max_memory_allocated (on CPU by replaying the profiler's allocator events). "
              "It decides whether a run fits. Run peak: what the training run itself reached "
              + ("(torch max allocated)." if cuda else "(peak RSS, which on Linux also holds memory glibc keeps "
                 "after tensors are freed, and depends on which batches the run happened to meet).")]
    (RESULTS / f"throughput-{kind}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
