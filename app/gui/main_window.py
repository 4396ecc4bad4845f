"""The main window: tabs and menus only; the tabs do the work."""

from __future__ import annotations

from PySide6.QtCore import QSettings, Qt
from PySide6.QtGui import QAction, QActionGroup, QKeySequence, QShortcut
from PySide6.QtWidgets import QApplication, QLabel, QMainWindow, QMessageBox, QTabWidget

from app import __version__
from app.gui.icons import icon
from app.gui.tabs.chat_tab import ChatTab
from app.gui.tabs.export_tab import ExportTab
from app.gui.tabs.runs_tab import RunsTab
from app.gui.tabs.train_tab import TrainTab
from app.gui.theme import THEMES, apply_theme
from app.gui.workers import TaskWorker, Threads


class MainWindow(QMainWindow):
    def __init__(self, settings: QSettings | None = None, load_engine: bool = True):
        super().__init__()
        self.setWindowTitle(f"Tunesmith {__version__}")
        self.settings = settings
        self.threads = Threads()
        self.train_tab = TrainTab(self.threads, settings)
        self.runs_tab = RunsTab(self.threads)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.train_tab, icon("train"), "Train")
        self.tabs.addTab(self.runs_tab, icon("runs"), "Runs")
        self.chat_tab = ChatTab(self.threads)
        self.export_tab = ExportTab(self.threads)
        self.tabs.addTab(self.chat_tab, icon("chat"), "Chat")
        self.tabs.addTab(self.export_tab, icon("export"), "Export")
        self.tabs.currentChanged.connect(self._tab_changed)
        self.runs_tab.resume_requested.connect(self.resume_run)
        self.export_tab.finished.connect(self._export_finished)
        self.setCentralWidget(self.tabs)
        self.engine_label = QLabel("Loading engine…")
        self.statusBar().addPermanentWidget(self.engine_label)
        self._close_when_idle = False
        self.train_tab.running_changed.connect(self._running_changed)
        self._add_actions()
        if settings is not None and settings.value("geometry"):
            self.restoreGeometry(settings.value("geometry"))
        else:
            self.resize(1200, 820)
        if load_engine:
            self._load_engine()

    def _add_actions(self) -> None:
        menu = self.menuBar().addMenu("&File")
        open_data = QAction("Open dataset…", self, shortcut=QKeySequence.Open)
        open_data.triggered.connect(self.train_tab.drop.browse)
        menu.addAction(open_data)
        quit_action = QAction("Quit", self, shortcut=QKeySequence.Quit)
        quit_action.triggered.connect(self.close)
        menu.addAction(quit_action)
        self._add_theme_menu(self.menuBar().addMenu("&View").addMenu("Theme"))
        for keys in ("Ctrl+Return", "Ctrl+Enter"):
            QShortcut(QKeySequence(keys), self, activated=self.train_tab.start_training)
        QShortcut(QKeySequence(Qt.Key_Escape), self, activated=self.confirm_stop)

    def _add_theme_menu(self, menu) -> None:
        """System (follows the desktop's light/dark setting, live), Light or Dark; remembered."""
        chosen = self.settings.value("theme", "system") if self.settings is not None else "system"
        self.theme_actions = QActionGroup(self)
        for name in THEMES:
            action = QAction(name.capitalize(), self, checkable=True, checked=name == chosen)
            action.setData(name)
            self.theme_actions.addAction(action)
            menu.addAction(action)
        self.theme_actions.triggered.connect(self._theme_chosen)
        QApplication.instance().styleHints().colorSchemeChanged.connect(self._system_scheme_changed)

    def _theme_chosen(self, action: QAction) -> None:
        if self.settings is not None:
            self.settings.setValue("theme", action.data())
        apply_theme(QApplication.instance(), action.data())

    def _system_scheme_changed(self, _scheme) -> None:
        checked = self.theme_actions.checkedAction()
        if checked is not None and checked.data() == "system":
            self._theme_chosen(checked)

    def _load_engine(self) -> None:
        """Import torch, transformers and PEFT on a worker thread so the window shows at once."""
        worker = TaskWorker(_import_engine, "engine")
        worker.done.connect(self._engine_loaded)
        worker.failed.connect(self._engine_failed)
        self.threads.start(worker, worker.done, worker.failed)

    def _engine_loaded(self, _tag, device: str) -> None:
        self.engine_label.setText(f"Engine ready ({device})")
        self.train_tab.set_engine_ready()
        self._scan_models()

    def _engine_failed(self, _tag, message: str) -> None:
        self.engine_label.setText("Engine failed to load")
        QMessageBox.critical(self, "Tunesmith", f"The training engine could not load: {message}")

    def _scan_models(self) -> None:
        from app.core.models.resolve import list_models  # here: the window opens before the engine's modules load

        worker = TaskWorker(list_models, "models")
        worker.done.connect(self._models_found)  # a bound slot: Qt calls it on this (the GUI) thread
        self.threads.start(worker, worker.done, worker.failed)

    def _models_found(self, _tag, rows) -> None:
        self.train_tab.add_models(rows)

    def confirm_stop(self) -> None:
        if not self.train_tab.running:
            return
        answer = QMessageBox.question(self, "Stop training?",
                                      "Stop after this step? A checkpoint is saved and Resume continues.")
        if answer == QMessageBox.Yes:
            self.train_tab.stop_training()

    def _tab_changed(self, index: int) -> None:
        widget = self.tabs.widget(index)
        if widget is self.runs_tab:
            self.runs_tab.refresh()
        elif widget is self.chat_tab:
            self.chat_tab.refresh_sources()
        elif widget is self.export_tab:
            self.export_tab.refresh_runs()

    def resume_run(self, run_id: str) -> None:
        """Resume a run chosen on the Runs tab: training shows on the Train tab."""
        self.tabs.setCurrentWidget(self.train_tab)
        self.train_tab.resume_run(run_id)

    def _export_finished(self) -> None:
        if self._close_when_idle and not self.train_tab.running:
            self.close()

    def _running_changed(self, running: bool) -> None:
        self.runs_tab.set_training(running)
        if not running and self._close_when_idle:
            self.close()

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        self.chat_tab.stop()  # an answer being written ends after its current token
        if self.export_tab.exporting:
            if not self._close_when_idle:
                answer = QMessageBox.question(self, "An export is running",
                                              "Quit when the export is complete? (Stopping it now would waste it.)")
                if answer != QMessageBox.Yes:
                    event.ignore()
                    return
                self._close_when_idle = True
                self.engine_label.setText("Finishing the export before quitting…")
            event.ignore()  # closes when the export ends
            return
        if self.train_tab.running:
            if not self._close_when_idle:
                answer = QMessageBox.question(
                    self, "Training is running",
                    "Stop training and quit? A checkpoint is saved first, so the run can be resumed.")
                if answer != QMessageBox.Yes:
                    event.ignore()
                    return
                self._close_when_idle = True
                self.train_tab.stop_training()
                self.engine_label.setText("Saving a checkpoint before quitting…")
            event.ignore()  # closes when the run has stopped
            return
        if self.settings is not None:
            self.settings.setValue("geometry", self.saveGeometry())
        self.train_tab.graphs.close_poller()
        self.threads.close()
        event.accept()


def _import_engine() -> str:
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    return "CUDA" if torch.cuda.is_available() else "CPU"
