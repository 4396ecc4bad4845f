"""Recover from running out of GPU memory mid-run instead of losing the run.

When a step fails with CUDA out-of-memory the trainer frees what the step held and retries it
with the next change of this ladder: gradient checkpointing on; then half the micro-batch with
twice the accumulation (the same examples per optimizer step); then a shorter sequence length.
Each change is recorded as a `PlanAdjusted` event and in the run's plan.json.
"""

from __future__ import annotations

from dataclasses import replace

from app.core.config import Plan
from app.core.plan.seq_len import SHORTEST_TRIED as MIN_SEQ_LEN  # the planner tries nothing shorter either


def is_out_of_memory(err: BaseException) -> bool:
    """True for torch's OutOfMemoryError and the RuntimeErrors that CUDA kernels raise for it."""
    import torch

    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def next_backoff(plan: Plan) -> tuple[Plan, str, str] | None:
    """(the changed plan, what changed, a sentence for the log), or None when nothing is left, or
    for a run on several processes (one rank changing its plan alone would leave the others
    waiting in a collective: the run fails with the reason instead)."""
    if plan.gpus > 1:
        return None
    if not plan.grad_checkpointing:
        return (replace(plan, grad_checkpointing=True), "grad_checkpointing",
                "turned gradient checkpointing on")
    if plan.micro_batch > 1:
        micro, accum = plan.micro_batch // 2, plan.grad_accum * 2
        return (replace(plan, micro_batch=micro, grad_accum=accum), "micro_batch",
                f"halved the micro-batch to {micro} with accumulation {accum} (same examples per step)")
    if plan.seq_len // 2 >= MIN_SEQ_LEN:
        seq = plan.seq_len // 2
        return (replace(plan, seq_len=seq), "seq_len",
                f"shortened the sequence length to {seq} tokens (longer examples are truncated)")
    return None
