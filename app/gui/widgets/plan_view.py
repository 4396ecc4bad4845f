"""The plan panel: each setting the planner chooses, editable (blank = the planner decides), with
the planned value and its reason beside it, and the predicted peak as a bar against the budget."""

from __future__ import annotations

import html

from PySide6.QtCore import Signal
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (QComboBox, QDoubleSpinBox, QGridLayout, QLabel, QProgressBar, QSpinBox,
                               QVBoxLayout, QWidget)

from app.core.config import Plan, TrainConfig, field_help
from app.core.units import gib

AUTO = "auto"
BASE_CHOICES = [(AUTO, "auto"), ("4-bit (QLoRA)", "4bit"), ("unquantised (LoRA)", "none")]
# (config field, label, lowest, highest)
INT_FIELDS = [("rank", "LoRA rank", 1, 512), ("seq_len", "Sequence length", 16, 131072),
              ("micro_batch", "Micro-batch", 1, 256), ("grad_accum", "Accumulation", 1, 1024)]


class PlanView(QWidget):
    """Emits `changed` when the user edits a value; `fixed()` gives the values they set."""

    changed = Signal()

    def __init__(self):
        super().__init__()
        grid = QGridLayout()
        grid.setColumnStretch(2, 1)
        self.inputs: dict[str, QWidget] = {}
        self.reasons: dict[str, QLabel] = {}
        row = 0
        for name, label, low, high in INT_FIELDS:
            box = QSpinBox()
            box.setRange(low - 1, high)  # the value below the range shows "auto"
            box.setSpecialValueText(AUTO)
            box.setValue(low - 1)
            box.valueChanged.connect(self.changed)
            self._add(grid, row, name, label, box)
            row += 1
        ckpt = QComboBox()
        ckpt.addItems([AUTO, "on", "off"])
        ckpt.currentIndexChanged.connect(self.changed)
        self._add(grid, row, "grad_checkpointing", "Checkpointing", ckpt)
        row += 1
        packing = QComboBox()
        packing.addItems([AUTO, "on", "off"])
        packing.currentIndexChanged.connect(self.changed)
        self._add(grid, row, "packing", "Packing", packing)
        row += 1
        base = QComboBox()
        for label, value in BASE_CHOICES:
            base.addItem(label, value)
        base.currentIndexChanged.connect(self.changed)
        self._add(grid, row, "quantize", "Base weights", base, field_help(TrainConfig, "quantize"))
        row += 1
        for name, label in (("compute_dtype", "Precision"), ("attention", "Attention"), ("loss", "Loss"),
                            ("optimizer", "Optimizer")):
            self._add(grid, row, name, label, QLabel(""), field_help(Plan, name))
            row += 1
        epochs = QDoubleSpinBox()
        epochs.setRange(0.1, 100)
        epochs.setSingleStep(0.5)
        epochs.setValue(TrainConfig.epochs)
        epochs.valueChanged.connect(self.changed)
        self._add(grid, row, "epochs", "Epochs", epochs)
        row += 1
        lr = QDoubleSpinBox()
        lr.setDecimals(6)
        lr.setRange(0.000001, 0.1)
        lr.setSingleStep(0.00005)
        lr.setValue(TrainConfig.lr)
        lr.valueChanged.connect(self.changed)
        self._add(grid, row, "lr", "Learning rate", lr)
        self.peak = QProgressBar()
        self.peak.setRange(0, 1000)
        self.peak.setTextVisible(True)
        self.peak.setFormat("no plan yet")
        self.peak.setToolTip("The estimator's predicted peak memory of a training step, against the memory the "
                             "preset leaves usable after the safety margin")
        self.memory_reason = QLabel("")
        self.memory_reason.setWordWrap(True)
        self.error = QLabel("")
        self.error.setWordWrap(True)
        self.error.setStyleSheet("color: #c0392b")
        self.error.hide()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(grid)
        layout.addWidget(self.peak)
        layout.addWidget(self.memory_reason)
        layout.addWidget(self.error)
        self.plan = None

    def _add(self, grid: QGridLayout, row: int, name: str, label: str, widget: QWidget,
             help_text: str = "") -> None:
        help_text = help_text or field_help(TrainConfig, name)
        widget.setToolTip(help_text)
        reason = QLabel("")
        reason.setWordWrap(True)
        reason.setForegroundRole(QPalette.PlaceholderText)  # dimmed, in light and dark themes
        title = QLabel(label)
        title.setToolTip(help_text)
        grid.addWidget(title, row, 0)
        grid.addWidget(widget, row, 1)
        grid.addWidget(reason, row, 2)
        self.inputs[name], self.reasons[name] = widget, reason

    def fixed(self) -> dict:
        """The values the user set (fields left on "auto" are not included)."""
        values: dict = {}
        for name, *_ in INT_FIELDS:
            box = self.inputs[name]
            if box.value() >= box.minimum() + 1:
                values[name] = box.value()
        for name in ("grad_checkpointing", "packing"):
            choice = self.inputs[name].currentText()
            if choice != AUTO:
                values[name] = choice == "on"
        if self.inputs["quantize"].currentData() != "auto":
            values["quantize"] = self.inputs["quantize"].currentData()
        values["epochs"] = self.inputs["epochs"].value()
        values["lr"] = self.inputs["lr"].value()
        return values

    def show_plan(self, preview) -> None:
        """Planned values and reasons from a `PlanPreview`."""
        plan, budget = preview.plan, preview.budget
        self.plan = plan
        self.error.hide()
        shown = {"rank": plan.rank, "seq_len": plan.seq_len, "micro_batch": plan.micro_batch,
                 "grad_accum": plan.grad_accum, "grad_checkpointing": "on" if plan.grad_checkpointing else "off",
                 "packing": "on" if plan.batching == "packed" else "off", "loss": plan.loss,
                 "compute_dtype": plan.compute_dtype,
                 "quantize": "4-bit" if plan.quantize == "4bit" else "unquantised", "attention": plan.attention,
                 "optimizer": plan.optimizer,
                 "epochs": f"{plan.total_steps} steps" if plan.total_steps else "", "lr": ""}
        for name, label in self.reasons.items():
            key = {"epochs": "total_steps", "packing": "batching"}.get(name, name)
            reason = plan.reasons.get(key, "")
            value = shown.get(name, "")
            label.setText(f"<b>{html.escape(str(value))}</b> {html.escape(reason)}" if value != "" else
                          html.escape(reason))
        usable = max(1, budget.usable_bytes)
        fraction = plan.predicted_peak_bytes / usable
        self.peak.setValue(min(1000, int(1000 * fraction)))
        self.peak.setFormat(f"predicted peak {gib(plan.predicted_peak_bytes)} of "
                            f"{gib(usable)} usable")
        self.memory_reason.setText(html.escape(plan.reasons.get("memory", "")))

    def show_error(self, message: str) -> None:
        self.plan = None
        self.error.setText(message)
        self.error.show()
        self.peak.setValue(0)
        self.peak.setFormat("no plan fits")
        for label in self.reasons.values():
            label.setText("")
