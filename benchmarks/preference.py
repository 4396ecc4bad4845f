"""Preference tuning: Tunesmith's DPO against TRL's DPOTrainer, on the same pairs in the same steps.

For each seed, the recipes below train the same model on the same pairs, each in its own process
(so its peak memory is its own), in an order rotated from seed to seed (so background load falls on
all of them alike):

- **tunesmith**: `--method dpo` as its planner plans it (packed rows of whole pairs), the reference's
  log-probs computed once before step 1 (the base with the adapter off), that pass counted in its time;
- **trl**: TRL's DPOTrainer with its default reference, a forward of the base with the adapter off in
  every step (precompute_ref_log_probs=False);
- **trl-precompute**: the same with precompute_ref_log_probs=True, the precompute counted in its time.

Equal work (EQUAL_WORK below, repeated at the top of the results file): the demo model unquantised,
the same pairs (from the demo's pirate-chef chats, see `pirate_pairs`) rendered with the model's chat
template (the token counts of both are checked), no pair truncated, LoRA r16/alpha32 on all linear
layers with dropout 0, lr 2e-4 cosine with 3 % warmup, grad norm 0.3, beta 0.1, sigmoid loss, one
epoch of the same N pairs in the same number of optimizer steps, the same torch threads.

Reported per run: real (non-padding) tokens/s over the timed steps (all but the first) with the
reference pass added to their time where one runs before training (the headline) and without it;
peak memory (CPU: the training process's peak RSS; CUDA: torch max allocated); and the held-out
preference accuracy and mean reward margin of the saved adapter, from one evaluator for all
(`HeldOutJudge`). Every run is appended to benchmarks/results/preference-<device>.json and .md as it
finishes, never replaced.

By default the benchmark runs tunesmith and trl (TRL's default); --recipes tunesmith,trl,trl-precompute
adds the third. The defaults (40 pairs, 3 seeds, two recipes) take about 20 minutes on a 2-core CPU.

Usage: python benchmarks/preference.py [--pairs 40] [--seeds 0,1,2] [--heldout 16] [--recipes tunesmith,trl]
       [--pairs-per-step 5] [--lr 2e-4] [--threads N] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import commit, load_history, machine, save_history  # noqa: E402
from trl_recipes import peak_bytes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RECIPES = ("tunesmith", "trl", "trl-precompute")
BETA = 0.1
TOKEN_TOLERANCE = 0.03  # the two tools' token counts of the same pairs may differ by this share at most
PIRATE = re.compile(r"ahoy|hearty|landlubber|\barr\b|matey|\bye\b|\byer\b|crow|grub|sail|ship|captain|treasure|"
                    r"\bsea\b|plank|booty|winds|deck|galley|buccaneer|parrot|anchor|scallywag|cannon|mast|bilge|"
                    r"avast|yo ho", re.I)

EQUAL_WORK = """What both tools do, and what is timed:

- **Model**: the demo model (SmolLM2-135M-Instruct), unquantised: fp32 on a CPU (Tunesmith with
  quantize "none", what its planner picks on a CPU; TRL's model loaded in fp32), the plan's 16-bit
  dtype on CUDA for both.
- **Pairs**: from the demo's pirate-chef chats, chosen = the answer's pirate greeting and its first
  plain sentence, rejected = that plain sentence alone; shuffled once (seed 7), the first *held-out*
  pairs kept for the evaluation, the next *N* trained on by both. Tunesmith reads them as
  {prompt, chosen, rejected} rows, TRL in its conversational format (prompt as a user turn, each answer
  as an assistant turn); both render them with the model's chat template. Each tool's own count of
  the real tokens of the N pairs (both sides, the prompt in each) is recorded and must agree within
  3 % before TRL trains.
- **Truncation**: none. Tunesmith's planned sequence length holds the longest pair whole, and TRL's
  max_length (per side) is the same number.
- **Training**: LoRA r16, alpha 32, all linear layers, dropout 0; torch AdamW, the learning rate
  stated below, cosine schedule with ceil(3 %) warmup steps, grad norm 0.3, weight decay 0; DPO's
  sigmoid loss with beta 0.1 on the summed log-probs of the answer tokens; the same torch threads;
  gradient checkpointing as Tunesmith's plan has it, for both (TRL's DPOConfig defaults to on). A run
  of under 34 steps warms up for 1 step, which (the schedule starting from 0) trains at lr 0 in both.
  TRL's DPOTrainer computes its log-probs through its own fused, tiled LM head, which also computes
  the entropy, mean logits and top-1 hits for its logged metrics, in every forward (its reference's
  too); that is its default, kept.
- **Steps**: one epoch of the same N pairs in the same number of optimizer steps. Tunesmith packs
  whole pairs into padding-free rows of micro_batch x seq_len tokens (its planner's micro-batch) and
  shares the rows out over the steps (its --grad-accum chosen so that its epoch has a number of steps
  TRL can match); TRL takes per_device_train_batch_size x gradient_accumulation_steps pairs a step,
  padded, the epoch's last step taking what is left. The pairs each tool trained in each step are
  recorded.
- **Reference**: the base with the adapter switched off, for both. Tunesmith computes the
  reference's log-probs of every pair once, before step 1; TRL by default (precompute_ref_log_probs
  False) runs a reference forward in every step, so its reference is inside its step times;
  trl-precompute computes them in DPOTrainer's constructor, and that time is counted.
- **Timed**: *real tokens/s* (the headline) = the real (non-padding) tokens of steps 2..S over the time
  from the end of step 1 to the end of step S **plus** the reference pass run before training
  (Tunesmith's, trl-precompute's; the whole pass over all N pairs is charged to steps 2..S, which is
  conservative for those two); *steps only* = the same without the pass (the throughput benchmark's
  measure); *end to end* = all the real tokens over *train s*, the time from the start of the
  reference pass (TRL's default: from the start of training) to the end of the last step, step 1
  included. Not timed, for any: process start, imports, model load, tokenisation, Tunesmith's
  start-up self-test, TRL's trainer construction (but its precompute), saving the adapter.
- **Memory**: CPU: the training process's peak RSS, counted from just before its model loads (where
  Tunesmith's prepare_training resets it; the TRL worker resets it at the same point); CUDA:
  torch.cuda.max_memory_allocated.
- **Held-out accuracy** (the same pairs for all runs): one evaluator in this script loads the base
  once in fp32 and each saved adapter on it with peft; for each pair, the summed log-prob of each
  side's answer tokens with the adapter on and off; accuracy = the share of pairs with
  (chosen_on - chosen_off) > (rejected_on - rejected_off), margin = beta x the mean of that difference.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=40, help="pairs each recipe trains on (N), one epoch")
    parser.add_argument("--heldout", type=int, default=16, help="pairs held out for the accuracy (the same for all)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; each trains every recipe")
    parser.add_argument("--pairs-per-step", type=int, default=5, help="about how many pairs an optimizer step takes")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate, for both")
    parser.add_argument("--recipes", default="tunesmith,trl", help="comma-separated, any of: " + ", ".join(RECIPES)
                        + " (trl-precompute adds about half the time again)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on a CPU, for both")
    parser.add_argument("--model", default="demo", help="model to train (default: the demo model)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results files "
                        "(default benchmarks/results; a trial run of the script goes elsewhere)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        print(json.dumps((train_tunesmith if job["recipe"] == "tunesmith" else train_trl)(job)))
        return 0
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if not seeds or not recipes or any(r not in RECIPES for r in recipes) or min(args.pairs, args.heldout) < 1:
        parser.error(f"--seeds takes integers, --recipes some of {', '.join(RECIPES)}; --pairs and --heldout >= 1")
    return run_benchmark(args, seeds, recipes)


def run_benchmark(args, seeds: list[int], recipes: list[str]) -> int:
    """Every recipe for every seed, in a throw-away Tunesmith home; each run written as it ends."""
    from app.core.paths import cache_dir

    shared_cache = cache_dir()
    with tempfile.TemporaryDirectory(prefix="tunesmith-preference-") as home:
        shared_cache.mkdir(parents=True, exist_ok=True)
        (Path(home) / "cache").symlink_to(shared_cache, target_is_directory=True)
        os.environ["TUNESMITH_HOME"] = home  # runs go to a throw-away store, the model cache is kept
        facts = machine_facts(args.threads)
        stem = args.out / f"preference-{facts['kind']}{facts['capability_suffix']}"
        setup = set_up(args, Path(home))
        history = load_history(stem)
        bench = {"number": len(history.setdefault("benchmarks", [])) + 1, "started": time.strftime("%Y-%m-%d %H:%M"),
                 "commit": commit(), "machine": facts, "command": command_line(args, recipes), "seeds": seeds,
                 "recipes": recipes, "lr": args.lr, "beta": BETA, "finished": False, "setup": setup["info"]}
        history["benchmarks"].append(bench)
        judge = HeldOutJudge(setup["model_path"], setup["held_out"], BETA, facts["kind"], args.threads)
        bench["setup"]["held_out_base_prefers_chosen"] = judge.base_prefers_chosen()
        for position, seed in enumerate(seeds):
            order = recipes[position % len(recipes):] + recipes[:position % len(recipes)]
            for slot, recipe in enumerate(order):
                row = run_one(recipe, seed, slot, setup, args, Path(home))
                row |= judge.judge(row.pop("adapter"))
                history["runs"].append({"benchmark": bench["number"], **row})
                write(history, stem)
                print(f"seed {seed} {recipe}: {row['tokens_per_s']} real tokens/s ({row['tokens_per_s_steps']} steps "
                      f"only), peak {row['peak_gib']} GiB, held-out accuracy {row['accuracy']}, margin "
                      f"{row['margin']}; run {row['run_wall_s']} s", flush=True)
        bench["finished"], bench["load_average_end"] = True, [round(x, 2) for x in os.getloadavg()]
        write(history, stem)
    print(f"results: {stem.with_suffix('.md')}")
    return 0


def command_line(args, recipes: list[str]) -> str:
    return (f"python benchmarks/preference.py --pairs {args.pairs} --heldout {args.heldout} --seeds {args.seeds} "
            f"--pairs-per-step {args.pairs_per_step} --lr {args.lr:g} --recipes {','.join(recipes)} "
            f"--threads {args.threads} --model {args.model}")


# -- data ---------------------------------------------------------------------------------------
def pirate_pairs() -> list[dict]:
    """From the demo's pirate-chef chats (resources/data/pirate_chef.jsonl, the first exchange of
    each): chosen = the answer's pirate greeting and its first plain sentence, rejected = that plain
    sentence alone (tests/core/test_preference_demo.py trains on the first of them)."""
    rows = []
    for line in (ROOT / "resources" / "data" / "pirate_chef.jsonl").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        turns = [m for m in json.loads(line)["messages"] if m["role"] != "system"]
        question, answer = turns[0]["content"], turns[1]["content"]
        sentences = re.split(r"(?<=[.!?])\s+", answer)
        plain = [s for s in sentences if not PIRATE.search(s)]
        if plain and PIRATE.search(sentences[0]):
            rows.append({"prompt": question, "chosen": f"{sentences[0]} {plain[0]}", "rejected": plain[0]})
    return rows


def split_pairs(count: int, held_out: int) -> tuple[list[dict], list[dict]]:
    """(the `count` training pairs, the `held_out` pairs): shuffled once with a fixed seed, the
    held-out pairs first, so they stay the same whatever `count` is."""
    rows = pirate_pairs()
    if count + held_out > len(rows):
        raise SystemExit(f"the pirate-chef chats make {len(rows)} pairs; --pairs {count} + --heldout {held_out} "
                         "is more")
    random.Random(7).shuffle(rows)
    return rows[held_out:held_out + count], rows[:held_out]


def conversational(row: dict) -> dict:
    """A pair in TRL's conversational format: the prompt a user turn, each answer an assistant turn."""
    return {"prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


# -- the shared setup -----------------------------------------------------------------------------
def set_up(args, home: Path) -> dict:
    """What every run shares: the pairs, Tunesmith's plan (its planner's micro-batch, the accumulation
    that gives an epoch of steps TRL can match), TRL's batch, and the token counts to check TRL's by."""
    from dataclasses import replace

    from app.core.config import TrainConfig
    from app.core.data.batches import micro_batches_per_epoch
    from app.core.train.prepare import prepare_training

    train, held = split_pairs(args.pairs, args.heldout)
    data = home / "pairs-train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in train), encoding="utf-8")
    base = TrainConfig(model=args.model, data=str(data), method="dpo", beta=BETA, lr=args.lr, lora_dropout=0.0,
                       quantize="none", report="off", val_split=0, rank=16, lora_alpha=32, save_every=100_000,
                       threads=args.threads)
    first = prepare_training(base)
    lengths = [len(pair.input_ids) for pair in first.train]
    rows = micro_batches_per_epoch(lengths, first.plan, base.seed)
    per_row = len(train) / rows
    accum, steps, trl_batch, trl_accum = matched_steps(rows, len(train), args.pairs_per_step, per_row)
    config = replace(base, micro_batch=first.plan.micro_batch, grad_accum=accum)
    prepared = prepare_training(config)
    plan = prepared.plan
    if plan.total_steps != steps or prepared.data_info["truncated"]:
        raise SystemExit(f"Tunesmith's plan has {plan.total_steps} steps (expected {steps}) and truncates "
                         f"{prepared.data_info['truncated']} pairs")
    ours = {"real_tokens": sum(lengths), "answer_tokens": sum(pair.trained_tokens for pair in prepared.train)}
    info = {"pairs": len(train), "held_out": len(held), "steps": steps, "seq_len": plan.seq_len,
            "tunesmith_rows": rows, "tunesmith_pairs_per_row": round(per_row, 2),
            "tunesmith": describe_plan(plan), "tunesmith_reasons": {k: first.plan.reasons.get(k, "") for k in
                                                                    ("micro_batch", "seq_len", "grad_checkpointing",
                                                                     "attention")},
            "trl": f"per_device_train_batch_size {trl_batch} x gradient_accumulation_steps {trl_accum}"
                   f" pairs a step (padded), the last step what is left; max_length {plan.seq_len}, checkpointing "
                   f"{'on' if plan.grad_checkpointing else 'off'}, sdpa attention, torch AdamW",
            "tunesmith_tokens": ours, "pair_tokens": {"mean": round(sum(lengths) / len(lengths), 1),
                                                      "min": min(lengths), "max": max(lengths)}}
    return {"info": info, "config": config.to_dict(), "plan": plan.to_dict(), "train": train, "held_out": held,
            "model_path": str(prepared.model.path), "trl_batch": trl_batch,
            "trl_accum": trl_accum, "ours": ours}


def matched_steps(rows: int, pairs: int, per_step: float, per_row: float) -> tuple[int, int, int, int]:
    """(Tunesmith's grad_accum, the steps of the epoch, TRL's per-device batch and accumulation):
    Tunesmith's epoch of `rows` packed rows in as many steps as TRL's of `pairs` pairs, nearest
    `per_step` pairs a step and a TRL batch nearest Tunesmith's `per_row` pairs a row (one step of
    everything always matches)."""
    best = None
    for accum in range(1, rows + 1):
        steps = math.ceil(rows / accum)
        for trl in range(math.ceil(pairs / steps), pairs + 1):  # TRL's pairs a step: ceil(pairs / trl) == steps
            if steps > 1 and (steps - 1) * trl >= pairs:
                break
            for batch in (d for d in range(1, trl + 1) if trl % d == 0):
                score = abs(math.log(pairs / steps / per_step)) + abs(math.log(batch / per_row))
                if best is None or score < best[0]:
                    best = (score, accum, steps, batch, trl // batch)
    return best[1:]


def describe_plan(plan) -> str:
    return (f"packed rows of {plan.micro_batch} x {plan.seq_len} tokens, x{plan.grad_accum} per step "
            f"({plan.batching}), checkpointing {'on' if plan.grad_checkpointing else 'off'}, {plan.loss} loss, "
            f"attention {plan.attention or 'sdpa'}, base {plan.quantize} ({plan.compute_dtype}), "
            f"optimizer {plan.optimizer}, threads {plan.threads}")


# -- one run, in its own process ------------------------------------------------------------------
def run_one(recipe: str, seed: int, slot: int, setup: dict, args, home: Path) -> dict:
    """Train `recipe` in a process of its own; its row (with the adapter's path, for the evaluator)."""
    out = Path(tempfile.mkdtemp(prefix=f"{recipe}-{seed}-", dir=home))
    job = {"recipe": recipe, "seed": seed, "out": str(out), "plan": setup["plan"], "threads": args.threads,
           "lr": args.lr, "beta": BETA}
    if recipe == "tunesmith":
        job["config"] = setup["config"]
    else:
        job |= {"model_path": setup["model_path"], "pairs": [conversational(r) for r in setup["train"]],
                "batch": setup["trl_batch"], "accum": setup["trl_accum"], "ours": setup["ours"]}
    print(f"seed {seed}: training {recipe}", flush=True)
    load = os.getloadavg()[0]
    began = time.monotonic()
    figures = run_worker(job, out)
    wall = time.monotonic() - began
    step_tokens, ends = figures["step_tokens"], figures["step_end_s"]
    timed_tokens, timed_s = sum(step_tokens[1:]), ends[-1] - ends[0]
    reference = figures["reference_s"] or 0.0
    train_s = reference + ends[-1] - figures["train_start_s"]  # from the reference pass (or step 1) to the last step
    if len(step_tokens) != setup["info"]["steps"] or sum(figures["step_pairs"]) != setup["info"]["pairs"]:
        raise SystemExit(f"{recipe} trained {sum(figures['step_pairs'])} pairs in {len(step_tokens)} steps; "
                         f"the benchmark set {setup['info']['pairs']} in {setup['info']['steps']}")
    return {"seed": seed, "slot": slot + 1, "recipe": recipe, "steps": len(step_tokens),
            "step_pairs": figures["step_pairs"], "real_tokens": sum(step_tokens),
            "tokens_counted_before": figures.get("tokens_before"),
            "reference_s": round(figures["reference_s"], 1) if figures["reference_s"] is not None else None,
            "tokens_per_s": round(timed_tokens / (timed_s + reference), 1) if timed_s + reference > 0 else None,
            "tokens_per_s_steps": round(timed_tokens / timed_s, 1) if timed_s > 0 else None,
            "train_s": round(train_s, 1), "tokens_per_s_end_to_end": round(sum(step_tokens) / train_s, 1),
            "peak_gib": round(figures["peak_bytes"] / 2 ** 30, 3), "last_step_loss": round(figures["losses"][-1], 4),
            "run_wall_s": round(wall, 1), "load_average_start": round(load, 2),
            "load_average_end": round(os.getloadavg()[0], 2), "step_tokens": step_tokens,
            "step_end_s": [round(t - figures["train_start_s"], 2) for t in ends], "adapter": figures["adapter"]}


def run_worker(job: dict, out: Path) -> dict:
    """`job` in a fresh process of this script (--worker): its last line of output, as JSON."""
    path = out / f"job-{job['recipe']}.json"
    path.write_text(json.dumps(job))
    done = subprocess.run([sys.executable, __file__, "--worker", str(path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{job['recipe']} worker failed:\n{done.stderr[-3000:]}{done.stdout[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def train_tunesmith(job: dict) -> dict:
    """Tunesmith's DPO run (prepare_training with the shared plan, then train_prepared: what
    run_training does), timed from its events: the reference pass from the "Reference
    log-probabilities" line to RunStarted, each step at its StepMetrics."""
    import torch

    from app.core.config import Plan, TrainConfig
    from app.core.data.batches import EpochBatches
    from app.core.events import LogLine, RunStarted, StepMetrics
    from app.core.train.prepare import prepare_training
    from app.core.train.trainer import train_prepared

    marks = {"reference": None, "started": None, "ends": [], "tokens": [], "losses": []}

    def on_event(event) -> None:
        now = time.perf_counter()
        if isinstance(event, LogLine) and event.message.startswith("Reference log-probabilities"):
            marks["reference"] = now
        elif isinstance(event, RunStarted):
            marks["started"] = now
        elif isinstance(event, StepMetrics):
            marks["ends"].append(now)
            marks["tokens"].append(event.tokens)
            marks["losses"].append(event.loss)

    config = TrainConfig.from_dict({**job["config"], "seed": job["seed"]})
    prepared = prepare_training(config, log=lambda message: on_event(LogLine(message)),
                                plan=Plan.from_dict(job["plan"]))
    result = train_prepared(prepared, on_event, threading.Event())
    if result.status != "finished" or marks["reference"] is None or marks["started"] is None:
        raise SystemExit(f"run {result.status} {result.reason}; reference line seen: {marks['reference'] is not None}")
    order = EpochBatches([len(pair.input_ids) for pair in prepared.train], prepared.plan, config.seed)
    pairs = [sum(len(rows) for rows in order.for_step(step)) for step in range(prepared.plan.total_steps)]
    return {"step_tokens": marks["tokens"], "step_end_s": marks["ends"], "step_pairs": pairs,
            "reference_s": marks["started"] - marks["reference"], "train_start_s": marks["started"],
            "losses": marks["losses"], "peak_bytes": peak_bytes(torch.cuda.is_available()),
            "adapter": result.adapter_dir}


def train_trl(job: dict) -> dict:
    """TRL's DPOTrainer on the same pairs, the reference per step or precomputed (`job["recipe"]`),
    timed by a callback; each micro-batch's real tokens and pairs recorded as its loss is computed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.core.host import reset_peak_ram

    plan, out = job["plan"], Path(job["out"])
    cuda = plan["device"] == "cuda"
    if not cuda:
        torch.set_num_threads(job["threads"])
    tokenizer = AutoTokenizer.from_pretrained(job["model_path"])
    reset_peak_ram()  # as Tunesmith's prepare_training does before its model loads
    torch.manual_seed(job["seed"])
    model = AutoModelForCausalLM.from_pretrained(job["model_path"], dtype=getattr(torch, plan["compute_dtype"]),
                                                 attn_implementation="sdpa", device_map={"": "cuda"} if cuda else None)
    trainer = trl_trainer(job, model, tokenizer)
    before = trl_token_counts(trainer.train_dataset, job["ours"])
    clock = {"start": None, "ends": [], "marks": []}
    trainer.add_callback(step_clock(clock, trainer))
    trainer.train()
    peak = peak_bytes(cuda)
    trainer.model.save_pretrained(out / "adapter")
    micro = trainer.micro
    bounds = [0] + clock["marks"]
    step_tokens = [sum(t for t, _ in micro[a:b]) for a, b in zip(bounds, bounds[1:])]
    step_pairs = [sum(p for _, p in micro[a:b]) for a, b in zip(bounds, bounds[1:])]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    precompute = trainer.precompute_s if job["recipe"] == "trl-precompute" else None
    return {"step_tokens": step_tokens, "step_end_s": clock["ends"], "step_pairs": step_pairs,
            "reference_s": precompute, "train_start_s": clock["start"], "losses": losses, "peak_bytes": peak,
            "adapter": str(out / "adapter"), "tokens_before": before}


def trl_trainer(job: dict, model, tokenizer):
    """The DPOTrainer of `job`: the shared plan's length, checkpointing and dtype, the benchmark's
    schedule and batch, LoRA r16/alpha32 on all linear layers, dropout 0."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig

    plan = job["plan"]
    steps = int(plan["total_steps"])
    cuda = plan["device"] == "cuda"
    config = DPOConfig(
        output_dir=str(Path(job["out"]) / "trainer"), seed=job["seed"], num_train_epochs=1, max_steps=steps,
        learning_rate=job["lr"], lr_scheduler_type="cosine", warmup_steps=math.ceil(0.03 * steps),
        max_grad_norm=0.3, weight_decay=0.0, optim="adamw_torch", bf16=plan["compute_dtype"] == "bfloat16",
        fp16=plan["compute_dtype"] == "float16", per_device_train_batch_size=job["batch"],
        gradient_accumulation_steps=job["accum"], gradient_checkpointing=plan["grad_checkpointing"],
        max_length=plan["seq_len"], beta=job["beta"], loss_type=["sigmoid"],
        precompute_ref_log_probs=job["recipe"] == "trl-precompute", logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, use_cpu=not cuda, dataloader_num_workers=0)
    lora = LoraConfig(r=plan["rank"], lora_alpha=plan["lora_alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    return timed_dpo_class()(model=model, args=config, train_dataset=Dataset.from_list(job["pairs"]),
                             processing_class=tokenizer, peft_config=lora)


def timed_dpo_class():
    """DPOTrainer that records each micro-batch's (real tokens, pairs) as its loss is computed, and
    how long its reference precompute took."""
    from trl import DPOTrainer

    class TimedDPO(DPOTrainer):
        def __init__(self, *args, **kwargs):
            self.micro, self.precompute_s = [], 0.0
            super().__init__(*args, **kwargs)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            began = time.perf_counter()
            try:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                self.precompute_s += time.perf_counter() - began

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.micro.append((int(inputs["attention_mask"].sum()), int(inputs["input_ids"].size(0)) // 2))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return TimedDPO


def step_clock(clock: dict, trainer):
    """A callback that notes when training starts and when each optimizer step ends (and how many
    micro-batches had been through by then)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            clock["ends"].append(time.perf_counter())
            clock["marks"].append(len(trainer.micro))

    return StepClock()


def trl_token_counts(dataset, ours: dict) -> dict:
    """TRL's real and answer tokens of the pairs it tokenised (both sides, the prompt in each);
    stop unless they are within TOKEN_TOLERANCE of Tunesmith's."""
    prompts, chosen, rejected = (dataset[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    answers = sum(len(c) + len(r) for c, r in zip(chosen, rejected))
    theirs = {"real_tokens": 2 * sum(len(p) for p in prompts) + answers, "answer_tokens": answers}
    for key, value in theirs.items():
        if abs(value - ours[key]) > TOKEN_TOLERANCE * ours[key]:
            raise SystemExit(f"TRL counts {value} {key.replace('_', ' ')} in the pairs, Tunesmith {ours[key]}: "
                             "not the same work")
    return theirs


# -- the evaluator ------------------------------------------------------------------------------
class HeldOutJudge:
    """One evaluator for every adapter: the base loaded once in fp32, each held-out pair's summed
    answer log-probs with the adapter off (once) and on (each adapter loaded on the base with peft)."""

    def __init__(self, model_path: str, pairs: list[dict], beta: float, kind: str, threads: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if kind == "cpu":
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if kind == "cuda" else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(self.device).eval()
        self.beta = beta
        self.sides = [[self.tokenize(pair["prompt"], pair[side]) for side in ("chosen", "rejected")] for pair in pairs]
        self.off = self.logps(self.model)

    def tokenize(self, prompt: str, answer: str) -> tuple[list[int], int]:
        """(ids of the chat of `prompt` and `answer` with the model's template, where the answer starts)."""
        user = [{"role": "user", "content": prompt}]
        head = self.tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
        full = self.tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=True,
                                                  return_dict=False)
        start = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))
        return list(full), start

    def logps(self, model) -> list[tuple[float, float]]:
        """(chosen, rejected): the summed log-prob of each side's answer tokens, for every pair."""
        import torch

        sums = []
        with torch.no_grad():
            for pair in self.sides:
                values = []
                for ids, start in pair:
                    tokens = torch.tensor([ids], device=self.device)
                    logits = model(input_ids=tokens).logits[0, :-1].float()
                    taken = torch.log_softmax(logits, -1).gather(1, tokens[0, 1:, None])[:, 0]
                    values.append(float(taken[start - 1:].sum()))
                sums.append((values[0], values[1]))
        return sums

    def judge(self, adapter: str) -> dict:
        """The adapter's held-out accuracy and mean reward margin (beta x the log-ratio difference)."""
        from peft import PeftModel

        model = PeftModel.from_pretrained(self.model, adapter).eval()
        on = self.logps(model)
        self.model = model.unload()
        diffs = [(c1 - c0) - (r1 - r0) for (c1, r1), (c0, r0) in zip(on, self.off)]
        return {"accuracy": round(sum(d > 0 for d in diffs) / len(diffs), 4),
                "margin": round(self.beta * statistics.mean(diffs), 4)}

    def base_prefers_chosen(self) -> float:
        """The share of held-out pairs whose chosen answer the base gives more log-prob per token."""
        per_token = [(c / (len(ci) - cs), r / (len(ri) - rs))
                     for (c, r), ((ci, cs), (ri, rs)) in zip(self.off, self.sides)]
        return round(sum(c > r for c, r in per_token) / len(per_token), 4)


# -- report -------------------------------------------------------------------------------------
def machine_facts(threads: int) -> dict:
    """The machine (common.machine: CPU model, cores, AVX-512 or AVX2), the device, torch's threads
    and kernels, the library versions, the load average."""
    import torch

    facts = machine()
    cuda = torch.cuda.is_available()
    flags = "AVX-512" if facts["avx512f"] else "AVX2 only" if facts["avx2"] else "no AVX2"
    versions = {}
    for package in ("torch", "transformers", "peft", "trl", "accelerate", "datasets"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = "not installed"
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "")
    return facts | {"kind": "cuda" if cuda else "cpu", "device": torch.cuda.get_device_name(0) if cuda else
                    f"CPU: {facts['cpu']}, {facts['cores']} cores", "flags": flags, "threads": threads,
                    "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "capability_suffix": f"-{capability}" if capability else "", "versions": versions,
                    "load_average_start": [round(x, 2) for x in os.getloadavg()]}


def summarise(rows: list[dict]) -> list[dict]:
    """Per recipe: median and range of the speeds, median peak, mean and range of the accuracy, and
    Tunesmith's speed-up and memory ratio against each TRL recipe (of medians, and per seed)."""
    by = {r: [row for row in rows if row["recipe"] == r] for r in RECIPES}
    ours = by["tunesmith"]
    summary = []
    for recipe, runs in ((r, v) for r, v in by.items() if v):
        speeds, steps = [r["tokens_per_s"] for r in runs], [r["tokens_per_s_steps"] for r in runs]
        whole = [r["tokens_per_s_end_to_end"] for r in runs]
        accuracy = [r["accuracy"] for r in runs]
        entry = {"recipe": recipe, "runs": len(runs), "speed": statistics.median(speeds),
                 "speed_range": (min(speeds), max(speeds)), "steps_speed": statistics.median(steps),
                 "steps_range": (min(steps), max(steps)), "whole": statistics.median(whole),
                 "whole_range": (min(whole), max(whole)), "peak": statistics.median(r["peak_gib"] for r in runs),
                 "accuracy": round(statistics.mean(accuracy), 3), "accuracy_range": (min(accuracy), max(accuracy)),
                 "margin": round(statistics.mean(r["margin"] for r in runs), 4)}
        if recipe != "tunesmith" and ours:
            seeds = {r["seed"]: r for r in runs}
            entry["speedup"] = round(statistics.median(r["tokens_per_s"] for r in ours) / entry["speed"], 2)
            entry["speedup_per_seed"] = [round(o["tokens_per_s"] / seeds[o["seed"]]["tokens_per_s"], 2)
                                         for o in ours if o["seed"] in seeds]
            entry["memory_ratio"] = round(statistics.median(r["peak_gib"] for r in ours) / entry["peak"], 2)
        summary.append(entry)
    return summary


def write(history: dict, stem: Path) -> None:
    """The results file (.json: every benchmark and run; .md: the equal work, then each benchmark)."""
    save_history(stem, history)
    lines = ["# Preference tuning: Tunesmith's DPO against TRL's DPOTrainer", "",
             "Every run of `python benchmarks/preference.py`, newest last; each recipe trains in a process of its "
             "own, the order rotated from seed to seed.", "", EQUAL_WORK]
    for bench in history["benchmarks"]:
        lines += bench_section(bench, [r for r in history["runs"] if r["benchmark"] == bench["number"]])
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def bench_section(bench: dict, rows: list[dict]) -> list[str]:
    """One benchmark's header (command, machine, setup), its runs and their summary."""
    m, s = bench["machine"], bench["setup"]
    memory = "peak RSS GiB" if m["kind"] == "cpu" else "max allocated GiB"
    lines = [f"## Benchmark {bench['number']}: {bench['started']}, commit {bench['commit']}"
             + ("" if bench["finished"] else " (**partial: still running, or stopped**)"), "",
             f"Command: `{bench['command']}`  ",
             f"Machine: {m['device']}; {m['flags']}; torch's CPU kernels {m['torch_cpu_capability']}; "
             f"{m['threads']} torch threads; load average (1, 5, 15 min) at start {m['load_average_start']}, at end "
             f"{bench.get('load_average_end', 'n/a')}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
             + f"; python {m['python']}.  ",
             f"{s['pairs']} training pairs ({s['pair_tokens']['mean']} tokens a pair, both sides, "
             f"{s['pair_tokens']['min']}-{s['pair_tokens']['max']}), {s['held_out']} held out (the base gives the "
             f"chosen answer more log-prob per token on {s.get('held_out_base_prefers_chosen', 'n/a')} of them); "
             f"{s['steps']} optimizer steps for every recipe; sequence length {s['seq_len']}; lr {bench['lr']:g}, "
             f"beta {bench['beta']}.  ",
             f"Real tokens of the pairs as each counts them: Tunesmith {s['tunesmith_tokens']['real_tokens']:,} "
             f"({s['tunesmith_tokens']['answer_tokens']:,} answer tokens); TRL's in the rows below.", "",
             f"- **tunesmith**: {s['tunesmith']}; {s['tunesmith_rows']} rows an epoch, "
             f"{s['tunesmith_pairs_per_row']} pairs a row; its planner's micro-batch: "
             f"{s['tunesmith_reasons']['micro_batch']}",
             f"- **trl**, **trl-precompute**: {s['trl']}", ""]
    return lines + run_lines(rows, memory) + [""] + summary_lines(rows, memory) + [""]


def run_lines(rows: list[dict], memory: str) -> list[str]:
    """The table of one benchmark's runs, in the order they ran."""
    lines = [f"| seed | order | recipe | pairs per step | real tokens (TRL's count before training) | reference s | "
             f"**real tokens/s** | steps only | end to end | {memory} | held-out accuracy | margin | last-step loss | "
             "train s | run s | load avg (1 min) |", "|" + "---|" * 16]
    for r in rows:
        before = r.get("tokens_counted_before")
        reference = r["reference_s"] if r["reference_s"] is not None else "in steps"
        lines.append(f"| {r['seed']} | {r['slot']} | {r['recipe']} | {min(r['step_pairs'])}-{max(r['step_pairs'])} "
                     f"| {r['real_tokens']:,}" + (f" ({before['real_tokens']:,})" if before else "") + " | "
                     f"{reference} | **{r['tokens_per_s']}** | {r['tokens_per_s_steps']} | "
                     f"{r['tokens_per_s_end_to_end']} | {r['peak_gib']} | {r['accuracy']} | {r['margin']} | "
                     f"{r['last_step_loss']} | {r['train_s']} | {r['run_wall_s']} | {r['load_average_start']} |")
    return lines


def summary_lines(rows: list[dict], memory: str) -> list[str]:
    """The table of each recipe's spread over the seeds, and Tunesmith's ratios to TRL's."""
    lines = ["| recipe | runs | **real tokens/s**: median (min-max) | steps only: median (min-max) | end to end: "
             f"median (min-max) | {memory} (median) | held-out accuracy: mean (min-max) | margin (mean) | Tunesmith "
             "speed-up: of medians (per seed) | Tunesmith memory ratio |", "|" + "---|" * 10]
    spread = lambda value, pair: f"{value} ({pair[0]}-{pair[1]})"  # noqa: E731
    for e in summarise(rows):
        ratio = (f"**{e['speedup']}x** ({', '.join(f'{x}x' for x in e['speedup_per_seed'])})" if "speedup" in e else "")
        lines.append(f"| {e['recipe']} | {e['runs']} | {spread(e['speed'], e['speed_range'])} | "
                     f"{spread(e['steps_speed'], e['steps_range'])} | {spread(e['whole'], e['whole_range'])} | "
                     f"{e['peak']} | {spread(e['accuracy'], e['accuracy_range'])} | {e['margin']} | {ratio} | "
                     f"{e.get('memory_ratio', '')} |")
    return lines



if __name__ == "__main__":
    raise SystemExit(main())
