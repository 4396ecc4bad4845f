"""Training progress on the terminal: a redrawn bar (or a line every few seconds when the output
is not a terminal), Ctrl-C that stops cleanly, and the closing line of a run."""

from __future__ import annotations

import signal
import sys
import threading
import time

from app.core.units import format_duration, memory_text, peak_text, step_progress_text


class Progress:
    """Prints training events: a redrawn bar on a terminal, a line every few seconds otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last_print = 0.0
        self.bar_open = False
        self.predicted, self.peak = 0, 0  # the run's predicted peak, and the measured one so far

    def __call__(self, event) -> None:
        from app.core.events import (CheckpointSaved, EvalMetrics, LogLine, PlanAdjusted, RunFailed,
                                           RunCreated, RunFinished, RunStarted, StepMetrics, StepProgress)  # here: each command loads its own part of the engine (the window starts without them)

        if isinstance(event, StepProgress):
            self._in_step(event)
        elif isinstance(event, StepMetrics):
            self.peak = max(self.peak, *event.memory, 0)
            self._step(event)
        elif isinstance(event, (LogLine, PlanAdjusted)):
            self._line(event.message)
        elif isinstance(event, RunCreated):
            device, self.predicted = _run_plan_facts(event.run_dir)
            if device:
                self._line(f"Device: {device}")  # as `tunesmith plan` says it
        elif isinstance(event, RunStarted):
            start = f" from step {event.start_step}" if event.start_step else ""
            self._line(f"Run {event.run_id}: {event.total_steps} steps{start}, {event.examples} examples"
                       f" on {event.device} (folder {event.run_dir})")
        elif isinstance(event, EvalMetrics):
            self._line(f"step {event.step}: eval loss {event.eval_loss:.4f}")
        elif isinstance(event, CheckpointSaved) and not self.tty:
            self._line(f"checkpoint saved at step {event.step}")
        elif isinstance(event, RunFinished):
            self._line(f"Run {event.status} at step {event.step}/{event.total_steps}"
                       + (f", loss {event.final_loss:.4f}" if event.final_loss is not None else "")
                       + peak_line(self.peak, self.predicted))
        elif isinstance(event, RunFailed):
            self._line(f"Run failed at step {event.step}: {event.reason}")

    def _step(self, e) -> None:
        width = 24
        filled = int(width * e.step / max(1, e.total_steps))
        text = (f"step {e.step}/{e.total_steps} [{'#' * filled}{'.' * (width - filled)}] loss {e.loss:.4f} "
                f"| {e.tokens_per_s:,.0f} tok/s | ETA {format_duration(e.eta_s)}{memory_text(e.memory, ' | ')}")
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + text.ljust(110))
            self.stream.flush()
            self.bar_open = True
        elif now - self.last_print >= 5 or e.step == e.total_steps or e.step == 1:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last_print = now

    def _in_step(self, e) -> None:
        """A long step's progress: redrawn on a terminal, a line every 30 s otherwise."""
        text = step_progress_text(e)
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + text.ljust(110))
            self.stream.flush()
            self.bar_open = True
        elif now - self.last_print >= 30:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last_print = now

    def _line(self, message: str) -> None:
        self.close()
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar_open:
            self.stream.write("\n")
            self.bar_open = False


def _run_plan_facts(run_dir: str) -> tuple[str, int]:
    """(the device line of a run's own plan, its predicted peak); ("", 0) if unreadable."""
    from app.core.errors import UserError  # here: each command loads its own part of the engine (the window starts without them)
    from app.core.runs import open_run  # here: each command loads its own part of the engine (the window starts without them)

    try:
        plan = open_run(run_dir).plan()
    except UserError:
        return "", 0
    return plan.reasons.get("device", ""), plan.predicted_peak_bytes


def peak_line(peak: int, predicted: int) -> str:
    """", peak memory 2.92 of 3.10 GiB predicted (94 %)"; "" before any step."""
    return f", peak memory {peak_text(peak, predicted)}" if peak else ""


def install_stop_handler(progress: Progress) -> threading.Event:
    """First Ctrl-C (or Ctrl-Break) asks the run to stop after this step (saving a checkpoint); a
    second aborts."""
    stop = threading.Event()

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        progress._line("Stopping after this step and saving a checkpoint (Ctrl-C again to abort)...")

    signal.signal(signal.SIGINT, handler)
    if hasattr(signal, "SIGBREAK"):  # Windows: Ctrl-Break, which would otherwise end the process at once
        signal.signal(signal.SIGBREAK, handler)
    return stop


def run_with_progress(start) -> int:
    progress = Progress()
    stop = install_stop_handler(progress)
    result = start(progress, stop)
    progress.close()
    return report_end(result)


def report_end(result) -> int:
    if result.status == "finished":
        print(f"Finished: adapter in {result.adapter_dir}" if result.adapter_dir else f"Finished: {result.reason}")
        return 0
    if result.status == "stopped":
        print(f"Stopped at step {result.step}/{result.total_steps}. Continue with: tunesmith resume {result.run_id}")
        return 0
    print(f"tunesmith: run {result.run_id} failed: {result.reason}", file=sys.stderr)
    return 1
