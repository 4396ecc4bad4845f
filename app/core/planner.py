"""Choose the settings a run trains with, keeping every value the user fixed.

This first planner picks from the data alone (sequence length from the length distribution,
micro-batch and accumulation for a target number of tokens per optimizer step, schedule lengths);
the memory-aware planner (rank, checkpointing and context within a VRAM budget) builds on it.
Each choice comes with a one-line reason.
"""

from __future__ import annotations

import math

from app.core.config import Plan, TrainConfig
from app.core.data.stats import LengthStats, count_over
from app.core.errors import ConfigError

DEFAULT_RANK = 16
TARGET_TOKENS_PER_STEP = 4096
DEFAULT_MICRO_BATCH = 4
MAX_DEFAULT_SEQ_LEN = 2048


def detect_device() -> tuple[str, str, str]:
    """(device, compute dtype, optimizer) for this machine: bf16 + paged 8-bit AdamW on CUDA."""
    import torch

    if torch.cuda.is_available():
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "cuda", dtype, "paged_adamw_8bit"
    return "cpu", "float32", "adamw_torch"


def plan_run(config: TrainConfig, stats: LengthStats, lengths: list[int], has_validation: bool,
             max_positions: int | None = None) -> Plan:
    """A Plan for `config` on data with these token lengths."""
    validate_config(config)
    reasons: dict[str, str] = {}
    device, dtype, optimizer = detect_device()

    rank = config.rank or DEFAULT_RANK
    reasons["rank"] = "set by you" if config.rank else f"default rank {DEFAULT_RANK}"
    alpha = config.lora_alpha or 2 * rank
    reasons["lora_alpha"] = "set by you" if config.lora_alpha else "2 x rank"

    cap = min(MAX_DEFAULT_SEQ_LEN, max_positions or MAX_DEFAULT_SEQ_LEN)
    if config.seq_len:
        seq_len = config.seq_len
        reasons["seq_len"] = "set by you"
    else:
        seq_len = max(64, min(cap, 64 * math.ceil(stats.p99 / 64)))
        reasons["seq_len"] = f"covers 99% of examples (p99 {stats.p99} tokens), capped at {cap}"
    over = count_over(lengths, seq_len)
    if over:
        reasons["seq_len"] += f"; {over} example{'s' * (over != 1)} will be truncated"

    micro = config.micro_batch or DEFAULT_MICRO_BATCH
    reasons["micro_batch"] = "set by you" if config.micro_batch else f"default {DEFAULT_MICRO_BATCH}"
    mean_len = max(1, min(seq_len, stats.total // max(1, stats.count)))
    if config.grad_accum:
        accum = config.grad_accum
        reasons["grad_accum"] = "set by you"
    else:
        accum = max(1, min(16, round(TARGET_TOKENS_PER_STEP / (micro * mean_len))))
        reasons["grad_accum"] = f"about {TARGET_TOKENS_PER_STEP} tokens per optimizer step"
    checkpointing = bool(config.grad_checkpointing)
    reasons["grad_checkpointing"] = ("set by you" if config.grad_checkpointing is not None
                                     else "off: faster, and the memory planner has not asked for it")

    micro_batches = math.ceil(stats.count / micro)
    steps_per_epoch = max(1, math.ceil(micro_batches / accum))
    if config.max_steps:
        total = config.max_steps
        reasons["total_steps"] = "set by you (--max-steps)"
    else:
        total = max(1, math.ceil(config.epochs * steps_per_epoch))
        reasons["total_steps"] = f"{config.epochs:g} epoch(s) of {steps_per_epoch} steps"
    warmup = math.ceil(config.warmup_ratio * total) if config.warmup_ratio > 0 else 0
    eval_every = (config.eval_every or max(1, total // 10)) if has_validation else 0
    save_every = config.save_every or max(1, min(200, total // 10))
    return Plan(rank=rank, lora_alpha=alpha, seq_len=seq_len, micro_batch=micro, grad_accum=accum,
                grad_checkpointing=checkpointing, total_steps=total, steps_per_epoch=steps_per_epoch,
                warmup_steps=warmup, eval_every=eval_every, save_every=save_every, compute_dtype=dtype,
                optimizer=optimizer, device=device, reasons=reasons)


def validate_config(config: TrainConfig) -> None:
    """Raise ConfigError for a setting no plan can honour."""
    checks = [
        (config.rank is None or config.rank >= 1, "--rank must be at least 1"),
        (config.seq_len is None or config.seq_len >= 16, "--seq-len must be at least 16"),
        (config.micro_batch is None or config.micro_batch >= 1, "--batch must be at least 1"),
        (config.grad_accum is None or config.grad_accum >= 1, "--grad-accum must be at least 1"),
        (config.max_steps is None or config.max_steps >= 1, "--max-steps must be at least 1"),
        (config.epochs > 0, "--epochs must be above 0"),
        (0 < config.lr < 1, "--lr must be between 0 and 1, e.g. 2e-4"),
        (0 <= config.val_split <= 50, "--val-split is a percentage from 0 to 50"),
        (0 <= config.warmup_ratio < 1, "warmup ratio must be from 0 to below 1"),
        (config.max_grad_norm > 0, "max grad norm must be above 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
