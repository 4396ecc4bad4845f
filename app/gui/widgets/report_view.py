"""The Runs tab's Report view: a run's before/after report (report.md, eval/report.py) as a page,
and Make report to make it (again) on a worker thread, with its progress below and Stop."""

from __future__ import annotations

import threading
from pathlib import Path

from PySide6.QtCore import Signal, Slot
from PySide6.QtWidgets import QHBoxLayout, QTextBrowser, QVBoxLayout, QWidget

from app.gui.widgets.controls import button, label
from app.gui.workers import TaskWorker

JUDGED = ("finished", "stopped")


class ReportView(QWidget):
    made = Signal()  # a report was written (the run list may show it)

    def __init__(self, threads):
        super().__init__()
        self.threads = threads
        self.run_id = ""
        self.status = ""
        self.worker: TaskWorker | None = None
        self.cancel = threading.Event()
        self.page = QTextBrowser()
        self.page.setOpenExternalLinks(False)
        self.make_button = button("refresh", "Make report", "Judge the run against its base model again: held-out "
                                  "loss, 8 answers side by side, 50 general questions (a minute or two on a CPU)",
                                  self.make_or_stop)
        self.note = label("", selectable=True)
        row = QHBoxLayout()
        row.addWidget(self.make_button)
        row.addWidget(self.note, 1)
        box = QVBoxLayout(self)
        box.setContentsMargins(0, 0, 0, 0)
        box.addLayout(row)
        box.addWidget(self.page, 1)
        self.show_run(None)

    @property
    def making(self) -> bool:
        return self.worker is not None

    def show_run(self, row, busy: bool = False) -> None:
        """Show `row`'s report (a RunSummary, or None for no run selected)."""
        if self.making and row is not None and row.id == self.run_id:
            return  # its report is being made: the progress stays
        same = row is not None and row.id == self.run_id
        self.run_id, self.status = (row.id, row.status) if row is not None else ("", "")
        path = self._path()
        if row is None:
            self.page.setMarkdown("Select a run to read its before/after report.")
        elif path is not None and path.exists():
            try:
                self.page.setMarkdown(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as err:
                self.page.setPlainText(f"{path}: cannot read ({err})")
        elif busy or row.status == "running":
            self.page.setMarkdown("The run is training; its report is made when it finishes or is stopped.")
        else:
            self.page.setMarkdown("No report for this run yet. Runs that finish or stop get one at their end, unless "
                                  "it was switched off; **Make report** makes it now.")
        if not same:  # the same run shown again (the list refreshed) keeps what was said of it
            self.note.setText("")
        self._update_button(busy)

    def make_or_stop(self) -> None:
        if self.making:
            self.cancel.set()
            self.note.setText("Stopping after the part in progress…")
            return
        if not self.run_id:
            return
        from app.core.eval.report import ReportRequest  # here: the window opens before the engine's modules load
        from app.core.eval.run_report import make_report  # here: the window opens before the engine's modules load
        from app.core.paths import runs_dir  # here: the window opens before the engine's modules load

        run_dir, cancel = str(runs_dir() / self.run_id), threading.Event()
        self.cancel = cancel
        worker = TaskWorker(lambda say: make_report(run_dir, ReportRequest(), progress=say, cancelled=cancel.is_set),
                            tag=self.run_id, reports=True)
        worker.progress.connect(self._progress)
        worker.done.connect(self._done)
        worker.failed.connect(self._failed)
        self.worker = worker
        if self.threads.start(worker, worker.done, worker.failed) is None:
            self.worker = None
            return
        self.note.setText("Loading the base model with the adapter…")
        self._update_button()

    @Slot(object, str)
    def _progress(self, tag, message: str) -> None:
        if tag == self.run_id:
            self.note.setText(message)

    @Slot(object, object)
    def _done(self, tag, result) -> None:
        self.worker = None
        report = result[0]
        self.made.emit()  # the list is read again (which shows the selected run's report anew)
        if tag == self.run_id:
            self.show_run(_Row(tag, self.status))
            self.note.setText(f"Made in {report['seconds']['total']:.0f} s: " + "; ".join(report["lines"][:2]))
        self._update_button()

    @Slot(object, str)
    def _failed(self, tag, message: str) -> None:
        self.worker = None
        if tag == self.run_id:
            self.note.setText(f"<span style='color:#d9534f'>The report could not be made: {message}</span>")
        self._update_button()

    def _path(self) -> Path | None:
        if not self.run_id:
            return None
        from app.core.paths import runs_dir  # here: the window opens before the engine's modules load

        return runs_dir() / self.run_id / "report.md"

    def _update_button(self, busy: bool = False) -> None:
        self.make_button.setText("Stop" if self.making else
                                 "Make again" if (self._path() is not None and self._path().exists()) else "Make report")
        self.make_button.setEnabled(self.making or (bool(self.run_id) and self.status in JUDGED and not busy))


class _Row:
    """The little of a RunSummary that show_run reads."""

    def __init__(self, run_id: str, status: str):
        self.id, self.status = run_id, status
