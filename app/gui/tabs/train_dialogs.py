"""The Train tab's dialogs: the consent a resume needs again (a model's own code, pickle weights),
and the error box with a button that opens the run's log."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import QMessageBox, QWidget

FLAG_WORDS = {"--trust-remote-code": "the model's own Python code",
              "--allow-pickle": "its pickle weights (which can run code)"}


def ask_resume_consent(parent: QWidget, run_id: str) -> dict | None:
    """The consent resuming `run_id` needs again, asked in a dialog that names the files; {} when
    none is needed, None when the user declines."""
    from app.core.runs import open_run  # here: the window opens before the engine's modules load
    from app.core.train.trainer import consent_needed  # here: the window opens before the engine's modules load

    config = open_run(run_id).config()
    missing = consent_needed(config, False, False)
    if not missing:
        return {}
    folder = Path(config.model).expanduser()
    files = sorted(p.name for p in folder.glob("*.py")) if folder.is_dir() else []
    if "--allow-pickle" in missing and folder.is_dir():
        files += sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    what = " and ".join(FLAG_WORDS[flag] for flag in missing)
    answer = QMessageBox.question(
        parent, "Run the model's own code?",
        f"Run {run_id} was started allowing {what}. Resuming loads it again"
        f"{': ' + ', '.join(files) if files else f' (from {config.model})'}. Resume only if you trust it.",
        QMessageBox.Yes | QMessageBox.Cancel, QMessageBox.Cancel)
    if answer != QMessageBox.Yes:
        return None
    return {"trust_remote_code": "--trust-remote-code" in missing, "allow_pickle": "--allow-pickle" in missing}


def error_box(parent: QWidget, message: str, log: Path | None) -> QMessageBox:
    """A window-modal box with the one-line reason and, for a run, "Open log"; opened, not run."""
    box = QMessageBox(QMessageBox.Warning, "Training did not finish", message, QMessageBox.Close, parent)
    if log is not None:
        open_log = box.addButton("Open log", QMessageBox.ActionRole)
        open_log.clicked.connect(lambda: QDesktopServices.openUrl(QUrl.fromLocalFile(str(log))))
    box.setWindowModality(Qt.WindowModal)
    box.open()
    return box
