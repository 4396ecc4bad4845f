"""A plan's schedule: accumulation for about TARGET_TOKENS_PER_STEP tokens per optimizer step, and
the run's steps, warmup, evaluations and checkpoints (the planner's last step before the plan)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.core.config import Plan, TrainConfig
from app.core.data.batches import micro_batches_per_epoch
from app.core.data.stats import LengthStats
from app.core.plan.fit import TARGET_TOKENS_PER_STEP, Fit

EVALS_A_RUN = 8
SAVE_EVERY_LEAST = 5  # steps between checkpoints at least, unless the user says otherwise


@dataclass(frozen=True)
class Schedule:
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_every: int
    save_every: int
    reasons: dict[str, str]  # why grad_accum and total_steps


def plan_schedule(config: TrainConfig, stats: LengthStats, lengths: list[int], fit: Fit, batching: str,
              has_validation: bool) -> Schedule:
    """Accumulation for about TARGET_TOKENS_PER_STEP tokens per optimizer step, and the steps of the
    run: epochs (or --max-steps), warmup, evaluation and checkpoint intervals."""
    micro, seq = fit.micro_batch, fit.seq_len
    mean_len = max(1, min(seq, stats.total // max(1, stats.count)))
    shape = Plan(seq_len=seq, micro_batch=micro, batching=batching)
    micro_batches = micro_batches_per_epoch(lengths, shape, config.seed) if lengths else math.ceil(stats.count / micro)
    per_micro = sum(min(n, seq) for n in lengths) / max(1, micro_batches) if lengths else micro * mean_len
    reasons: dict[str, str] = {}
    gpus = max(1, config.gpus) * max(1, config.nodes)  # every process of the run
    if config.grad_accum:
        accum, reasons["grad_accum"] = config.grad_accum, "set by you"
    else:
        accum = max(1, min(16, round(TARGET_TOKENS_PER_STEP / max(1.0, per_micro) / gpus)))
        unit = (f"packed rows of ~{per_micro:.0f} tokens" if batching == "packed" else
                f"batches of {micro} x ~{mean_len} tokens")
        reasons["grad_accum"] = f"about {TARGET_TOKENS_PER_STEP} tokens per optimizer step ({accum} {unit}" + (
            f" in each of {gpus} processes)" if gpus > 1 else ")")
    steps_per_epoch = max(1, math.ceil(micro_batches / (accum * gpus)))
    if config.max_steps:
        total, reasons["total_steps"] = config.max_steps, "set by you (max steps)"
    else:
        total = max(1, math.ceil(config.epochs * steps_per_epoch))
        reasons["total_steps"] = f"{config.epochs:g} epoch(s) of {steps_per_epoch} steps"
    warmup = math.ceil(config.warmup_ratio * total) if config.warmup_ratio > 0 else 0
    # at least 8 evals a run (and one at the end), each over the whole held-out set
    eval_every = (config.eval_every or max(1, total // EVALS_A_RUN)) if has_validation else 0
    # about ten checkpoints a run, between every 5 and every 200 steps: a 6-step run is not saved at
    # every step (the end and a stop save anyway)
    save_every = config.save_every or min(200, max(SAVE_EVERY_LEAST, total // 10))
    return Schedule(accum, steps_per_epoch, total, warmup, eval_every, save_every, reasons)
