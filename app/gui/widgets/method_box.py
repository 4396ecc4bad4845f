"""The Train tab's method box: what the run learns (SFT, DPO, ORPO), and for the preference methods
their beta and the finished run whose adapter they start from. It says in one line when the
dataset and the method do not go together (the engine refuses such a run), and follows the data
(preference pairs: DPO, anything else: SFT) until the user picks a method themselves."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QComboBox, QGridLayout, QGroupBox, QLabel, QVBoxLayout

from app.core.config import PREFERENCE_METHODS, TrainConfig, field_help
from app.gui.widgets.controls import NumberEdit, label

METHODS = (("sft", "SFT: learn the answers"), ("dpo", "DPO: prefer the chosen answer"),
           ("orpo", "ORPO: learn and prefer, no reference"))
BASE_MODEL = "the base model"
WARNING_COLOR = "#c0392b"


class MethodBox(QGroupBox):
    """`changed` whenever the run it describes changes (method, beta, start point); `values()` gives
    the TrainConfig fields, `problem()` why the checked data cannot train with the method ("" when
    it can)."""

    changed = Signal()

    def __init__(self):
        super().__init__("Method")
        self.box = QComboBox()
        for method, text in METHODS:
            self.box.addItem(text, method)
        self.box.setToolTip(field_help(TrainConfig, "method"))
        self.chosen_by_user = False  # until then the method follows the data
        self.data_format, self.data_label = "", ""  # of the checked dataset; "" for none
        self.model = ""
        self.warning = label("", "The dataset and the method do not go together: Train waits until they do")
        self.warning.setTextFormat(Qt.PlainText)
        self.warning.setStyleSheet(f"color: {WARNING_COLOR};")
        self.warning.hide()
        self.beta = NumberEdit("Beta", 0, 100, TrainConfig.beta, "0.1")
        self.beta.help = field_help(TrainConfig, "beta")
        self.beta.setToolTip(self.beta.help)
        self.start_from = QComboBox()
        self.start_from.setToolTip(field_help(TrainConfig, "start_from"))
        self.start_from.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.start_from.setMinimumContentsLength(16)
        self._build_layout()
        self.box.activated.connect(self._chosen)
        self.box.currentIndexChanged.connect(self._method_changed)
        self.beta.changed.connect(self.changed)
        self.start_from.currentIndexChanged.connect(lambda _: self.changed.emit())
        self._method_changed()

    def _build_layout(self) -> None:
        grid = QGridLayout()
        grid.addWidget(self.box, 0, 0, 1, 2)
        grid.addWidget(self.warning, 1, 0, 1, 2)
        self.beta_label, self.start_label = QLabel("Beta"), QLabel("Start from")
        for row, (text, widget) in enumerate(((self.beta_label, self.beta), (self.start_label, self.start_from)), 2):
            grid.addWidget(text, row, 0)
            grid.addWidget(widget, row, 1, Qt.AlignLeft if widget is self.beta else Qt.Alignment())
        grid.setColumnStretch(1, 1)
        QVBoxLayout(self).addLayout(grid)

    # -- what the run is --------------------------------------------------------------------------
    def method(self) -> str:
        return self.box.currentData()

    def values(self) -> dict:
        """The TrainConfig fields this box sets (ConfigError for a beta that is not a number in range)."""
        if self.method() not in PREFERENCE_METHODS:
            return {"method": self.method()}
        return {"method": self.method(), "beta": self.beta.value(), "start_from": self.start_from.currentData() or ""}

    def set_method(self, method: str) -> None:
        """Choose `method` as the program (the user's own choice is `activated`)."""
        self.box.setCurrentIndex(self.box.findData(method))

    def problem(self) -> str:
        """Why the checked dataset cannot train with this method, in one line; "" when it can."""
        from app.core.data.formats import PREFERENCE_FORMAT  # here: the window opens before the engine's modules load

        if not self.data_format:
            return ""
        pairs, preference = self.data_format == PREFERENCE_FORMAT, self.method() in PREFERENCE_METHODS
        if pairs and not preference:
            return "This file holds preference pairs: train them with DPO or ORPO."
        if preference and not pairs:
            return f"{self.method().upper()} needs preference pairs; this file is {self.data_label}: choose SFT."
        return ""

    # -- what it follows ----------------------------------------------------------------------------
    def data_checked(self, report) -> None:
        """The dataset's check (a `DataReport`, None for none or a failed check): until the user picks
        a method, preference pairs train with DPO and anything else with SFT."""
        from app.core.data.formats import PREFERENCE_FORMAT  # here: the window opens before the engine's modules load

        self.data_format, self.data_label = (report.format, report.format_label) if report is not None else ("", "")
        if report is not None and not self.chosen_by_user:
            pairs = report.format == PREFERENCE_FORMAT
            if pairs != (self.method() in PREFERENCE_METHODS):
                self.set_method("dpo" if pairs else "sft")
        self._show_problem()

    def set_model(self, name: str) -> None:
        """The model chosen: a run can start only from an adapter of the same model."""
        self.model = name
        if self.method() in PREFERENCE_METHODS:
            self.refresh_runs()

    def refresh_runs(self) -> None:
        """List the finished runs of the model with an adapter to start from, keeping the choice."""
        from app.core.adapters import startable_runs  # here: the window opens before the engine's modules load
        from app.core.runs import display_names  # here: the window opens before the engine's modules load

        kept = self.start_from.currentData() or ""
        rows = startable_runs(self.model)
        methods = {row.id: row.method for row in rows}
        names = display_names(rows)
        self.start_from.blockSignals(True)
        self.start_from.clear()
        self.start_from.addItem(BASE_MODEL, "")
        for row in rows:
            self.start_from.addItem(f"{names[row.id]} ({methods[row.id].upper()})", row.id)
            self.start_from.setItemData(self.start_from.count() - 1, f"{row.id}: its adapter, {row.step} steps",
                                        Qt.ToolTipRole)
        self.start_from.setCurrentIndex(max(0, self.start_from.findData(kept)))
        self.start_from.blockSignals(False)
        if (self.start_from.currentData() or "") != kept:
            self.changed.emit()  # the run chosen is gone (deleted, or of another model)

    def _chosen(self, _index: int) -> None:
        self.chosen_by_user = True

    def _method_changed(self) -> None:
        preference = self.method() in PREFERENCE_METHODS
        for widget in (self.beta_label, self.beta, self.start_label, self.start_from):
            widget.setVisible(preference)
        if preference and self.model:
            self.refresh_runs()
        self._show_problem()
        self.changed.emit()

    def _show_problem(self) -> None:
        problem = self.problem()
        self.warning.setText(f"⚠ {problem}" if problem else "")
        self.warning.setVisible(bool(problem))
