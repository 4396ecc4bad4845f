"""The dataset drop zone and the report shown once a file is checked: format, rows, a histogram
of token lengths, every problem (click one to see its line) and one example with the tokens the
model learns from highlighted (a preference pair: its chosen and its rejected side, one block each)."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QFileDialog, QFrame, QHBoxLayout, QLabel, QListWidget, QListWidgetItem,
                               QPushButton, QTextEdit, QVBoxLayout, QWidget)

from app.gui.icons import icon
from app.gui.words import plain

FILE_FILTER = "Datasets (*.jsonl *.json *.parquet);;All files (*)"
LEARNED = "background:#f6d365;color:#222"  # a learned token, readable on the light and dark themes
CHOSEN_COLOR, REJECTED_COLOR = "#2e9e5b", "#c0392b"
PREVIEW_HEIGHT, PAIR_PREVIEW_HEIGHT = 150, 300


class DropZone(QFrame):
    """Accepts a dataset file dragged from the file manager, or chosen with Browse."""

    file_chosen = Signal(str)

    def __init__(self, start_folder: str = ""):
        super().__init__()
        self.start_folder = start_folder
        self.setAcceptDrops(True)
        self.setFrameShape(QFrame.StyledPanel)
        self.setObjectName("dropZone")
        self.setStyleSheet("#dropZone { border: 2px dashed palette(mid); border-radius: 8px; }"
                           "#dropZone[hover=\"true\"] { border-color: palette(highlight); }")
        self.setToolTip("Drag a dataset file here from your file manager: chat messages, ShareGPT, "
                        "Alpaca, prompt/completion or plain text, as JSONL, JSON or Parquet")
        glyph = QLabel()
        glyph.setPixmap(icon("dataset").pixmap(32, 32))
        self.label = QLabel("Drop a .jsonl, .json or .parquet file here")
        self.label.setWordWrap(True)
        browse = QPushButton(icon("folder"), "Browse…")
        browse.setToolTip("Choose a dataset file (Ctrl+O)")
        browse.clicked.connect(self.browse)
        row = QHBoxLayout(self)
        row.addWidget(glyph)
        row.addWidget(self.label, 1)
        row.addWidget(browse)

    def browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a dataset", self.start_folder, FILE_FILTER)
        if path:
            self.file_chosen.emit(path)

    def dragEnterEvent(self, event) -> None:  # noqa: N802 - Qt's name
        if _dropped_file(event.mimeData()):
            event.acceptProposedAction()
            self._highlight(True)

    def dragLeaveEvent(self, event) -> None:  # noqa: N802 - Qt's name
        self._highlight(False)

    def _highlight(self, on: bool) -> None:
        self.setProperty("hover", on)
        self.style().unpolish(self)
        self.style().polish(self)

    def dropEvent(self, event) -> None:  # noqa: N802 - Qt's name
        self._highlight(False)
        path = _dropped_file(event.mimeData())
        if path:
            event.acceptProposedAction()
            self.file_chosen.emit(path)

    def show_file(self, path: str) -> None:
        self.label.setText(f"<b>{html.escape(Path(path).name)}</b><br><small>{html.escape(str(Path(path).parent))}"
                           "</small>")


def _dropped_file(mime) -> str | None:
    if not mime.hasUrls():
        return None
    for url in mime.urls():
        if url.isLocalFile():
            return url.toLocalFile()
    return None


class StillPlot(pg.PlotWidget):
    """A chart that does not move: no zoom or pan by mouse, and the wheel scrolls the page it is on
    (pyqtgraph's own wheel zoomed the histogram to -4000..4000 tokens)."""

    def __init__(self):
        super().__init__()
        self.setMouseEnabled(x=False, y=False)
        self.hideButtons()

    def wheelEvent(self, event) -> None:  # noqa: N802 - Qt's name
        event.ignore()  # to the scroll area around the set-up


class DatasetReport(QWidget):
    """Summary line, token-length histogram, problem list and the tokenised preview."""

    def __init__(self):
        super().__init__()
        self.summary = QLabel("No dataset yet.")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.histogram = StillPlot()
        self.histogram.setMenuEnabled(False)
        self.histogram.setMaximumHeight(130)
        self.histogram.setLabel("bottom", "tokens per example")
        self.histogram.hide()
        self.problems = QListWidget()
        self.problems.setMaximumHeight(130)
        self.problems.setWordWrap(True)  # a reason says how to fix the line: show all of it
        self.problems.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.problems.setToolTip("Every row with a problem; click one to see the line")
        self.problems.hide()
        self.problems.currentItemChanged.connect(self._show_problem_line)
        self.preview = QTextEdit()
        self.preview.setReadOnly(True)
        self.preview.setMaximumHeight(PREVIEW_HEIGHT)
        self.preview.hide()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for widget in (self.summary, self.histogram, self.problems, self.preview):
            layout.addWidget(widget)
        self._lines: list[str] = []

    def show_busy(self, path: str, doing: str = "") -> None:
        """The check under way; `doing` says where it is (lines read, the tokenizer loading)."""
        said = f"<br><span style='color:gray'>{html.escape(plain(doing))}</span>" if doing else ""
        self.summary.setText(f"Checking {html.escape(Path(path).name)}…{said}")

    def show_error(self, message: str) -> None:
        self.summary.setText(f"<span style='color:#c0392b'>{html.escape(plain(message))}</span>")
        for widget in (self.histogram, self.problems, self.preview):
            widget.hide()

    def show_summary(self, summary) -> None:
        report, stats = summary.report, summary.stats
        bad = summary.bad_lines
        text = f"<b>{html.escape(report.format_label)}</b>, {report.rows} rows: {summary.usable_rows} usable"
        if bad:
            text += f", <span style='color:#c0392b'><b>{bad} with problems</b></span>"
        if stats:
            text += (f"<br>tokens: min {stats.min}, median {stats.median}, p95 {stats.p95}, max {stats.max}"
                     f" <small>(tokenizer of {html.escape(summary.tokenizer_of)})</small>")
        repeats = summary.duplicates
        if repeats:
            from app.core.data.holdout import lines_text  # here: the window opens before the engine's modules load

            text += (f"<br>{len(repeats)} exact duplicate{'s' * (len(repeats) != 1)} "
                     f"<small>({html.escape(lines_text(repeats))}): each copy trains again</small>")
        self.summary.setText(text)
        self._draw_histogram(summary.lengths)
        self._lines = _read_lines(report.file) if report.problems else []
        self.problems.clear()
        for problem in summary.problems:
            where = f"line {problem.line}" if problem.line else "file"
            item = QListWidgetItem(f"{where}: {problem.field + ': ' if problem.field else ''}{plain(problem.message)}")
            item.setData(Qt.UserRole, problem.line)
            self.problems.addItem(item)
        self.problems.setVisible(bool(report.problems))
        self._show_preview(summary.preview, summary.preview_line, summary.preview_split)

    def _draw_histogram(self, lengths: list[int]) -> None:
        self.histogram.clear()
        if not lengths:
            self.histogram.hide()
            return
        counts, edges = np.histogram(lengths, bins=min(30, max(5, len(set(lengths)))))
        self.histogram.addItem(pg.BarGraphItem(x0=edges[:-1], x1=edges[1:], height=counts,
                                               brush=(70, 130, 200, 170), pen=None))
        self.histogram.show()

    def _show_preview(self, pieces: list[tuple[str, bool]], line: int | None, split: int = 0) -> None:
        """The example token by token; `split`: where a preference pair's rejected side starts (0: not a pair)."""
        if not pieces:
            self.preview.hide()
            return
        learned = f"<span style='{LEARNED}'>highlighted</span> tokens are learned"
        if split:
            self.preview.setHtml(f"<small>Line {line} as the model sees it, both sides of the pair; {learned} "
                                 f"from:</small>{_side('✓ Chosen', CHOSEN_COLOR, pieces[:split])}"
                                 f"{_side('✗ Rejected', REJECTED_COLOR, pieces[split:])}")
        else:
            self.preview.setHtml(f"<small>Line {line} as the model sees it; {learned}:</small><br>"
                                 f"<span style='font-family:monospace'>{_tokens(pieces)}</span>")
        self.preview.setMinimumHeight(PAIR_PREVIEW_HEIGHT if split else 0)  # a pair: room for both sides
        self.preview.setMaximumHeight(PAIR_PREVIEW_HEIGHT if split else PREVIEW_HEIGHT)
        self.preview.show()

    def _show_problem_line(self, item) -> None:
        line = item.data(Qt.UserRole) if item else None
        if line and 0 < line <= len(self._lines):
            text = self._lines[line - 1]
            self.preview.setHtml(f"<small>Line {line}:</small><br><span style='font-family:monospace'>"
                                 f"{html.escape(text[:2000])}</span>")
            self.preview.show()


def _tokens(pieces: list[tuple[str, bool]]) -> str:
    return "".join(f"<span style='{LEARNED}'>{_escape(text)}</span>" if trained
                   else f"<span style='color:#888'>{_escape(text)}</span>" for text, trained in pieces)


def _side(title: str, color: str, pieces: list[tuple[str, bool]]) -> str:
    """One side of a preference pair: its title, then its tokens in a framed block."""
    return (f"<p style='margin:6px 0 2px 0'><b style='color:{color}'>{html.escape(title)}</b></p>"
            f"<table width='100%' border='1' cellspacing='0' cellpadding='4' style='border-collapse:collapse;"
            f"border-color:{color};border-style:solid'><tr><td>"
            f"<span style='font-family:monospace'>{_tokens(pieces)}</span></td></tr></table>")


def _escape(text: str) -> str:
    return html.escape(text).replace("\n", "↵<br>")


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
