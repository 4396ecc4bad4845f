"""What a failed run says, and the disk check before each checkpoint: one line naming what
happened and what to do, for the run's status and both faces."""

from __future__ import annotations

import errno

from app.core.config import Plan
from app.core.errors import DiskFullError, UserError
from app.core.runs import Run
from app.core.train.oom import is_out_of_memory, next_backoff
from app.core.units import gib, size_text

DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
CHECKPOINT_SPACE_FACTOR = 1.5  # the new checkpoint is written beside the last one, then renamed
CHECKPOINT_SPACE_SLACK = 20_000_000  # status, metrics and log lines until the next check


def checkpoint_bytes(run: Run, session) -> int:
    """About how much a checkpoint takes: the last one's size, else the LoRA weights with their
    two fp32 moments (8-bit state is smaller) and a little for the rest."""
    latest = run.latest_checkpoint()
    if latest is not None:
        return sum(p.stat().st_size for p in latest.rglob("*") if p.is_file())
    return session.trainable_parameters * (4 + 8) + 1_000_000


def check_checkpoint_space(run: Run, session) -> None:
    import shutil

    needed = int(CHECKPOINT_SPACE_FACTOR * checkpoint_bytes(run, session)) + CHECKPOINT_SPACE_SLACK
    free = shutil.disk_usage(run.dir).free
    if free < needed:
        raise DiskFullError(f"disk full: a checkpoint needs about {size_text(needed)} free at {run.dir}, "
                            f"there are {size_text(free)}; free some space, then resume (the last "
                            "checkpoint is intact)")


def is_disk_full(err: BaseException | None) -> bool:
    """ENOSPC / EDQUOT, also when a library wraps it (safetensors raises its own error type whose
    message carries "No space left on device (os error 28)")."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return True
        text = str(err)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def failure_reason(err: Exception, step: int, plan: Plan, session, run: Run | None = None) -> str:
    if isinstance(err, UserError):
        return str(err)
    if is_disk_full(err):
        needed = (f"about {size_text(CHECKPOINT_SPACE_FACTOR * checkpoint_bytes(run, session))}"
                  if run is not None and session is not None else "more space")
        where = getattr(err, "filename", None) or (run.dir if run is not None else "the run folder")
        return (f"disk full at step {step} (needs {needed} free at {where}); free some space, then resume "
                "(the last checkpoint is intact)")
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if is_out_of_memory(err):
        if session is None:
            weights = plan.breakdown.get("quantized_weights", 0) + plan.breakdown.get("kept_weights", 0)
            needs = f" (its weights need {gib(weights)})" if weights else ""
            return (f"out of GPU memory loading the model{needs}; close other programs using the GPU "
                    "or choose a smaller model")
        if plan.gpus > 1:
            return (f"out of GPU memory at step {step} on one of {plan.gpus} GPUs (with several GPUs the plan "
                    "does not back off yet); start again with a shorter --seq-len, a smaller --batch or "
                    "--grad-checkpointing")
        if next_backoff(plan) is None:
            return (f"out of GPU memory at step {step} even with checkpointing, micro-batch 1 and "
                    f"{plan.seq_len} tokens; close other programs using the GPU, or choose a smaller model")
        return (f"out of GPU memory at step {step}; lower the sequence length or the micro-batch, "
                "or turn gradient checkpointing on")
    return f"{type(err).__name__} at step {step}: {text[:200]} (details in train.log)"
