"""The Train tab's two choosers: the model (an editable list with a Folder… button and a line of
facts about the choice) and the memory budget (presets, then every catalogued card). Each is a
group box that says what was chosen by signal."""

from __future__ import annotations

import html

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (QComboBox, QFileDialog, QGroupBox, QHBoxLayout, QLabel, QPushButton, QSpinBox,
                               QVBoxLayout)

from app.core.config import TrainConfig, field_help
from app.gui.icons import icon

CHANGE_DELAY_MS = 250  # typing a model name settles before it is looked up
CARD_PREFIX = "card:"  # budget entries that name a card rather than a preset
WHERE = {"catalogue": "not downloaded: planned from its config, downloaded when you train",
         "demo": "built-in demo model", "folder": "local folder", "hf-cache": "Hugging Face cache"}
ERROR = "<span style='color:#c0392b'>{}</span>"


class ModelPicker(QGroupBox):
    """The model to train: `chosen(name)` once its facts are read (not per keystroke); a name that
    cannot be used shows why in the facts line and is not emitted."""

    chosen = Signal(str)

    def __init__(self, first: str = "demo"):
        super().__init__("Model")
        self.box = QComboBox()
        self.box.setEditable(True)
        self.box.setInsertPolicy(QComboBox.NoInsert)  # a typed name or path is looked up, not kept in the list
        self.box.setToolTip(field_help(TrainConfig, "model"))
        self.box.addItem(first)
        self.info = QLabel("")
        self.info.setWordWrap(True)
        browse = QPushButton(icon("folder"), "Folder…")
        browse.setToolTip("Choose a model folder (with config.json and safetensors weights)")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.box, 1)
        row.addWidget(browse)
        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addWidget(self.info)
        self._timer = QTimer(self, singleShot=True, interval=CHANGE_DELAY_MS, timeout=self.look_up)
        self.box.currentTextChanged.connect(lambda _text: self._timer.start())

    def name(self) -> str:
        return self.box.currentText().strip() or "demo"

    def add_models(self, names: list[str]) -> None:
        """Add names not listed yet, in order."""
        known = {self.box.itemText(i) for i in range(self.box.count())}
        for name in names:
            if name not in known:
                self.box.addItem(name)
                known.add(name)

    def look_up(self) -> None:
        """Read the chosen model's facts (files and catalogue only, no weights) and say them."""
        from app.core.errors import UserError  # here: the window opens before the engine's modules load
        from app.core.models.resolve import model_facts  # here: the window opens before the engine's modules load

        name = self.box.currentText()
        try:
            facts = model_facts(name)
        except UserError as err:
            self.info.setText(ERROR.format(html.escape(str(err))))
            return
        f = facts.arch
        self.info.setText(f"{f.total_params / 1e9:.2f}B parameters, {f.layers} layers, {f.model_type}, "
                          f"vocabulary {f.vocab:,} <small>({WHERE.get(facts.kind, facts.kind)})</small>")
        self.chosen.emit(name)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a model folder")
        if folder:
            self.box.setCurrentText(folder)


class BudgetPicker(QGroupBox):
    """The memory budget: a preset, or a named card to plan for one this machine does not have
    ("will it fit a 3060?"; training here then keeps within that card's memory). `changed` on
    every choice; `choice()` gives (preset, card)."""

    changed = Signal()

    def __init__(self, last: str = "auto", source_text: str = "", cards: int = 0):
        super().__init__("Memory budget")
        self.box = QComboBox()
        self.box.setToolTip(field_help(TrainConfig, "preset"))
        self.gpu_label = QLabel(source_text)
        self.gpu_label.setWordWrap(True)
        self.gpu_label.setToolTip("The card the memory graph follows; run `tunesmith gpu` for every card")
        row = QHBoxLayout()
        row.addWidget(QLabel("Preset"))
        row.addWidget(self.box, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(row)
        # how many of this machine's cards train, one process each: only where there are several
        self.gpu_count = QSpinBox()
        self.gpu_count.setRange(1, max(1, cards))
        self.gpu_count.setSuffix(f" of {cards} GPUs")
        self.gpu_count.setToolTip(field_help(TrainConfig, "gpus"))
        if cards > 1:
            count_row = QHBoxLayout()
            count_row.addWidget(QLabel("Train on"))
            count_row.addWidget(self.gpu_count, 1)
            layout.addLayout(count_row)
        layout.addWidget(self.gpu_label)
        self._fill(last)
        self.box.currentIndexChanged.connect(self.changed)
        self.gpu_count.valueChanged.connect(self.changed)

    def choice(self) -> tuple[str, str]:
        """(preset, card name): ("24gb", "") for a preset, ("auto", "RTX 3060") for a card."""
        data = self.box.currentData() or "auto"
        return ("auto", data[len(CARD_PREFIX):]) if data.startswith(CARD_PREFIX) else (data, "")

    def gpus(self) -> int:
        """How many of this machine's cards the run trains on."""
        return self.gpu_count.value()

    def _fill(self, last: str) -> None:
        from app.core.plan.cards import card_catalog  # here: the window opens before the engine's modules load
        from app.core.plan.presets import list_presets  # here: the window opens before the engine's modules load

        try:
            presets = list_presets()
        except Exception as err:  # noqa: BLE001 - a broken user preset is shown, not fatal
            self.gpu_label.setText(ERROR.format(html.escape(str(err))))
            presets = []
        for preset in presets:
            self._add(preset.name, preset.id, preset.description)
        self.box.insertSeparator(self.box.count())
        for card in card_catalog():
            self._add(f"{card.name} ({card.memory_gib:.0f} GB)", CARD_PREFIX + card.name,
                      f"Plan for an {card.name}: {card.memory_gib:.1f} GiB, compute {card.capability_text}, "
                      f"bf16 {'yes' if card.bf16 else 'no'}")
        self.box.setCurrentIndex(max(0, self.box.findData(last)))

    def _add(self, text: str, data: str, tip: str) -> None:
        self.box.addItem(text, data)
        self.box.setItemData(self.box.count() - 1, tip, Qt.ToolTipRole)
