"""Train a run from start to end, or resume one: `run_training`, `train_prepared` and
`resume_training`, each in this process or on the plan's processes (parallel/launch.py), then the
before/after report (eval/run_report.py). The loop itself is loop.py.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Callable

from app.core.config import Plan, TrainConfig
from app.core.data.tokenize import answers_of
from app.core.errors import RunError
from app.core.eval.report import HeldOut
from app.core.eval.run_report import report_after_run
from app.core.events import Event, LogLine, RunCreated
from app.core.models.resolve import remember_model
from app.core.run_lock import RunLock
from app.core.runs import Run, create_run, open_run
from app.core.train.loop import RunResult, emitter, train_here
from app.core.train.prepare import Prepared, prepare_training


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
    return _train_here_or_on_workers(run, prepared, on_event or (lambda event: None), stop or threading.Event())


def _train_here_or_on_workers(run: Run, prepared: Prepared, on_event, stop) -> RunResult:
    """In this process, or on the plan's processes (launch.py), this one holding the run's lock;
    then, the run finished or stopped and its model released, the before/after report."""
    on_event(RunCreated(run.id, str(run.dir)))  # the window shows the plan that runs before anything loads
    try:
        if prepared.plan.gpus <= 1 and prepared.plan.nodes <= 1:
            result = train_here(run, prepared, on_event, stop)
        else:
            from app.core.train.parallel.launch import run_workers  # at call time: tests replace run_workers there

            result = run_workers(run, prepared.plan.gpus, on_event, stop)
        if result.status in ("finished", "stopped"):
            _report(run, prepared, emitter(run, on_event), stop)
        return result
    finally:
        if run.lock is not None:
            run.lock.release()


def _report(run: Run, prepared: Prepared, emit, stop) -> None:
    """The report (eval/run_report.py) on the run's own eval examples; "Stop now" skips the rest of
    it, and so does Stop pressed once the run had finished."""
    if getattr(stop, "now", False):
        emit(LogLine(f"No report for a run stopped now; Make report in the Runs tab (tunesmith eval {run.id}) makes "
                     "one"))
        return
    config, why = prepared.config, prepared.data_info.get("held_out", "")
    where = why if config.val_data else f"held out of {Path(config.data).name}: {why}"
    val = answers_of(prepared.val)
    held = HeldOut(val, prepared.val_rows, where) if val else HeldOut(where=why)
    stopped_before = stop.is_set()
    report_after_run(run, config, lambda message, level: emit(LogLine(message, level)),
                     lambda: getattr(stop, "now", False) or (stop.is_set() and not stopped_before), held=held)


def resume_training(ref: str, on_event: Callable[[Event], None] | None = None,
                    stop: threading.Event | None = None, trust_remote_code: bool = False,
                    allow_pickle: bool = False, gpus: int | None = None) -> RunResult:
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
        leftovers = run.remove_leftovers()  # before any worker starts: nobody else writes the run now
        if leftovers:
            run.log(f"Removed {leftovers} half-written file(s) or folder(s) a stopped process had left")
        config, info = run.config(), run.data_info()
        plan = regrouped(run.plan(), gpus) if gpus else run.plan()
        prepared = prepare_training(config, log=lambda message: on_event(LogLine(message)), plan=plan)
        for key, file in (("sha256", "file"), ("val_sha256", "val_file")):
            if info.get(key) and prepared.data_info[key] != info[key]:
                raise RunError(f"{info[file]}: changed since run {run.id} started; resume needs the same "
                               "data (restore the file, or start a new run)")
        if plan != run.plan():
            run.write_plan(plan)
            on_event(LogLine(f"Resuming on {plan.gpus} process{'es' * (plan.gpus > 1)}: {plan.reasons['gpus']}"))
        run.write_status("running", reason="")
    except BaseException:
        run.lock.release()
        raise
    return _train_here_or_on_workers(run, prepared, on_event, stop or threading.Event())


def regrouped(plan: Plan, gpus: int) -> Plan:
    """`plan` on `gpus` processes with the same micro-batches per optimizer step (the accumulation
    shared out again), so that a run resumes on another number of GPUs as if it had not moved."""
    if gpus == plan.gpus:
        return plan
    if plan.strategy.startswith("fsdp") and gpus < 2:
        raise RunError(f"--gpus {gpus}: this run shards its model over the GPUs (FSDP); resume it on 2 or more")
    nodes = max(1, plan.nodes)
    step = plan.grad_accum * plan.gpus * nodes
    if gpus < 1 or step % (gpus * nodes):
        counts = " or ".join(str(n) for n in range(1, step // nodes + 1) if step % (n * nodes) == 0)
        raise RunError(f"--gpus {gpus}: each step of this run has {step} micro-batches, which {gpus * nodes} processes "
                       f"cannot share equally; resume with --gpus {counts}")
    why = (f"resumed on {gpus} process{'es' * (gpus > 1)}, {step // (gpus * nodes)} micro-batches each a step "
           f"(the run's {step} a step, as before)")
    return replace(plan, gpus=gpus, grad_accum=step // (gpus * nodes), reasons={**plan.reasons, "gpus": why})


def consent_needed(config: TrainConfig, trust_remote_code: bool, allow_pickle: bool) -> list[str]:
    """The flags a run's config asks for that this invocation has not given."""
    return [flag for flag, asked, given in (("--trust-remote-code", config.trust_remote_code, trust_remote_code),
                                             ("--allow-pickle", config.allow_pickle, allow_pickle))
            if asked and not given]
