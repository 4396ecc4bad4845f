"""Ask before a download nobody named: the base model an adapter (or a copied run) names, when no copy
of it is on this machine. The chat and export tabs ask here; the command line wants --download."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication, QMessageBox, QWidget


def agree_to_download(parent: QWidget, ref: str) -> bool | None:
    """None when `ref`'s base model is on this machine; else whether the user agreed to download it
    (the dialog gives its size where the Hub can be asked, within 5 s)."""
    from app.core.adapters import base_to_download  # here: the window opens before the engine's modules load
    from app.core.models.resolve import hub_download_size  # here: the window opens before the engine's modules load
    from app.core.units import size_text  # here: the window opens before the engine's modules load

    base = base_to_download(ref)
    if not base:
        return None
    QApplication.setOverrideCursor(Qt.WaitCursor)
    try:
        size = hub_download_size(base, timeout=5)
    finally:
        QApplication.restoreOverrideCursor()
    how_big = f"about {size_text(size)}" if size else "its size could not be read from the Hub"
    answer = QMessageBox.question(parent, "Download the base model?",
                                  f"The adapter was trained on {base}, which is not on this machine. Download it "
                                  f"from the Hugging Face Hub ({how_big})?",
                                  QMessageBox.Yes | QMessageBox.Cancel, QMessageBox.Cancel)
    return answer == QMessageBox.Yes
