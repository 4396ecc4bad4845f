"""The training loop: load, restore, then `while step < total: stop? / one step / after step`.

The loop is ours (not transformers' Trainer) so that stop, resume and progress are exact: the
data order of each epoch is a function of the seed, a checkpoint holds the adapter, optimizer,
schedule and RNG state, and `stop` (a threading.Event) is checked between optimizer steps.
Every event goes to `on_event` and to the run's metrics.jsonl; the run's status.json always says
what happened, and the model is released in a `finally` whatever the outcome.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Callable

from app.core.config import Plan
from app.core.data.batches import EpochBatches
from app.core.data.tokenize import truncate
from app.core.events import (CheckpointSaved, EvalMetrics, Event, LogLine, PlanAdjusted, PreferenceMetrics, RunFailed,
                             RunFinished, RunStarted, StepMetrics)
from app.core.runs import Run, checkpoint_state, read_history
from app.core.speeds import remember_speed
from app.core.train.failures import check_checkpoint_space, failure_reason
from app.core.train.interrupt import StepInterrupted, StepWatch
from app.core.train.oom import is_out_of_memory, next_backoff
from app.core.train.overfit import EvalJudge
from app.core.train.prepare import Prepared
from app.core.train.session import ADAPTER_NOTE, QLoraSession

STATUS_EVERY_S = 1.0
EVAL_AT_LEAST_EVERY_S = 15 * 60  # on a slow machine the plan's every-N-steps can be an hour apart: eval sooner


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


def train_worker(run: Run, prepared: Prepared, ranks, stop) -> RunResult:
    """One worker's part of a run on several processes (worker.py): `ranks` says which."""
    return train_here(run, prepared, lambda event: None, stop, ranks)


def train_here(run: Run, prepared: Prepared, on_event: Callable[[Event], None], stop: threading.Event,
           ranks=None) -> RunResult:
    """Load, restore, train to the planned step (or until `stop`), save; every outcome ends as an
    honest status in the run folder and a RunResult, and the model and the run's lock are released."""
    emit = emitter(run, on_event)
    session, loop = None, None
    try:
        plan = prepared.plan
        storage = "in 4-bit" if plan.quantize == "4bit" else f"unquantised ({plan.compute_dtype})"
        emit(LogLine(f"Loading {prepared.model.name} {storage} on {plan.device}"))
        session = QLoraSession(prepared, ranks)
        prepared = _adopt_self_test(run, prepared, session, emit)
        loop = _Loop.start(run, prepared, session, emit)
        if ranks is None:  # one process: "stop now" within a layer, a long step's progress (workers: per step)
            loop.watch = StepWatch(session.model, stop, on_event)  # progress to the caller, not metrics.jsonl
            session.on_pass = loop.watch.on_pass
        try:
            while loop.step < loop.plan.total_steps:
                if stop.is_set():
                    return loop.stop()
                if loop.train_one_step():
                    loop.after_step()
                if loop.early_stopped:
                    break
        except StepInterrupted:
            return loop.stop_now()
        return loop.finish()
    except KeyboardInterrupt:  # a second Ctrl-C: no time to save, resume from the last checkpoint
        step = loop.step if loop else 0
        run.write_status("stopped", step=(loop.saved_step if loop else None) or 0,
                         reason=f"aborted at step {step} (Ctrl-C twice); resumes from the last checkpoint")
        raise
    except Exception as err:  # noqa: BLE001 - every failure must end as an honest status
        return _failed(run, err, loop, prepared.plan, session, on_event)
    finally:
        if session is not None:
            session.release()
        if ranks is not None and run.lock is not None:  # a worker's; the main process's goes after the report
            run.lock.release()


def emitter(run: Run, on_event: Callable[[Event], None]) -> Callable[[Event], None]:
    """Every event to the run's metrics.jsonl (and log lines to train.log), then to `on_event`."""
    def emit(event: Event) -> None:
        run.append_event(event)
        if isinstance(event, (LogLine, PlanAdjusted)):
            run.log(event.message)
        on_event(event)
    return emit


def _adopt_self_test(run: Run, prepared: Prepared, session, emit) -> Prepared:
    """The data with the plan the session trains with: its self-test may have replaced a kernel
    that fails on this machine (each change is written to the run and announced)."""
    for line in session.selftest_lines:
        run.log(line)
    if not session.fallbacks:
        return prepared
    run.write_plan(session.plan)
    for change, message in session.fallbacks:
        emit(PlanAdjusted(0, change, message))
    return replace(prepared, plan=session.plan)


@dataclass
class _Loop:
    """A run in progress: everything the training loop reads and changes, in one place."""

    run: Run
    prepared: Prepared  # the data as the current plan has it (a back-off makes a new one)
    session: object
    emit: Callable[[Event], None]
    order: EpochBatches
    step: int = 0
    last_loss: float | None = None
    tokens: int = 0
    saved_step: int | None = None  # the step of the checkpoint on disk, if any
    before_s: float = 0.0  # training time of earlier sessions of this run
    started: float = field(default_factory=time.monotonic)
    evaluated: float = field(default_factory=time.monotonic)  # the last eval's end (or this session's start)
    session_tokens: int = 0
    session_spent: float = 0.0  # seconds from this session's start to its last finished step
    session_steps: int = 0
    status_written: float = 0.0
    lr: float = 0.0  # of the step being taken
    grad_norm: float = 0.0
    step_tokens: int = 0
    peak_bytes: int = 0  # the measured peak (plan's measure: CUDA peak allocation, CPU peak RSS), any process
    watch: StepWatch | None = None  # stop now and a long step's progress (one process only)
    judge: EvalJudge | None = None  # the overfitting alarm (overfit.py), when there is eval data
    early_stopped: bool = False

    @property
    def plan(self) -> Plan:
        return self.prepared.plan

    @classmethod
    def start(cls, run: Run, prepared: Prepared, session, emit) -> "_Loop":
        """Restore the latest verified checkpoint, if any, and announce the run."""
        loop = cls(run, prepared, session, emit, _epoch_batches(prepared))
        checkpoint = run.verified_checkpoint(lambda message: emit(LogLine(message, "warning")))
        if checkpoint is not None:
            session.restore(checkpoint)
            state = checkpoint_state(checkpoint)
            loop.step, loop.last_loss, loop.tokens = state["step"], state["last_loss"], state["tokens"]
            loop.before_s, loop.saved_step = state["elapsed_s"], state["step"]
            emit(LogLine(f"Resuming from {checkpoint.name}"))
        run.rewind_metrics(loop.step)
        session.prepare_reference(run.dir, prepared, lambda message: emit(LogLine(message)))
        config = prepared.config
        if prepared.plan.eval_every and prepared.val and config.early_stop != "off":
            history = read_history(run)
            loop.judge = EvalJudge.from_history(config.patience, history.steps, history.losses, history.eval_steps,
                                                history.eval_losses, loop.step)
        loop.peak_bytes = int(run.raw_status().get("peak_bytes") or 0)  # earlier sessions' peak, if resumed
        plan, info = prepared.plan, prepared.data_info
        emit(RunStarted(run.id, str(run.dir), plan.total_steps, loop.step, len(prepared.train), len(prepared.val),
                        info["truncated"], info["skipped"], plan.device))
        run.log(f"LoRA rank {plan.rank}: {session.trainable_parameters:,} trainable parameters; "
                + "; ".join(session.notes))
        loop.started = loop.evaluated = time.monotonic()  # this session's clock: tokens/s and the ETA count from here
        return loop

    def elapsed(self) -> float:
        return self.before_s + time.monotonic() - self.started

    def result(self, status: str, reason: str = "") -> RunResult:
        return RunResult(self.run.id, str(self.run.dir), status, self.step, self.plan.total_steps, self.last_loss,
                         str(self.run.adapter_dir), reason)

    def train_one_step(self) -> bool:
        """One optimizer step; False when it ran out of memory and the plan backed off instead."""
        batches = [[self.prepared.train[i] for i in batch] for batch in self.order.for_step(self.step)]
        self.lr = self.session.current_lr()
        backoff = None
        if self.watch:
            self.watch.begin_step(self.step + 1, self.plan.total_steps)
        try:
            loss, step_tokens, self.grad_norm = self.session.train_step(batches)
        except Exception as err:  # noqa: BLE001 - only out-of-memory is handled here
            backoff = next_backoff(self.plan) if is_out_of_memory(err) else None
            if backoff is None:
                raise
        finally:
            if self.watch:
                self.watch.end_step()
        if backoff is not None:  # outside `except`, so the failed step's tensors are freed
            self._back_off(backoff, f"Out of GPU memory at step {self.step + 1}")
            return False
        self.step, self.last_loss, self.step_tokens = self.step + 1, loss, step_tokens
        self.tokens, self.session_tokens = self.tokens + step_tokens, self.session_tokens + step_tokens
        self.session_steps += 1
        return True

    def after_step(self) -> None:
        """Report the step, then evaluate, write the status and save a checkpoint when each is due."""
        plan, spent = self.plan, time.monotonic() - self.started
        self.session_spent = spent
        self.emit(StepMetrics(self.step, plan.total_steps, self.step / plan.steps_per_epoch, self.last_loss,
                              self.lr, self.grad_norm, self.step_tokens, self.session_tokens / spent, self.elapsed(),
                              spent / self.session_steps * (plan.total_steps - self.step),
                              tuple(self.session.memory)))
        if self.session.preference is not None:
            self.emit(PreferenceMetrics(self.step, "train", **self.session.preference.take()))
        self.peak_bytes = max(self.peak_bytes, *self.session.memory, 0)
        if self.judge is not None:
            self.judge.add_step(self.last_loss)
        last = self.step == plan.total_steps
        # by time too, in one process only: the processes of a run must agree on every eval, and clocks do not
        overdue = self.session.ranks is None and time.monotonic() - self.evaluated >= EVAL_AT_LEAST_EVERY_S
        if plan.eval_every and self.prepared.val and (self.step % plan.eval_every == 0 or last or overdue):
            self.evaluate()
        if time.monotonic() - self.status_written > STATUS_EVERY_S or last:
            self.run.write_status("running", step=self.step, last_loss=self.last_loss, elapsed_s=self.elapsed(),
                                  peak_bytes=self.peak_bytes)
            self.status_written = time.monotonic()
        if self.step % self.plan.save_every == 0 and not last:
            self.save()

    def evaluate(self) -> None:
        """The validation loss, backing off like a training step when evaluation runs out of memory
        (it holds no gradients, but a long validation example can still be the largest batch)."""
        while True:
            backoff = None
            try:
                eval_loss = self.session.evaluate(self.prepared.val)
                break
            except Exception as err:  # noqa: BLE001 - only out-of-memory is handled here
                backoff = next_backoff(self.plan) if is_out_of_memory(err) else None
                if backoff is None:
                    raise
            self._back_off(backoff, f"Out of GPU memory evaluating at step {self.step}")  # tensors freed
        self.evaluated = time.monotonic()
        self.emit(EvalMetrics(self.step, eval_loss))
        if self.session.preference is not None:
            self.emit(PreferenceMetrics(self.step, "eval", **self.session.eval_preference))
        self.run.write_status("running", eval_loss=eval_loss)
        if self.judge is not None:
            self._judge(eval_loss)

    def _judge(self, eval_loss: float) -> None:
        """Keep the best eval's adapter; raise the overfitting alarm once (and stop, if asked)."""
        verdict = self.judge.add_eval(self.step, eval_loss)
        if verdict.best and self.step < self.plan.total_steps:  # the last step's adapter is saved anyway
            self.session.save_adapter(self.run.best_adapter_dir, self.prepared.tokenizer,
                                      {"step": self.step, "eval_loss": eval_loss})
        if verdict.alarm:
            stopping = self.prepared.config.early_stop == "stop"
            best_step = self.judge.best[0]
            then = (f"; stopping early: the run's adapter will be step {best_step}'s" if stopping else
                    f"; training goes on, and unless a later eval beats step {best_step}'s, its adapter will be the "
                    "run's (to stop at such a point: --early-stop stop)")
            self.emit(LogLine(verdict.alarm + then, "warning"))
            self.early_stopped = stopping

    def save(self) -> None:
        check_checkpoint_space(self.run, self.session)
        path = self.run.checkpoint_path(self.step)
        self.session.save_checkpoint(path, {"step": self.step, "elapsed_s": self.elapsed(), "tokens": self.tokens,
                                            "last_loss": self.last_loss})
        self.run.prune_checkpoints()
        self.saved_step = self.step
        self.emit(CheckpointSaved(self.step, str(path)))

    def stop(self) -> RunResult:
        """The user's Stop: a checkpoint at this step (unless there is one), then "stopped"."""
        self.remember_speed()
        if self.saved_step != self.step:
            self.save()
        self.run.write_status("stopped", step=self.step, last_loss=self.last_loss, elapsed_s=self.elapsed(),
                              reason="stopped by the user", peak_bytes=self.peak_bytes)
        self.emit(RunFinished("stopped", self.step, self.plan.total_steps, self.last_loss, ""))
        return self.result("stopped")

    def stop_now(self) -> RunResult:
        """The user's "Stop now", asked during a step: the step is dropped (its gradients were never
        applied), the last checkpoint kept; a resume repeats the steps after it."""
        self.remember_speed()  # of the steps it finished
        self.session.free_step_memory()
        kept = self.saved_step or 0
        dropped = self.step + 1
        where = f"from step {kept} (the last checkpoint)" if kept else "from the start (no checkpoint yet)"
        reason = f"stopped by the user during step {dropped}; the step was dropped and resume continues {where}"
        self.run.write_status("stopped", step=kept, last_loss=self.last_loss, elapsed_s=self.elapsed(),
                              reason=reason, peak_bytes=self.peak_bytes)
        self.emit(LogLine(reason[:1].upper() + reason[1:]))
        self.emit(RunFinished("stopped", kept, self.plan.total_steps, self.last_loss, ""))
        return replace(self.result("stopped", reason), step=kept)

    def remember_speed(self) -> None:
        """This session's speed, for the next plan of this model trained this way (speeds.py)."""
        remember_speed(self.prepared.config.model, self.plan, self.session_tokens, self.session_spent, self.run.id)

    def finish(self) -> RunResult:
        self.remember_speed()
        self.session.save_adapter(self.run.adapter_dir, self.prepared.tokenizer)
        reason = self._keep_the_best()
        if reason:
            self.emit(LogLine(reason))
        self.run.write_status("finished", step=self.step, last_loss=self.last_loss, elapsed_s=self.elapsed(),
                              reason=reason, peak_bytes=self.peak_bytes)
        self.emit(RunFinished("finished", self.step, self.plan.total_steps, self.last_loss, str(self.run.adapter_dir)))
        return self.result("finished", reason)

    def _keep_the_best(self) -> str:
        """After an overfitting alarm, the best eval's adapter becomes the run's (chat and export
        use it) and the last step's moves to last-adapter/; without one the best's copy goes."""
        best = self.run.best_adapter_dir
        judge = self.judge
        if judge is None or not judge.alarmed_at or judge.best is None or judge.best[0] == self.step \
                or not best.is_dir():
            if best.is_dir() and (self.session.ranks is None or self.session.ranks.main):
                shutil.rmtree(best, ignore_errors=True)
            return ""
        step, loss = judge.best
        if _kept_step(best) != step:  # the best's copy is of another step (a resume went back past it)
            shutil.rmtree(best, ignore_errors=True)
            return ""
        if self.session.ranks is None or self.session.ranks.main:
            last = self.run.last_adapter_dir
            if last.exists():
                shutil.rmtree(last)
            self.run.adapter_dir.rename(last)
            best.rename(self.run.adapter_dir)
        last_eval = judge.evals[-1][1]
        how = f"stopped early at step {self.step} of {self.plan.total_steps}" if self.early_stopped else \
            f"overfitting from step {judge.alarmed_at}"
        return (f"{how}: the adapter is step {step}'s, the best eval (loss {loss:.3f}; the last eval "
                f"{last_eval:.3f}); the last step's adapter is in {self.run.last_adapter_dir.name}/")

    def _back_off(self, backoff: tuple[Plan, str, str], what: str) -> None:
        plan, change, message = backoff
        self.prepared, self.order = _backed_off(self.session, self.prepared, plan, change)
        self.run.write_plan(plan)
        self.emit(PlanAdjusted(self.step, change, f"{what}: {message}; retrying"))


def _kept_step(adapter) -> int | None:
    """The step of an adapter kept mid-run (its tunesmith.json), or None."""
    try:
        return int(json.loads((adapter / ADAPTER_NOTE).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _backed_off(session, prepared: Prepared, plan: Plan, change: str) -> tuple[Prepared, EpochBatches]:
    """The data and batches for the backed-off `plan` (a shorter sequence truncates the examples),
    with the session switched to it."""
    session.free_step_memory()
    session.plan = plan
    if change == "grad_checkpointing":
        session.enable_checkpointing()
    train, val = prepared.train, prepared.val
    if change == "seq_len":
        train, val = truncate(train, plan.seq_len)[0], truncate(val, plan.seq_len)[0]
    prepared = replace(prepared, plan=plan, train=train, val=val)
    return prepared, _epoch_batches(prepared)


def _failed(run: Run, err: Exception, loop: _Loop | None, plan: Plan, session, on_event) -> RunResult:
    """Record a failure as well as the disk allows (on a full disk any record may fail too: the
    run then reads "interrupted", its lock gone, and resumes the same way)."""
    step, last_loss = (loop.step, loop.last_loss) if loop else (0, None)
    plan = loop.plan if loop else plan
    reason = failure_reason(err, step, plan, session, run)
    for record in (lambda: run.log(traceback.format_exc()),
                   lambda: run.write_status("failed", step=step, last_loss=last_loss, reason=reason),
                   lambda: run.append_event(RunFailed(reason, step))):
        try:
            record()
        except OSError:
            pass
    on_event(RunFailed(reason, step))
    return RunResult(run.id, str(run.dir), "failed", step, plan.total_steps, last_loss, str(run.adapter_dir), reason)


def _epoch_batches(prepared: Prepared) -> EpochBatches:
    """The micro-batches of each epoch for the current plan and data (after any back-off)."""
    return EpochBatches([len(e.input_ids) for e in prepared.train], prepared.plan, prepared.config.seed)
