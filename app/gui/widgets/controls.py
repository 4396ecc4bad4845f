"""Small builders every tab uses: a button with its icon, tooltip and action, and a wrapping label."""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel, QPushButton

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
