"""The plan panel: each setting the planner chooses, editable (blank = the planner decides), with
the planned value and its reason beside it, and the predicted peak as a bar against the budget;
`run_plan` reads the plan a run folder trains with, for the panel to show during a run."""

from __future__ import annotations

import html

from PySide6.QtCore import Signal
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (QComboBox, QGridLayout, QLabel, QProgressBar, QSpinBox,
                               QVBoxLayout, QWidget)

from app.core.config import Plan, TrainConfig, field_help
from app.core.plan.context import LAYER_TILE
from app.core.plan.seq_len import SEQ_LEN_LEAST
from app.core.units import gib
from app.gui.widgets.controls import NumberEdit, label
from app.gui.words import plain

AUTO = "auto"
BASE_CHOICES = [(AUTO, "auto"), ("4-bit (QLoRA)", "4bit"), ("unquantised (LoRA)", "none")]
# (config field, label, lowest, highest)
INT_FIELDS = [("rank", "LoRA rank", 1, 512), ("seq_len", "Sequence length", SEQ_LEN_LEAST, 131072),
              ("micro_batch", "Micro-batch", 1, 256), ("grad_accum", "Accumulation", 1, 1024),
              ("threads", "CPU threads", 1, 1024)]


# The checkpointing box: what each choice fixes in the TrainConfig (auto: nothing)
CHECKPOINT_CHOICES = [(AUTO, None), ("on", {"grad_checkpointing": True}), ("off", {"grad_checkpointing": False}),
                      ("on, long context", {"grad_checkpointing": True, "offload_checkpoints": True,
                                            "layer_tile": LAYER_TILE})]
LONG_CONTEXT_KEYS = ("offload_checkpoints", "mlp_tile", "layer_tile")
TECHNICAL = ("compute_dtype", "attention", "loss", "optimizer")  # rows whose reason names the choice


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
        # what the plan is for (this CPU, this GPU, a card this machine lacks), and whose plan it is
        self.device = label("", "The device this plan is for; Train always plans for the device it trains on")
        self.device.setObjectName("planDevice")
        self.device.setStyleSheet("font-weight: bold")
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
        layout.addWidget(self.device)
        layout.addLayout(grid)
        for widget in (self.peak, self.memory_reason, self.export_note, self.error):
            layout.addWidget(widget)
        self.plan = None
        self.run_id = ""  # set while the panel shows a run's own plan (its plan.json)

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
            box = QLabel("")
            box.setProperty("help", field_help(Plan, name))
            rows.append((name, text, box, field_help(Plan, name)))
        rows.append(("epochs", "Epochs", self._number("Epochs", 0, 100, TrainConfig.epochs, "0.25 for a quarter"),
                     "Passes over the data; a fraction trains on part of it (at least one step). Max steps, "
                     "when set, decides instead"))
        steps = QSpinBox()
        steps.setRange(0, 10_000_000)
        steps.setSpecialValueText(AUTO)  # 0: the epochs decide
        steps.valueChanged.connect(self.changed)
        rows.append(("max_steps", "Max steps", steps, "Stop after this many optimizer steps; auto: the epochs "
                                                       "decide"))
        rows.append(("lr", "Learning rate", self._number("Learning rate", 0, 0.1, TrainConfig.lr, "2e-4"), ""))
        return rows

    def _choices(self, items: list[tuple[str, object]]) -> QComboBox:
        box = QComboBox()
        for text, value in items:
            box.addItem(text, value)
        box.currentIndexChanged.connect(self.changed)
        return box

    def _number(self, name: str, low: float, high: float, value: float, example: str) -> NumberEdit:
        box = NumberEdit(name, low, high, value, example)
        box.changed.connect(self.changed)
        return box

    def _add(self, grid: QGridLayout, row: int, name: str, text: str, widget: QWidget,
             help_text: str = "") -> None:
        help_text = help_text or field_help(TrainConfig, name)
        widget.setToolTip(help_text)
        if isinstance(widget, NumberEdit):
            widget.help = help_text
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
        if self.inputs["max_steps"].value():
            values["max_steps"] = self.inputs["max_steps"].value()
        values["epochs"] = self.inputs["epochs"].value()  # ConfigError naming the field when not a number
        values["lr"] = self.inputs["lr"].value()
        return values

    def show_plan(self, preview) -> None:
        """Planned values and reasons from a `PlanPreview` (before a run)."""
        self.run_id = ""
        self._show(preview.plan, preview.budget.usable_bytes, preview.export_note, {})
        self.device.setText(html.escape(_first_upper(plain(preview.plan.reasons.get("device", "")))))

    def show_run_plan(self, plan, run_id: str, changes: dict[str, str]) -> None:
        """The plan run `run_id` trains with (its plan.json, re-planned for this machine's device),
        each setting the run changed (`changes`: field -> what happened) marked."""
        self.run_id = run_id
        self._show(plan, plan.budget_bytes, "", changes)
        self.device.setText(html.escape(f"Run {run_id} trains with this plan, "
                                        f"{plan.reasons.get('device', f'planned for {plan.device}')}"))

    def set_locked(self, locked: bool) -> None:
        """No edits while a run trains (the panel shows that run's plan)."""
        for widget in self.inputs.values():
            widget.setEnabled(not locked)

    def _show(self, plan, usable: int, export_note: str, changes: dict[str, str]) -> None:
        self.plan = plan
        self.error.hide()
        shown = {"rank": plan.rank, "seq_len": plan.seq_len, "micro_batch": plan.micro_batch,
                 "grad_accum": plan.grad_accum, "grad_checkpointing": checkpointing_text(plan),
                 "packing": "on" if plan.batching == "packed" else "off", "loss": plan.loss,
                 "compute_dtype": plan.compute_dtype,
                 "quantize": "4-bit" if plan.quantize == "4bit" else "unquantised", "attention": plan.attention,
                 "optimizer": plan.optimizer, "threads": getattr(plan, "threads", 0) or "",
                 "epochs": f"{plan.total_steps} step{'s' * (plan.total_steps != 1)}" if plan.total_steps else "", "lr": "", "max_steps": ""}
        for name, reason_label in self.reasons.items():
            key = {"epochs": "total_steps", "packing": "batching", "max_steps": ""}.get(name, name)
            reason = plain(plan.reasons.get(key, ""))
            if name == "epochs" and plan.reasons.get("time"):  # and how long those steps take
                reason = f"{reason}; {plain(plan.reasons['time'])}" if reason else plain(plan.reasons["time"])
            if name == "epochs" and plan.reasons.get("held_out"):  # and what judges them
                held = plain(plan.reasons["held_out"])
                held = f"eval every {plan.eval_every} steps on {held}" if plan.eval_every else held
                reason = f"{reason}; {held}" if reason else held
            if name == "grad_checkpointing":  # and the long-context rungs that came with it
                reason = plain("; ".join(plan.reasons[k] for k in (key, *LONG_CONTEXT_KEYS) if plan.reasons.get(k)))
            value = shown.get(name, "")
            if name in TECHNICAL:  # the reason leads with the choice in words; its name for searching
                self.inputs[name].setToolTip(f"{self.inputs[name].property('help')}\n\nTechnical name: {value}")
                value = ""
            text = (f"<b>{html.escape(str(value))}</b> {html.escape(reason)}" if value != "" else
                    html.escape(reason))
            changed = changes.get(key) or (name == "grad_checkpointing" and changes.get("grad_checkpointing"))
            if changed:  # amber, as the Train tab's notice: what the run changed, and why
                text = f"<span style='color:#d97706'>⚠ changed by the run: {html.escape(changed)}</span><br>{text}"
            reason_label.setText(text)
        usable = max(1, usable)
        fraction = plan.predicted_peak_bytes / usable
        self.peak.setValue(min(1000, int(1000 * fraction)))
        self.peak.setFormat(f"predicted peak {gib(plan.predicted_peak_bytes)} of "
                            f"{gib(usable)} usable")
        self.memory_reason.setText(html.escape(plain(plan.reasons.get("memory", ""))))
        self.export_note.setText(html.escape(plain(export_note)))
        self.export_note.setVisible(bool(export_note))

    def show_error(self, message: str) -> None:
        self.plan = None
        self.run_id = ""
        self.device.setText("")
        self.error.setText(plain(message))
        self.error.show()
        self.peak.setValue(0)
        self.peak.setFormat("no plan fits")
        for reason_label in self.reasons.values():
            reason_label.setText("")


def _first_upper(text: str) -> str:
    return text[:1].upper() + text[1:]


def run_plan(run_dir: str):
    """The plan a run uses (a resumed run keeps its own, whatever the plan panel shows now); None
    when its plan.json cannot be read."""
    from app.core.errors import UserError  # here: the window opens before the engine's modules load
    from app.core.runs import open_run  # here: the window opens before the engine's modules load

    try:
        return open_run(run_dir).plan()
    except UserError:
        return None


def preview_of(config, lengths, rows):
    """The plan preview of `config` (TrainConfig), as a run of it would start: from its --from run's
    adapter, whose rank and alpha it keeps (RunError, shown in the panel, when it cannot start there)."""
    from app.core.adapters import start_point  # here: the window opens before the engine's modules load
    from app.core.plan.preview import preview_plan  # here: the window opens before the engine's modules load

    return preview_plan(start_point(config)[0], lengths, rows)
