"""What the Train tab says under its buttons: the status line's words for a step and for a run's end,
and the notice that keeps the changes a run made to its plan in view for the whole run."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel

from app.core.units import format_duration, memory_text
from app.gui.words import plain

NOTICE_LINES = 4  # the latest changes kept in view


def step_text(event) -> str:
    """A `StepMetrics` event: where the run is, how fast, how long to go."""
    return (f"step {event.step}/{event.total_steps} · epoch {event.epoch:.2f} · loss {event.loss:.4f} · "
            f"{event.tokens_per_s:,.0f} tokens/s · ETA {format_duration(event.eta_s)}{memory_text(event.memory, ' · ')}")


def end_text(result) -> str:
    """A run's end (a `RunResult`): finished, stopped (and from where it resumes) or failed, with
    the before/after report in a few words where the run was judged."""
    from app.core.eval.run_report import report_summary  # here: the window opens before the engine's modules load

    judged = result.status == "finished" or result.status == "stopped" and not result.reason  # not "stopped now"
    judged = report_summary(result.run_dir) if judged else ""
    judged = f" Before/after: {judged} (Runs ▸ Report)." if judged else ""
    if result.status == "finished":
        return f"Finished {result.step} steps, final loss {result.final_loss:.4f}. Adapter: {result.adapter_dir}.{judged}"
    if result.status == "stopped" and result.reason:  # stopped now: the reason says from where it resumes
        return f"{plain(result.reason)[:1].upper()}{plain(result.reason)[1:]}."
    if result.status == "stopped":
        return f"Stopped at step {result.step}/{result.total_steps}; Resume continues from the checkpoint.{judged}"
    return f"Failed: {plain(result.reason)}"


class Notice(QLabel):
    """What the run changed in its plan (a kernel that failed the self-test, an OOM back-off) or a
    warning (a damaged checkpoint skipped): kept in view for the whole run, where the status line
    moves on at the next step. Amber, readable on the light and the dark theme."""

    def __init__(self):
        super().__init__("")
        self.setWordWrap(True)
        self.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.setToolTip("Changes the run made to its plan; train.log in the run folder has the details")
        self.setObjectName("planNotice")
        self.setStyleSheet("color: #d97706;")
        self.hide()

    def add(self, message: str) -> None:
        lines = [line for line in self.text().split("\n") if line] + [f"⚠ {plain(message)}"]
        self.setText("\n".join(lines[-NOTICE_LINES:]))
        self.show()

    def reset(self) -> None:
        self.clear()
        self.hide()
