"""Small builders every tab uses: a button with its icon, tooltip and action, and a wrapping label."""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QLabel, QLineEdit, QPushButton

from app.gui.icons import icon


def button(icon_name: str, text: str, tip: str, clicked: Callable | None = None) -> QPushButton:
    widget = QPushButton(icon(icon_name), text)
    widget.setToolTip(tip)
    if clicked is not None:
        widget.clicked.connect(clicked)
    return widget


def label(text: str = "", tip: str = "", selectable: bool = False) -> QLabel:
    widget = QLabel(text)
    widget.setWordWrap(True)
    if selectable:
        widget.setTextInteractionFlags(Qt.TextSelectableByMouse)
    if tip:
        widget.setToolTip(tip)
    return widget


class NumberEdit(QLineEdit):
    """A number typed as the user writes it ("0.05", "2e-4"), never replaced behind their back: a
    value outside (low, high] or not a number is shown in red and `value()` raises ConfigError
    naming the field, so the plan panel says what is wrong instead of reverting the text."""

    changed = Signal()

    def __init__(self, name: str, low: float, high: float, value: float, example: str):
        super().__init__(f"{value:g}")
        self.name, self.low, self.high, self.example = name, low, high, example
        self.help = ""  # the tooltip while the value is fine
        self.setMaximumWidth(110)
        self.textChanged.connect(self._edited)

    def value(self) -> float:
        problem = self.problem()
        if problem:
            from app.core.errors import ConfigError  # here: the window opens before the engine's modules load

            raise ConfigError(problem)
        return float(self.text().strip())

    def setValue(self, value: float) -> None:  # noqa: N802 - Qt's spelling, as QDoubleSpinBox
        self.setText(f"{value:g}")

    def problem(self) -> str:
        """Why the text is not a value ("" when it is)."""
        text = self.text().strip()
        try:
            number = float(text)
        except ValueError:
            number = None
        if number is None or not (self.low < number <= self.high) or number != number:
            return (f"{self.name}: “{text}” is not a number above {self.low:g} and at most {self.high:g} "
                    f"(e.g. {self.example})")
        return ""

    def _edited(self) -> None:
        self.setStyleSheet("border: 1px solid #c0392b" if self.problem() else "")
        self.setToolTip(self.problem() or self.help)
        self.changed.emit()
