"""The Train tab, top to bottom on the left: model, dataset, method, memory budget, the plan, the
buttons and a status line; on the right the live graphs. Every slow thing (checking the file,
planning, training) runs on a worker thread; this tab only reacts to their signals."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSettings, Qt, QTimer, Signal
from PySide6.QtWidgets import (QCheckBox, QGroupBox, QHBoxLayout, QMenu, QScrollArea, QSplitter,
                               QVBoxLayout, QWidget)

from app.core.config import TrainConfig, field_help
from app.core.units import step_progress_text
from app.gui.tabs.train_dialogs import ask_resume_consent, error_box
from app.gui.tabs.train_status import Notice, end_text, step_text
from app.gui.widgets.controls import button, label
from app.gui.widgets.dataset_view import DatasetReport, DropZone
from app.gui.widgets.live_graphs import LiveGraphs
from app.gui.widgets.method_box import MethodBox
from app.gui.widgets.pickers import BudgetPicker, ModelPicker
from app.gui.widgets.plan_view import PlanView, preview_of, run_plan
from app.gui.words import plain
from app.gui.workers import TaskWorker, Threads, TrainingWorker

REPLAN_DELAY_MS = 250


class TrainTab(QWidget):
    """Set up a run, train it, watch it."""

    running_changed = Signal(bool)

    def __init__(self, threads: Threads, settings: QSettings | None = None):
        super().__init__()
        self.threads, self.settings = threads, settings
        self.data_path, self.summary = "", None
        self.worker: TrainingWorker | None = None
        self.last_run = None  # RunResult of the latest run, for Resume and the error dialog
        self.error_dialog = None
        self.engine_ready = False
        self.run_changes: dict[str, str] = {}  # plan field -> what the running run changed, for the panel
        self.run_dir = ""  # of the run the plan panel shows
        self._plan_request = self._data_request = 0
        self.graphs = LiveGraphs()
        self.loss_plot = self.graphs.loss
        self.model_picker = ModelPicker()
        self.model_box = self.model_picker.box
        self.budget = BudgetPicker(self._setting("last_preset", "auto"), self.graphs.source_text, self.graphs.cards)
        self.preset_box = self.budget.box
        self.drop = DropZone(self._setting("last_data_folder", ""))
        self.report = DatasetReport()
        self.skip_bad = QCheckBox("Skip bad rows")
        self.skip_bad.setToolTip(field_help(TrainConfig, "skip_bad"))
        self.skip_bad.hide()
        self.method = MethodBox()
        self.plan_view = PlanView()
        self.train_button = button("train", "Train", "Start training with this plan (Ctrl+Enter)")
        self.train_button.setDefault(True)
        self.stop_button = button("stop", "Stop", "Stop after this step with a checkpoint (Esc), or now")
        stop_menu = QMenu(self.stop_button)
        self.stop_after_action = stop_menu.addAction("After this step, with a checkpoint (Esc)", self.stop_training)
        self.stop_now_action = stop_menu.addAction("Now: drop the step in progress, keep the last checkpoint",
                                                   self.stop_now)
        self.stop_button.setMenu(stop_menu)
        self.resume_button = button("resume", "Resume", "Continue the stopped run from its last checkpoint")
        self.status = label("Choose a dataset to train on.", selectable=True)
        self.notice = Notice()  # what the run changed in its plan, kept in view for the whole run
        self._replan_timer = QTimer(self, singleShot=True, interval=REPLAN_DELAY_MS, timeout=self.replan)
        self._build_layout()
        self._connect()
        self.model_picker.look_up()
        self._update_buttons()

    def _build_layout(self) -> None:
        data_group = QGroupBox("Dataset")
        box = QVBoxLayout(data_group)
        for widget in (self.drop, self.report, self.skip_bad):
            box.addWidget(widget)
        plan_group = QGroupBox("Plan")
        QVBoxLayout(plan_group).addWidget(self.plan_view)
        setup = QWidget()
        left = QVBoxLayout(setup)
        for widget in (self.model_picker, data_group, self.method, self.budget, plan_group):
            left.addWidget(widget)
        left.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidget(setup)
        scroll.setWidgetResizable(True)
        scroll.setMinimumWidth(420)
        buttons = QHBoxLayout()
        for widget in (self.train_button, self.stop_button, self.resume_button):
            buttons.addWidget(widget)
        column = QWidget()  # the set-up scrolls; the buttons and the status line stay in view
        box = QVBoxLayout(column)
        box.setContentsMargins(0, 0, 0, 0)
        box.addWidget(scroll, 1)
        box.addLayout(buttons)
        box.addWidget(self.status)
        box.addWidget(self.notice)
        splitter = QSplitter(Qt.Horizontal)
        splitter.addWidget(column)
        splitter.addWidget(self.graphs)
        splitter.setSizes([480, 620])
        QVBoxLayout(self).addWidget(splitter)

    def _connect(self) -> None:
        self.model_picker.chosen.connect(self._model_chosen)
        self.drop.file_chosen.connect(self.load_dataset)
        self.budget.changed.connect(self.schedule_replan)
        self.skip_bad.toggled.connect(self._update_buttons)
        self.method.changed.connect(self.schedule_replan)
        self.method.changed.connect(self._update_buttons)
        self.plan_view.changed.connect(self.schedule_replan)
        self.train_button.clicked.connect(self.start_training)
        self.resume_button.clicked.connect(self.resume_training)

    # -- setup ----------------------------------------------------------------------------------
    def _setting(self, key: str, default):
        return self.settings.value(key, default) if self.settings is not None else default

    def _remember(self, key: str, value) -> None:
        if self.settings is not None:
            self.settings.setValue(key, value)

    def add_models(self, rows) -> None:
        """Models found by the background scan (HF cache, recent folders), then the catalogue."""
        from app.core.models.catalog import catalog  # here: the window opens before the engine's modules load

        self.model_picker.add_models([row.name if row.kind != "recent" else str(row.path) for row in rows]
                                     + [entry.id for entry in catalog()])

    def _model_chosen(self, name: str) -> None:
        self._remember("last_model", name)
        self.method.set_model(self.model_picker.name())  # the runs of this model to start from
        if self.data_path:
            self.load_dataset(self.data_path)  # token lengths depend on the tokenizer
        else:
            self.schedule_replan()

    # -- dataset and plan -------------------------------------------------------------------------
    def load_dataset(self, path: str) -> None:
        """Check `path` on a worker thread and show the report."""
        from app.core.data.check import DataCheck, check_dataset  # here: the window opens before the engine's modules load

        self.data_path = path
        self._remember("last_data_folder", str(Path(path).parent))
        self.drop.show_file(path)
        self.report.show_busy(path)
        self._data_request += 1
        request, model = self._data_request, self.model_box.currentText()
        check = DataCheck(path, model)
        worker = TaskWorker(lambda say: check_dataset(check, "preview", progress=say, doing=say), request,
                            reports=True)
        worker.progress.connect(self._dataset_progress)
        worker.done.connect(self._dataset_checked)
        worker.failed.connect(self._dataset_failed)
        self.threads.start(worker, worker.done, worker.failed)
        self._update_buttons()

    def _dataset_progress(self, request: int, message: str) -> None:
        if request == self._data_request:
            self.report.show_busy(self.data_path, message)

    def _dataset_checked(self, request: int, summary) -> None:
        if request != self._data_request:
            return
        self.summary = summary
        self.report.show_summary(summary)
        self.skip_bad.setVisible(bool(summary.problems) and summary.usable_rows > 0)
        self.method.data_checked(summary.report)  # pairs: DPO, unless the user chose a method
        self._update_buttons()
        self.schedule_replan()

    def _dataset_failed(self, request: int, message: str) -> None:
        if request != self._data_request:
            return
        self.summary = None
        self.report.show_error(message)
        self.method.data_checked(None)
        self._update_buttons()

    def config(self) -> TrainConfig:
        """The run the window describes now."""
        preset, card = self.budget.choice()
        return TrainConfig(model=self.model_picker.name(), data=self.data_path, preset=preset, gpu=card,
                           gpus=self.budget.gpus(), skip_bad=self.skip_bad.isChecked(), **self.method.values(),
                           **self.plan_view.fixed())

    def schedule_replan(self) -> None:
        if not self.running:  # while a run trains, the panel shows that run's plan
            self._replan_timer.start()

    def replan(self) -> None:
        """Make the plan on a worker thread (token lengths, estimator)."""
        from dataclasses import replace

        if self.preset_box.currentData():
            self._remember("last_preset", self.preset_box.currentData())
        if self.running:
            return
        try:
            config = self.config()
        except Exception as err:  # noqa: BLE001 - e.g. a setting out of range
            self._plan_request += 1  # a preview on its way is of settings no longer shown
            self.plan_view.show_error(str(err))
            self._update_buttons()
            return
        if self.summary is None:
            config = replace(config, data="")  # plan for the model alone until the data is checked
        # the check has measured the lengths; with no usable row the planner reads the file and says why
        lengths = (self.summary.lengths or None) if self.summary is not None else None
        rows = self.summary.report.examples if lengths else None  # to hold out the examples the run will
        config = replace(config, skip_bad=True)  # show the plan for the good rows
        self._plan_request += 1
        request = self._plan_request
        worker = TaskWorker(lambda: preview_of(config, lengths, rows), request)
        worker.done.connect(self._planned)
        worker.failed.connect(self._plan_failed)
        self.threads.start(worker, worker.done, worker.failed)

    def _planned(self, request: int, preview) -> None:
        if request == self._plan_request and not self.running:
            self.plan_view.show_plan(preview)
            self._update_buttons()

    def _plan_failed(self, request: int, message: str) -> None:
        if request == self._plan_request and not self.running:
            self.plan_view.show_error(message)
            self._update_buttons()

    # -- training ---------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.worker is not None

    def set_engine_ready(self) -> None:
        import gc

        # torch and transformers are imported now: keep their millions of objects out of every later
        # collection. A run calls gc.collect() (which holds the GIL) to free memory; over the whole
        # heap that froze the window for ~0.3 s.
        gc.freeze()
        self.engine_ready = True
        self._update_buttons()

    def _update_buttons(self) -> None:
        data_ok = self.summary is not None and self.summary.usable_rows > 0 and (
            not self.summary.problems or self.skip_bad.isChecked()) and not self.method.problem()
        self.train_button.setEnabled(not self.running and self.engine_ready and data_ok
                                     and self.plan_view.plan is not None)
        self.stop_button.setEnabled(self.running and not self.worker.stop_requested.now)
        self.stop_after_action.setEnabled(self.running and not self.worker.stop_requested.is_set())
        resumable = self.last_run is not None and self.last_run.status in ("stopped", "failed")
        self.resume_button.setEnabled(not self.running and self.engine_ready and resumable)
        if self.running or self.last_run is not None:
            return
        if self.summary is not None and self.summary.problems and not data_ok:
            self.status.setText("Fix the rows listed above, or tick “Skip bad rows” to train on the others.")
        elif self.summary is not None and self.method.problem():  # the engine would refuse the run
            self.status.setText(self.method.problem())
        elif data_ok and not self.engine_ready:
            self.status.setText("Loading the training engine…")
        elif data_ok and self.plan_view.plan is not None:
            self.status.setText(f"Ready to train on {self.summary.usable_rows} examples: press Train (Ctrl+Enter).")

    def start_training(self) -> None:
        from app.core.train.trainer import run_training  # here: the window opens before the engine's modules load

        if not self.train_button.isEnabled():
            return
        config = self.config()
        self.graphs.clear()
        self.notice.reset()
        self._start_worker(lambda on_event, stop: run_training(config, on_event, stop), "Starting…")

    def resume_training(self) -> None:
        """Resume the run this tab stopped (or that failed)."""
        if self.last_run is not None and self.resume_button.isEnabled():
            self.resume_run(self.last_run.run_id)

    def resume_run(self, run_id: str) -> None:
        """Resume a run (this tab's, or a past one asked from the Runs tab), drawing its curves so far first."""
        from app.core.errors import UserError  # here: the window opens before the engine's modules load
        from app.core.runs import open_run  # here: the window opens before the engine's modules load
        from app.core.train.trainer import resume_training  # here: the window opens before the engine's modules load

        if self.running:
            return
        if not self.engine_ready:
            self.status.setText("The training engine is still loading; resume again in a moment.")
            return
        try:
            self.graphs.show_run(open_run(run_id))
            consent = ask_resume_consent(self, run_id)
        except UserError as err:
            self.show_error(str(err), None)
            return
        if consent is None:
            return
        self._start_worker(lambda on_event, stop: resume_training(run_id, on_event, stop, **consent),
                           f"Resuming {run_id}…")

    def _start_worker(self, start, message: str) -> None:
        self.worker = TrainingWorker(start)
        self.worker.event.connect(self._on_event)
        self.worker.done.connect(self._finished)
        self.worker.failed.connect(self._could_not_start)
        if self.threads.start(self.worker, self.worker.done, self.worker.failed) is None:
            self.worker = None  # the window is closing
            return
        self._plan_request += 1  # a preview still on its way is not shown over the run's plan
        self._replan_timer.stop()
        self.run_changes, self.run_dir = {}, ""
        self.plan_view.set_locked(True)
        self.status.setText(message)
        self._update_buttons()
        self.running_changed.emit(True)

    def stop_training(self) -> None:
        if self.worker is not None and not self.worker.stop_requested.is_set():
            self.worker.stop()
            self.status.setText("Stopping after this step and saving a checkpoint… (Stop ▸ Now to stop sooner)")
            self._update_buttons()

    def stop_now(self) -> None:
        """Stop within the step in progress: it is dropped, the last checkpoint kept (seconds, not a step)."""
        if self.worker is not None and not self.worker.stop_requested.now:
            self.worker.stop_now()
            self.status.setText("Stopping now: the step in progress is dropped, the last checkpoint kept…")
            self._update_buttons()

    def _on_event(self, event) -> None:
        from app.core import events as ev  # here: the window opens before the engine's modules load

        if isinstance(event, ev.RunCreated):
            self.run_dir = event.run_dir
            self._show_run_plan()
        elif isinstance(event, ev.StepMetrics):
            self.graphs.loss.add_step(event.step, event.loss)
            self.graphs.lr.add_step(event.step, event.lr)
            self.status.setText(step_text(event))
        elif isinstance(event, ev.StepProgress):  # a long step: where it is, every second or so
            if not self.worker or not self.worker.stop_requested.is_set():  # "Stopping…" stays in view
                self.status.setText(step_progress_text(event))
        elif isinstance(event, ev.EvalMetrics):
            self.graphs.loss.add_eval(event.step, event.eval_loss)
        elif isinstance(event, ev.PreferenceMetrics):
            self.graphs.add_preference(event)
        elif isinstance(event, ev.RunStarted):
            self.graphs.rewind(event.start_step)
            self.status.setText(f"Run {event.run_id}: {event.total_steps} steps on {event.device} · step "
                                f"{event.start_step + 1} under way (its progress shows here once it runs long)")
            self.run_dir = event.run_dir
            self._show_run_plan()
            self.graphs.show_predicted_peak(run_plan(event.run_dir))
        elif isinstance(event, ev.PlanAdjusted) or (isinstance(event, ev.LogLine) and event.level == "warning"):
            if isinstance(event, ev.PlanAdjusted) and self.run_dir:
                self.run_changes[event.change] = event.message
                self._show_run_plan()
            self.status.setText(plain(event.message))  # a change to the plan, a damaged checkpoint skipped: kept
            self.notice.add(event.message)
        elif isinstance(event, ev.LogLine):
            self.status.setText(plain(event.message))
        elif isinstance(event, ev.RunFailed):
            self.status.setText(f"Failed at step {event.step}: {plain(event.reason)}")

    def _show_run_plan(self) -> None:
        """The plan panel shows the run's own plan (plan.json) and what the run changed in it."""
        plan = run_plan(self.run_dir)
        if plan is not None:
            self.plan_view.show_run_plan(plan, Path(self.run_dir).name, self.run_changes)

    def _finished(self, result) -> None:
        self.worker = None
        self.plan_view.set_locked(False)
        self.last_run = result
        self.method.set_model(self.model_picker.name())  # a finished run to start from
        self.status.setText(end_text(result))
        if result.status not in ("finished", "stopped"):
            self.show_error(result.reason, Path(result.run_dir) / "train.log")
        self._update_buttons()
        self.running_changed.emit(False)

    def _could_not_start(self, message: str) -> None:
        message = plain(message)
        self.worker = None
        self.plan_view.set_locked(False)
        self.schedule_replan()  # the panel may show no run's plan: the preview again
        self.status.setText(message)
        self.show_error(message, None)
        self._update_buttons()
        self.running_changed.emit(False)

    def show_error(self, message: str, log: Path | None) -> None:
        """A dialog with the one-line reason, and a button that opens the run's log (non-blocking)."""
        self.error_dialog = error_box(self, plain(message), log)

