"""The plan panel: each setting the planner chooses, editable (blank = the planner decides), with
the planned value and its reason beside it, and the predicted peak as a bar against the budget."""

from __future__ import annotations

import html

from PySide6.QtCore import Signal
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (QComboBox, QDoubleSpinBox, QGridLayout, QLabel, QProgressBar, QSpinBox,
                               QVBoxLayout, QWidget)

from app.core.config import Plan, TrainConfig, field_help
from app.core.plan.context import LAYER_TILE
from app.core.units import gib
from app.gui.widgets.controls import label

AUTO = "auto"
BASE_CHOICES = [(AUTO, "auto"), ("4-bit (QLoRA)", "4bit"), ("unquantised (LoRA)", "none")]
# (config field, label, lowest, highest)
INT_FIELDS = [("rank", "LoRA rank", 1, 512), ("seq_len", "Sequence length", 16, 131072),
              ("micro_batch", "Micro-batch", 1, 256), ("grad_accum", "Accumulation", 1, 1024)]


# The checkpointing box: what each choice fixes in the TrainConfig (auto: nothing)
CHECKPOINT_CHOICES = [(AUTO, None), ("on", {"grad_checkpointing": True}), ("off", {"grad_checkpointing": False}),
                      ("on, long context", {"grad_checkpointing": True, "offload_checkpoints": True,
                                            "layer_tile": LAYER_TILE})]
LONG_CONTEXT_KEYS = ("offload_checkpoints", "mlp_tile", "layer_tile")


def checkpointing_text(plan) -> str:
    """"off", "on", or "on" and the long-context rungs the plan has."""
    if not plan.grad_checkpointing:
        return "off"
    parts = ["on"] + (["inputs in RAM"] if plan.offload_checkpoints else []) + (
        [f"MLP tiles of {plan.mlp_tile:,}"] if plan.mlp_tile else []) + (
        [f"layer tiles of {plan.layer_tile:,}"] if plan.layer_tile else [])
    return ", ".join(parts)


class PlanView(QWidget):
    """Emits `changed` when the user edits a value; `fixed()` gives the values they set."""

    changed = Signal()

    def __init__(self):
        super().__init__()
        self.inputs: dict[str, QWidget] = {}
        self.reasons: dict[str, QLabel] = {}
        grid = QGridLayout()
        grid.setColumnStretch(2, 1)
        for row, (name, text, widget, help_text) in enumerate(self._fields()):
            self._add(grid, row, name, text, widget, help_text)
        self.peak = QProgressBar()
        self.peak.setRange(0, 1000)
        self.peak.setTextVisible(True)
        self.peak.setFormat("no plan yet")
        self.peak.setToolTip("The estimator's predicted peak memory of a training step, against the memory the "
                             "preset leaves usable after the safety margin")
        self.memory_reason = label()
        self.error = label()
        self.error.setStyleSheet("color: #c0392b")
        self.error.hide()
        self.export_note = label()  # an export the model will not have, said before training
        self.export_note.setStyleSheet("color: #b9770e")
        self.export_note.hide()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(grid)
        for widget in (self.peak, self.memory_reason, self.export_note, self.error):
            layout.addWidget(widget)
        self.plan = None

    def _fields(self) -> list[tuple[str, str, QWidget, str]]:
        """(field, label, input, help) for each row: the user's settings, then what the planner picks."""
        rows = []
        for name, text, low, high in INT_FIELDS:
            box = QSpinBox()
            box.setRange(low - 1, high)  # the value below the range shows "auto"
            box.setSpecialValueText(AUTO)
            box.setValue(low - 1)
            box.valueChanged.connect(self.changed)
            rows.append((name, text, box, ""))
        rows.append(("grad_checkpointing", "Checkpointing", self._choices(CHECKPOINT_CHOICES),
                     "auto: the planner turns checkpointing on, and for long sequences offloads the checkpoints "
                     "to RAM and tiles the layers, only as far as the memory needs. "
                     + field_help(TrainConfig, "layer_tile")))
        rows.append(("packing", "Packing", self._choices([(AUTO, None), ("on", None), ("off", None)]), ""))
        rows.append(("quantize", "Base weights", self._choices(BASE_CHOICES), field_help(TrainConfig, "quantize")))
        for name, text in (("compute_dtype", "Precision"), ("attention", "Attention"), ("loss", "Loss"),
                           ("optimizer", "Optimizer")):
            rows.append((name, text, QLabel(""), field_help(Plan, name)))
        rows.append(("epochs", "Epochs", self._number(0.1, 100, 0.5, TrainConfig.epochs), ""))
        rows.append(("lr", "Learning rate", self._number(0.000001, 0.1, 0.00005, TrainConfig.lr, decimals=6), ""))
        return rows

    def _choices(self, items: list[tuple[str, object]]) -> QComboBox:
        box = QComboBox()
        for text, value in items:
            box.addItem(text, value)
        box.currentIndexChanged.connect(self.changed)
        return box

    def _number(self, low: float, high: float, step: float, value: float, decimals: int = 2) -> QDoubleSpinBox:
        box = QDoubleSpinBox()
        box.setDecimals(decimals)
        box.setRange(low, high)
        box.setSingleStep(step)
        box.setValue(value)
        box.valueChanged.connect(self.changed)
        return box

    def _add(self, grid: QGridLayout, row: int, name: str, text: str, widget: QWidget,
             help_text: str = "") -> None:
        help_text = help_text or field_help(TrainConfig, name)
        widget.setToolTip(help_text)
        reason = QLabel("")
        reason.setWordWrap(True)
        reason.setForegroundRole(QPalette.PlaceholderText)  # dimmed, in light and dark themes
        title = QLabel(text)
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
        values.update(self.inputs["grad_checkpointing"].currentData() or {})
        choice = self.inputs["packing"].currentText()
        if choice != AUTO:
            values["packing"] = choice == "on"
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
                 "grad_accum": plan.grad_accum, "grad_checkpointing": checkpointing_text(plan),
                 "packing": "on" if plan.batching == "packed" else "off", "loss": plan.loss,
                 "compute_dtype": plan.compute_dtype,
                 "quantize": "4-bit" if plan.quantize == "4bit" else "unquantised", "attention": plan.attention,
                 "optimizer": plan.optimizer,
                 "epochs": f"{plan.total_steps} steps" if plan.total_steps else "", "lr": ""}
        for name, reason_label in self.reasons.items():
            key = {"epochs": "total_steps", "packing": "batching"}.get(name, name)
            reason = plan.reasons.get(key, "")
            if name == "grad_checkpointing":  # and the long-context rungs that came with it
                reason = "; ".join(plan.reasons[k] for k in (key, *LONG_CONTEXT_KEYS) if plan.reasons.get(k))
            value = shown.get(name, "")
            reason_label.setText(f"<b>{html.escape(str(value))}</b> {html.escape(reason)}" if value != "" else
                                 html.escape(reason))
        usable = max(1, budget.usable_bytes)
        fraction = plan.predicted_peak_bytes / usable
        self.peak.setValue(min(1000, int(1000 * fraction)))
        self.peak.setFormat(f"predicted peak {gib(plan.predicted_peak_bytes)} of "
                            f"{gib(usable)} usable")
        self.memory_reason.setText(html.escape(plan.reasons.get("memory", "")))
        self.export_note.setText(html.escape(preview.export_note))
        self.export_note.setVisible(bool(preview.export_note))

    def show_error(self, message: str) -> None:
        self.plan = None
        self.error.setText(message)
        self.error.show()
        self.peak.setValue(0)
        self.peak.setFormat("no plan fits")
        for reason_label in self.reasons.values():
            reason_label.setText("")
