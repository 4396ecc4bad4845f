"""The Runs tab: every run in the run store as a sortable list; select one to draw its curves and
see its plan and its before/after report (Report: made when a run ends, or here with Make report),
select several to compare their loss (and the preference runs' reward margin and accuracy);
resume an interrupted run, open its folder, or delete it after a confirmation. The list is read
again whenever the tab is shown and when a run ends."""

from __future__ import annotations

import html
import os
from datetime import datetime

from PySide6.QtCore import Qt, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QKeySequence, QShortcut
from PySide6.QtWidgets import (QAbstractItemView, QComboBox, QHBoxLayout, QHeaderView, QInputDialog, QLabel,
                               QLineEdit, QMessageBox, QSplitter, QStackedWidget, QTabWidget, QTreeWidget,
                               QTreeWidgetItem, QVBoxLayout, QWidget)

from app.core.config import PREFERENCE_METHODS
from app.core.runs import display_names, short_id as short_id_of
from app.core.units import format_duration, gib, peak_text
from app.gui.widgets.controls import button, label
from app.gui.widgets.plots import ComparePlot, LearningRatePlot, LossPlot
from app.gui.widgets.preference_plots import PreferenceCompare, PreferencePlots
from app.gui.widgets.report_view import ReportView
from app.gui.workers import Threads

COLUMNS = ("Run", "Status", "Model", "Dataset", "Method", "Steps", "Loss", "Eval loss", "Peak memory", "Duration",
           "Started")
RESUMABLE = ("stopped", "failed", "interrupted")
STATUS_COLORS = {"finished": "#2e9e5b", "running": "#2f7ed8", "stopped": "#c08a1e", "interrupted": "#c08a1e",
                 "failed": "#d9534f"}


class RunItem(QTreeWidgetItem):
    """A row that sorts numbers as numbers (each cell keeps its sort key in UserRole)."""

    def __lt__(self, other: QTreeWidgetItem) -> bool:
        column = self.treeWidget().sortColumn() if self.treeWidget() else 0
        try:
            return self.data(column, Qt.UserRole) < other.data(column, Qt.UserRole)
        except TypeError:
            return self.text(column) < other.text(column)


class RunsTab(QWidget):
    """Past runs: list, curves, compare, resume, open, delete."""

    resume_requested = Signal(str)  # a run id; the window resumes it on the Train tab

    def __init__(self, threads=None):
        super().__init__()

        self.threads = threads or Threads()
        self.rows = []
        self.training = False  # the Train tab is running a run: no resume from here meanwhile
        self._histories: dict[tuple[str, float], tuple] = {}  # (RunHistory, PreferenceHistory) by run and change

        self.table = _run_table()
        self.refresh_button = button("refresh", "Refresh", "Read the run list again (F5)", self.refresh)
        self.resume_button = button("resume", "Resume", "Continue the selected stopped, failed or interrupted run "
                                    "from its last checkpoint, on the Train tab", self.resume)
        self.open_button = button("folder", "Open folder", "Show the run's folder (config, plan, metrics, log, "
                                  "checkpoints, adapter)", self.open_folder)
        self.delete_button = button("delete", "Delete…", "Delete the selected runs with their checkpoints and "
                                    "adapters (asks first)", self.delete_selected)
        self.rename_button = button("edit", "Rename…", "Give the selected run a name of your own (its folder "
                                    "keeps its id, which the command line uses)", self.rename_selected)
        self.compare_axis = QComboBox()
        self.compare_axis.addItem("by step", "step")
        self.compare_axis.addItem("by tokens trained", "tokens")
        self.compare_axis.setToolTip("Compare runs step by step, or by the tokens each has trained on (fair "
                                     "between runs whose steps hold different numbers of tokens)")
        self.compare_axis.currentIndexChanged.connect(lambda _: self._selection_changed())
        self.names: dict[str, str] = {}
        self.empty = QLabel("No runs yet. Train one on the Train tab; it appears here.")
        self.details = label(selectable=True)
        self.details.setAlignment(Qt.AlignTop | Qt.AlignLeft)
        self.loss = LossPlot()
        self.lr = LearningRatePlot()
        self.preference = PreferencePlots()  # a preference run's margin and accuracy
        self.compare = ComparePlot()
        self.compare_preference = PreferenceCompare()
        self.report = ReportView(self.threads)
        self.report.made.connect(self.refresh)
        self.views = QTabWidget()  # one run: its curves, its report
        self.curves = QStackedWidget()
        self._build_layout()
        self.table.itemSelectionChanged.connect(self._selection_changed)
        self.table.itemDoubleClicked.connect(lambda *_: self.open_folder())
        QShortcut(QKeySequence.Refresh, self, activated=self.refresh)
        QShortcut(QKeySequence.Delete, self.table, activated=self.delete_selected,
                  context=Qt.WidgetWithChildrenShortcut)
        self._selection_changed()

    def _build_layout(self) -> None:
        single = QSplitter(Qt.Vertical)
        for plot in (self.loss, self.preference, self.lr):
            single.addWidget(plot)
        single.setSizes([380, 240, 160])
        self.views.addTab(single, "Curves")
        self.views.addTab(self.report, "Report")
        self.views.setTabToolTip(1, "Did training help? Base and tuned side by side: held-out loss, answers, general "
                                    "questions (has it forgotten?)")
        self.curves.addWidget(self.views)
        compare = QWidget()
        compare_box = QVBoxLayout(compare)
        compare_box.setContentsMargins(0, 0, 0, 0)
        axis_row = QHBoxLayout()
        axis_row.addWidget(QLabel("Compare"))
        axis_row.addWidget(self.compare_axis)
        axis_row.addStretch(1)
        compare_box.addLayout(axis_row)
        compared = QSplitter(Qt.Vertical)
        compared.addWidget(self.compare)
        compared.addWidget(self.compare_preference)
        compared.setSizes([420, 240])
        compare_box.addWidget(compared, 1)
        self.curves.addWidget(compare)
        buttons = QHBoxLayout()
        for widget in (self.refresh_button, self.resume_button, self.rename_button, self.open_button,
                       self.delete_button):
            buttons.addWidget(widget)
        buttons.addStretch(1)
        left = QWidget()
        box = QVBoxLayout(left)
        box.setContentsMargins(0, 0, 0, 0)
        box.addLayout(buttons)
        box.addWidget(self.empty)
        box.addWidget(self.table, 3)
        box.addWidget(self.details, 1)
        splitter = QSplitter(Qt.Horizontal)
        splitter.addWidget(left)
        splitter.addWidget(self.curves)
        splitter.setSizes([620, 560])
        QVBoxLayout(self).addWidget(splitter)

    # -- the list ---------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read the run store again, keeping the selection."""
        from app.core.runs import list_runs  # here: the window opens before the engine's modules load

        chosen = set(self.selected_ids())
        self.rows = list_runs()
        self.names = display_names(self.rows)
        self.table.setSortingEnabled(False)
        self.table.clear()
        for row in self.rows:
            cells = [_cell(row, column, self.names, row.method) for column in COLUMNS]
            item = RunItem([text for text, _ in cells])
            for i, (_, key) in enumerate(cells):
                item.setData(i, Qt.UserRole, key)
            item.setData(0, Qt.UserRole + 1, row.id)
            item.setForeground(1, _color(STATUS_COLORS.get(row.status)))
            item.setToolTip(0, f"{row.id} (its folder; the command line takes this id)")
            item.setToolTip(1, row.reason or row.status)
            item.setToolTip(2, row.model)
            item.setToolTip(3, row.data)
            self.table.addTopLevelItem(item)
            item.setSelected(row.id in chosen)
        self.table.setSortingEnabled(True)
        if not chosen:
            self.table.sortItems(COLUMNS.index("Started"), Qt.DescendingOrder)
        for i in range(len(COLUMNS)):
            self.table.resizeColumnToContents(i)
        self.empty.setVisible(not self.rows)
        self._selection_changed()

    def selected_ids(self) -> list[str]:
        return [item.data(0, Qt.UserRole + 1) for item in self.table.selectedItems()]

    def select(self, *run_ids: str) -> None:
        """Select these runs (as a click would)."""
        self.table.clearSelection()
        for i in range(self.table.topLevelItemCount()):
            item = self.table.topLevelItem(i)
            item.setSelected(item.data(0, Qt.UserRole + 1) in run_ids)

    def _selected_rows(self) -> list:
        ids = set(self.selected_ids())
        return [row for row in self.rows if row.id in ids]

    def set_training(self, running: bool) -> None:
        self.training = running
        if not running:
            self.refresh()  # a run just ended: its status and losses changed
        self._update_buttons()

    def _update_buttons(self) -> None:
        rows = self._selected_rows()
        self.resume_button.setEnabled(len(rows) == 1 and rows[0].status in RESUMABLE and not self.training)
        self.open_button.setEnabled(len(rows) == 1)
        self.rename_button.setEnabled(len(rows) == 1)
        self.delete_button.setEnabled(bool(rows) and all(r.status != "running" for r in rows))

    # -- curves and details -----------------------------------------------------------------------
    def _selection_changed(self) -> None:
        rows = self._selected_rows()
        self._update_buttons()
        if len(rows) >= 2:
            runs = [(self.names.get(r.id, r.id), *self._history(r)) for r in rows]
            self.compare.show_runs([(name, history) for name, history, _ in runs], by=self.compare_axis.currentData())
            self.compare_preference.show_runs(runs, by=self.compare_axis.currentData())
            self.curves.setCurrentIndex(1)
            self.details.setText(f"Comparing {len(rows)} runs. Select one run to see its plan.")
            return
        self.curves.setCurrentIndex(0)
        if not rows:
            from app.core.runs import RunHistory  # here: the window opens before the engine's modules load

            self.loss.show_history(RunHistory())
            self.lr.show_history(RunHistory())
            self.preference.hide()
            self.report.show_run(None)
            self.details.setText("Select a run to draw its curves; select two or more to compare their loss."
                                 if self.rows else "")
            return
        history, preference = self._history(rows[0])
        self.loss.show_history(history)
        self.lr.show_history(history)
        self.preference.show_history(preference)
        self.report.show_run(rows[0], busy=self.training and rows[0].status == "running")
        self.details.setText(self._describe(rows[0], history))

    def _history(self, row) -> tuple:
        """The run's curves (RunHistory) and its preference measures (its `preference`), read once
        per change of the run (metrics.jsonl can hold 10k+ steps)."""
        from app.core.runs import RunHistory, open_run, read_history  # here: the window opens before the engine's modules load

        key = (row.id, row.updated)
        if key not in self._histories:
            try:
                history = read_history(open_run(row.id))
            except Exception:  # noqa: BLE001 - a damaged run folder draws nothing, the list says why
                history = RunHistory()
            self._histories[key] = (history, history.preference)
        return self._histories[key]

    def _describe(self, row, history) -> str:
        from app.core.errors import RunError  # here: the window opens before the engine's modules load
        from app.core.runs import open_run  # here: the window opens before the engine's modules load

        lines = [f"<b>{html.escape(self.names.get(row.id, row.id))}</b> ({html.escape(row.id)}) — {html.escape(row.status)}"
                 + (f": {html.escape(row.reason)}" if row.reason else "")]
        try:
            run = open_run(row.id)
            plan, config = run.plan(), run.config()
        except RunError as err:
            return "<br>".join(lines + [html.escape(str(err))])
        lines.append(f"Model {html.escape(row.model)} · data {html.escape(os.path.basename(row.data))} · "
                     f"{_method_text(config, self.names)}")
        lines.append(f"LoRA rank {plan.rank} · {plan.seq_len} tokens · micro-batch {plan.micro_batch} × "
                     f"{plan.grad_accum} · lr {config.lr:g} · checkpointing {'on' if plan.grad_checkpointing else 'off'}"
                     f" · {plan.device}")
        if plan.predicted_peak_bytes:
            lines.append(f"Predicted peak {gib(plan.predicted_peak_bytes)}"
                         + (f" of {gib(plan.budget_bytes)} usable" if plan.budget_bytes else ""))
        if history.tokens:
            lines.append(f"{history.tokens:,} tokens trained in {format_duration(history.elapsed_s)}")
        return "<br>".join(lines)

    # -- actions ----------------------------------------------------------------------------------
    def resume(self) -> None:
        rows = self._selected_rows()
        if self.resume_button.isEnabled() and len(rows) == 1:
            self.resume_requested.emit(rows[0].id)

    def rename_selected(self) -> None:
        from app.core.errors import UserError  # here: the window opens before the engine's modules load
        from app.core.runs import open_run  # here: the window opens before the engine's modules load

        rows = self._selected_rows()
        if len(rows) != 1:
            return
        row = rows[0]
        text, ok = QInputDialog.getText(self, "Rename the run", f"A name for {row.id}\n(empty: back to "
                                        f"{short_id_of(row.id)})", QLineEdit.Normal, row.label or self.names.get(row.id, ""))
        if not ok:
            return
        try:
            open_run(row.id).set_label(text)
        except (UserError, OSError) as err:
            QMessageBox.warning(self, "The run was not renamed", str(err))
            return
        self.refresh()

    def open_folder(self) -> None:
        from app.core.paths import runs_dir  # here: the window opens before the engine's modules load

        for run_id in self.selected_ids()[:1]:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(runs_dir() / run_id)))

    def delete_selected(self) -> None:
        from app.core.errors import UserError  # here: the window opens before the engine's modules load
        from app.core.runs import delete_run  # here: the window opens before the engine's modules load

        rows = self._selected_rows()
        if not rows or not self.delete_button.isEnabled():
            return
        names = "\n".join(f"• {r.id} ({r.status}, step {r.step}/{r.total_steps})" for r in rows[:8])
        more = f"\n…and {len(rows) - 8} more" if len(rows) > 8 else ""
        title = "Delete this run?" if len(rows) == 1 else f"Delete {len(rows)} runs?"
        answer = QMessageBox.question(
            self, title, f"{names}{more}\n\nIts checkpoints, adapter, metrics and log are deleted from disk. "
            "This cannot be undone.", QMessageBox.Yes | QMessageBox.Cancel, QMessageBox.Cancel)
        if answer != QMessageBox.Yes:
            return
        problems = []
        for row in rows:
            try:
                delete_run(row.id)
            except (UserError, OSError) as err:
                problems.append(str(err))
        self.refresh()
        if problems:
            QMessageBox.warning(self, "Some runs were not deleted", "\n".join(problems))


def _method_text(config, names: dict[str, str]) -> str:
    """"SFT", or a preference run's method with its beta and the run it started from (HTML)."""
    if config.method not in PREFERENCE_METHODS:
        return html.escape(config.method.upper())
    start = names.get(config.start_from, config.start_from) if config.start_from else "the base model"
    return f"{config.method.upper()} (beta {config.beta:g}) from {html.escape(start)}"


def _cell(row, column: str, names: dict[str, str], method: str = "") -> tuple[str, object]:
    """The text a column shows for a run, and the key it sorts by."""
    if column == "Run":
        name = names.get(row.id, row.id)
        return name, name
    if column == "Status":
        return row.status, row.status
    if column == "Model":
        return os.path.basename(row.model.rstrip("/\\")) or row.model, row.model
    if column == "Dataset":
        return os.path.basename(row.data), os.path.basename(row.data)
    if column == "Method":
        return method.upper() or "–", method
    if column == "Steps":
        return f"{row.step}/{row.total_steps}", row.step
    if column == "Loss":
        return _num(row.last_loss), row.last_loss if row.last_loss is not None else float("inf")
    if column == "Eval loss":
        return _num(row.eval_loss), row.eval_loss if row.eval_loss is not None else float("inf")
    if column == "Peak memory":  # measured against predicted: the plan's promise, kept or not
        return _peak_text(row.peak_bytes, row.predicted_bytes), (row.peak_bytes / row.predicted_bytes
                                                                 if row.peak_bytes and row.predicted_bytes else 0.0)
    if column == "Duration":
        return (format_duration(row.elapsed_s) if row.elapsed_s else "–"), row.elapsed_s or 0.0
    return datetime.fromtimestamp(row.created).strftime("%Y-%m-%d %H:%M"), row.created


def _peak_text(peak: int, predicted: int) -> str:
    return peak_text(peak, predicted) or "–"


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "–"


def _color(value: str | None):
    from PySide6.QtGui import QBrush, QColor

    return QBrush(QColor(value)) if value else QBrush()


def _run_table() -> QTreeWidget:
    table = QTreeWidget()
    table.setColumnCount(len(COLUMNS))
    table.setHeaderLabels(COLUMNS)
    table.setRootIsDecorated(False)
    table.setAlternatingRowColors(True)
    table.setSortingEnabled(True)
    table.setSelectionMode(QAbstractItemView.ExtendedSelection)
    table.setToolTip("Select a run to draw its curves; Ctrl- or Shift-click several to compare them")
    table.header().setSectionResizeMode(QHeaderView.Interactive)
    table.header().setStretchLastSection(False)
    return table
