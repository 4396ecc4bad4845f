"""Train a run from start to end, or resume one: `run_training` and `resume_training`.

The loop is ours (not transformers' Trainer) so that stop, resume and progress are exact: the
data order of each epoch is a function of the seed, a checkpoint holds the adapter, optimizer,
schedule and RNG state, and `stop` (a threading.Event) is checked between optimizer steps.
Every event goes to `on_event` and to the run's metrics.jsonl; the run's status.json always says
what happened, and the model is released in a `finally` whatever the outcome.
"""

from __future__ import annotations

import errno
import json
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

from app.core.config import Plan, TrainConfig
from app.core.data.batches import EpochBatches
from app.core.errors import DiskFullError, RunError, UserError
from app.core.events import (CheckpointSaved, EvalMetrics, Event, LogLine, PlanAdjusted, RunFailed,
                             RunFinished, RunStarted, StepMetrics)
from app.core.memory import gib
from app.core.models import remember_model
from app.core.oom import is_out_of_memory, next_backoff
from app.core.prepare import Prepared, prepare_training, truncate
from app.core.run_lock import RunLock
from app.core.runs import Run, create_run, open_run

STATUS_EVERY_S = 1.0


@dataclass
class RunResult:
    """How a run ended: status is "finished", "stopped" or "failed" (with `reason`)."""

    run_id: str
    run_dir: str
    status: str
    step: int
    total_steps: int
    final_loss: float | None
    adapter_dir: str
    reason: str = ""


def run_training(config: TrainConfig, on_event: Callable[[Event], None] | None = None,
                 stop: threading.Event | None = None) -> RunResult:
    """Check everything, create a run folder, and train. User errors raise before the folder exists."""
    on_event = on_event or (lambda event: None)
    prepared = prepare_training(config, log=lambda message: on_event(LogLine(message)))
    return train_prepared(prepared, on_event, stop)


def train_prepared(prepared: Prepared, on_event: Callable[[Event], None] | None = None,
                   stop: threading.Event | None = None) -> RunResult:
    """Create a run folder for checked data and a plan (from `prepare_training`), and train."""
    run = create_run(prepared.config, prepared.plan, prepared.data_info)
    remember_model(prepared.model)
    return _train(run, prepared, on_event or (lambda event: None), stop or threading.Event())


def resume_training(ref: str, on_event: Callable[[Event], None] | None = None,
                    stop: threading.Event | None = None, trust_remote_code: bool = False,
                    allow_pickle: bool = False) -> RunResult:
    """Continue a stopped, interrupted or failed run from its latest checkpoint.

    A run started with --trust-remote-code or --allow-pickle needs the same consent again: the
    run folder's own config.json is not the user's word (it may have been copied in)."""
    on_event = on_event or (lambda event: None)
    run = open_run(ref)
    missing = consent_needed(run.config(), trust_remote_code, allow_pickle)
    if missing:
        raise RunError(f"run {run.id} was started with {' and '.join(missing)}: resuming runs that again; "
                       f"pass {' '.join(missing)} to resume it")
    run.lock = RunLock(run.dir, "resuming").acquire()  # RunError naming the holder when in use
    try:
        if run.raw_status().get("status") == "finished":  # "running" while we hold the lock: killed
            raise RunError(f"run {run.id} has already finished; start a new run to train further")
        config, info = run.config(), run.data_info()
        prepared = prepare_training(config, log=lambda message: on_event(LogLine(message)), plan=run.plan())
        for key, file in (("sha256", "file"), ("val_sha256", "val_file")):
            if info.get(key) and prepared.data_info[key] != info[key]:
                raise RunError(f"{info[file]}: changed since run {run.id} started; resume needs the same "
                               "data (restore the file, or start a new run)")
        run.write_status("running", reason="")
    except BaseException:
        run.lock.release()
        raise
    return _train(run, prepared, on_event, stop or threading.Event())


def consent_needed(config: TrainConfig, trust_remote_code: bool, allow_pickle: bool) -> list[str]:
    """The flags a run's config asks for that this invocation has not given."""
    return [flag for flag, asked, given in (("--trust-remote-code", config.trust_remote_code, trust_remote_code),
                                             ("--allow-pickle", config.allow_pickle, allow_pickle))
            if asked and not given]


def _train(run: Run, prepared: Prepared, on_event: Callable[[Event], None], stop: threading.Event) -> RunResult:
    from app.core.qlora import QLoraSession

    plan = prepared.plan

    def emit(event: Event) -> None:
        run.append_event(event)
        if isinstance(event, (LogLine, PlanAdjusted)):
            run.log(event.message)
        on_event(event)

    session, step, last_loss, saved_step = None, 0, None, None
    result = lambda status, reason="": RunResult(  # noqa: E731
        run.id, str(run.dir), status, step, plan.total_steps, last_loss, str(run.adapter_dir), reason)
    try:
        storage = "in 4-bit" if plan.quantize == "4bit" else f"unquantised ({plan.compute_dtype})"
        emit(LogLine(f"Loading {prepared.model.name} {storage} on {plan.device}"))
        session = QLoraSession(prepared)
        for line in session.selftest_lines:
            run.log(line)
        if session.fallbacks:
            prepared.plan = plan = session.plan
            run.write_plan(plan)
            for change, message in session.fallbacks:
                emit(PlanAdjusted(0, change, message))
        state = {"step": 0, "elapsed_s": 0.0, "tokens": 0, "last_loss": None}
        checkpoint = run.verified_checkpoint()
        if checkpoint is not None:
            session.restore(checkpoint)
            state = _read_state(checkpoint)
            emit(LogLine(f"Resuming from {checkpoint.name}"))
        step, last_loss = state["step"], state["last_loss"]
        run.rewind_metrics(step)
        saved_step = step if checkpoint is not None else None
        emit(RunStarted(run.id, str(run.dir), plan.total_steps, step, len(prepared.train), len(prepared.val),
                        prepared.data_info["truncated"], prepared.data_info["skipped"], plan.device))
        run.log(f"LoRA rank {plan.rank}: {session.trainable_parameters:,} trainable parameters; "
                + "; ".join(session.notes))

        def save(at_step: int) -> None:
            nonlocal saved_step
            _check_checkpoint_space(run, session)
            path = run.checkpoint_path(at_step)
            session.save_checkpoint(path, {"step": at_step, "elapsed_s": elapsed(), "tokens": tokens,
                                           "last_loss": last_loss})
            run.prune_checkpoints()
            saved_step = at_step
            emit(CheckpointSaved(at_step, str(path)))

        started, before, tokens = time.monotonic(), state["elapsed_s"], state["tokens"]
        elapsed = lambda: before + time.monotonic() - started  # noqa: E731
        session_tokens, session_steps, status_written = 0, 0, 0.0
        order = _epoch_batches(prepared)
        while step < plan.total_steps:
            if stop.is_set():
                if saved_step != step:
                    save(step)
                run.write_status("stopped", step=step, last_loss=last_loss, elapsed_s=elapsed(),
                                 reason="stopped by the user")
                emit(RunFinished("stopped", step, plan.total_steps, last_loss, ""))
                return result("stopped")
            chosen = order.for_step(step)
            lr = session.current_lr()
            backoff = None
            try:
                loss, step_tokens, grad_norm = session.train_step(
                    [[prepared.train[i] for i in batch] for batch in chosen])
            except Exception as err:  # noqa: BLE001 - only out-of-memory is handled here
                backoff = next_backoff(plan) if is_out_of_memory(err) else None
                if backoff is None:
                    raise
            if backoff is not None:  # outside `except`, so the failed step's tensors are freed
                plan, change, message = backoff
                _apply_backoff(session, prepared, plan, change)
                order = _epoch_batches(prepared)
                run.write_plan(plan)
                emit(PlanAdjusted(step, change, f"Out of GPU memory at step {step + 1}: {message}; retrying"))
                continue
            step, last_loss = step + 1, loss
            tokens, session_tokens, session_steps = tokens + step_tokens, session_tokens + step_tokens, session_steps + 1
            spent = time.monotonic() - started
            emit(StepMetrics(step, plan.total_steps, step / plan.steps_per_epoch, loss, lr, grad_norm, step_tokens,
                             session_tokens / spent, elapsed(), spent / session_steps * (plan.total_steps - step)))
            if plan.eval_every and prepared.val and (step % plan.eval_every == 0 or step == plan.total_steps):
                eval_loss, evaluated_with = _evaluate(session, prepared, run, emit, step)
                if evaluated_with is not plan:  # backed off during evaluation: train the same way
                    plan, order = evaluated_with, _epoch_batches(prepared)
                emit(EvalMetrics(step, eval_loss))
                run.write_status("running", eval_loss=eval_loss)
            if time.monotonic() - status_written > STATUS_EVERY_S or step == plan.total_steps:
                run.write_status("running", step=step, last_loss=last_loss, elapsed_s=elapsed())
                status_written = time.monotonic()
            if step % plan.save_every == 0 and step < plan.total_steps:
                save(step)
        session.save_adapter(run.adapter_dir, prepared.tokenizer)
        run.write_status("finished", step=step, last_loss=last_loss, elapsed_s=elapsed(), reason="")
        emit(RunFinished("finished", step, plan.total_steps, last_loss, str(run.adapter_dir)))
        return result("finished")
    except KeyboardInterrupt:  # a second Ctrl-C: no time to save, resume from the last checkpoint
        run.write_status("stopped", step=saved_step or 0,
                         reason=f"aborted at step {step} (Ctrl-C twice); resumes from the last checkpoint")
        raise
    except Exception as err:  # noqa: BLE001 - every failure must end as an honest status
        reason = _failure_reason(err, step, plan, session, run)
        for record in (lambda: run.log(traceback.format_exc()),  # on a full disk any of these may fail too:
                       lambda: run.write_status("failed", step=step, last_loss=last_loss, reason=reason),
                       lambda: run.append_event(RunFailed(reason, step))):
            try:  # the run then reads "interrupted" (its lock is gone) and resumes the same way
                record()
            except OSError:
                pass
        on_event(RunFailed(reason, step))
        return result("failed", reason)
    finally:
        if session is not None:
            session.release()
        if run.lock is not None:
            run.lock.release()


def _evaluate(session, prepared: Prepared, run: Run, emit, step: int) -> tuple[float, Plan]:
    """The validation loss, backing off like a training step when evaluation runs out of memory
    (it holds no gradients, but a long validation example can still be the largest batch)."""
    while True:
        backoff = None
        try:
            return session.evaluate(prepared.val), prepared.plan
        except Exception as err:  # noqa: BLE001 - only out-of-memory is handled here
            backoff = next_backoff(prepared.plan) if is_out_of_memory(err) else None
            if backoff is None:
                raise
        plan, change, message = backoff  # outside `except`, so the failed batch's tensors are freed
        _apply_backoff(session, prepared, plan, change)
        run.write_plan(plan)
        emit(PlanAdjusted(step, change, f"Out of GPU memory evaluating at step {step}: {message}; retrying"))


def _apply_backoff(session, prepared: Prepared, plan: Plan, change: str) -> None:
    """Make the session and data match the backed-off plan."""
    session.free_step_memory()
    prepared.plan = session.plan = plan
    if change == "grad_checkpointing":
        session.enable_checkpointing()
    elif change == "seq_len":
        prepared.train = truncate(prepared.train, plan.seq_len)[0]
        prepared.val = truncate(prepared.val, plan.seq_len)[0]


def _epoch_batches(prepared: Prepared) -> EpochBatches:
    """The micro-batches of each epoch for the current plan and data (after any back-off)."""
    return EpochBatches([len(e.input_ids) for e in prepared.train], prepared.plan, prepared.config.seed)


def _read_state(checkpoint) -> dict:
    return json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))


DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
CHECKPOINT_SPACE_FACTOR = 1.5  # the new checkpoint is written beside the last one, then renamed
CHECKPOINT_SPACE_SLACK = 20_000_000  # status, metrics and log lines until the next check


def _checkpoint_bytes(run: Run, session) -> int:
    """About how much a checkpoint takes: the last one's size, else the LoRA weights with their
    two fp32 moments (8-bit state is smaller) and a little for the rest."""
    latest = run.latest_checkpoint()
    if latest is not None:
        return sum(p.stat().st_size for p in latest.rglob("*") if p.is_file())
    return session.trainable_parameters * (4 + 8) + 1_000_000


def _check_checkpoint_space(run: Run, session) -> None:
    import shutil

    needed = int(CHECKPOINT_SPACE_FACTOR * _checkpoint_bytes(run, session)) + CHECKPOINT_SPACE_SLACK
    free = shutil.disk_usage(run.dir).free
    if free < needed:
        raise DiskFullError(f"disk full: a checkpoint needs about {needed / 1e9:.2f} GB free at {run.dir}, "
                            f"there are {free / 1e9:.2f} GB; free some space, then resume (the last "
                            "checkpoint is intact)")


def _is_disk_full(err: BaseException | None) -> bool:
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


def _failure_reason(err: Exception, step: int, plan: Plan, session, run: Run | None = None) -> str:
    if isinstance(err, UserError):
        return str(err)
    if _is_disk_full(err):
        needed = (f"about {CHECKPOINT_SPACE_FACTOR * _checkpoint_bytes(run, session) / 1e9:.2f} GB"
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
        if next_backoff(plan) is None:
            return (f"out of GPU memory at step {step} even with checkpointing, micro-batch 1 and "
                    f"{plan.seq_len} tokens; close other programs using the GPU, or choose a smaller model")
        return (f"out of GPU memory at step {step}; lower the sequence length or the micro-batch, "
                "or turn gradient checkpointing on")
    return f"{type(err).__name__} at step {step}: {text[:200]} (details in train.log)"
