"""The Export tab: write a run out as its adapter, a merged model or a GGUF file for llama.cpp and
Ollama. The export runs on a worker thread with its progress listed line by line; an existing
folder is replaced only after a confirmation; the result lists its files and its checks."""

from __future__ import annotations

import html
from pathlib import Path

from PySide6.QtCore import Qt, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QGuiApplication
from PySide6.QtWidgets import (QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit,
                               QListWidget, QMessageBox, QProgressBar, QVBoxLayout, QWidget)

from app.core.units import size_text
from app.gui.widgets.controls import button, label
from app.gui.widgets.download_prompt import agree_to_download
from app.gui.words import plain
from app.gui.workers import StreamWorker, Threads

FORMATS = {"adapter": "Adapter (PEFT: small, needs the base model)",
           "merged": "Merged model (16-bit safetensors, for transformers/vLLM)",
           "gguf": "GGUF + Ollama Modelfile (llama.cpp, Ollama, LM Studio)"}


EXAMPLE_PARAMETERS = 8.03e9  # before a run is chosen, sizes are those of an 8B model
GGUF_COMMAND = "pip install 'tunesmith[gguf]'"


def quant_picker() -> tuple[QComboBox, QLabel]:
    """The GGUF types, each with its size (of an 8B model until `show_sizes` names the model);
    those this machine cannot write are greyed out, and the note under the box says why (llama.cpp's
    quantizer is not installed) with a link that copies the command that installs it."""
    from app.core.export.quantize import ALL_QUANTS, quant_problem  # here: the window opens before the engine's modules load

    box = QComboBox()
    missing = []
    for quant in ALL_QUANTS:
        box.addItem(quant, quant)
        problem = quant_problem(quant)
        if problem:
            item = box.model().item(box.count() - 1)
            item.setEnabled(False)
            item.setToolTip(plain(problem))
            missing.append(quant)
    show_sizes(box, EXAMPLE_PARAMETERS, "8B model")
    box.setToolTip("GGUF tensor type: f16 keeps full quality, q8_0 is half the size with little loss, "
                   "q4_k_m is what Ollama usually runs")
    note = label()
    if missing:
        note.setText(f"{', '.join(missing)} greyed out: they need llama.cpp's quantizer, the Python package "
                     f"“tunesmith[gguf]” (<a href='copy'>copy the command that installs it</a>, then restart "
                     "Tunesmith)")
        note.setTextFormat(Qt.RichText)
        note.linkActivated.connect(lambda _: QGuiApplication.clipboard().setText(GGUF_COMMAND))
    note.setVisible(bool(missing))
    return box, note


def show_sizes(box: QComboBox, parameters: float, what: str) -> None:
    """Each GGUF type's text with its file size for a model of `parameters` ("this model: 82 MiB")."""
    from app.core.export.quantize import BYTES_PER_PARAM, DESCRIPTION  # here: the window opens before the engine's modules load

    for i in range(box.count()):
        quant = box.itemData(i)
        box.setItemText(i, f"{quant}: {DESCRIPTION[quant]} ({what}: {size_text(parameters * BYTES_PER_PARAM[quant])})")


class ExportTab(QWidget):
    """Choose a run, a format and a folder; export with progress."""

    finished = Signal()  # an export ended (done or failed)

    def __init__(self, threads: Threads):
        super().__init__()
        self.threads = threads
        self.worker: StreamWorker | None = None
        self._newest_seen = ""  # the newest finished run at the last refresh: a newer one is selected
        self.result = None
        self.commands: list[tuple[str, str]] = []  # how to run the last export (what, command)

        self._build_controls()
        self._build_layout()
        self.format_box.currentIndexChanged.connect(self._suggest_folder)
        self.run_box.currentIndexChanged.connect(self._suggest_folder)
        self.run_box.currentIndexChanged.connect(self._show_model_sizes)
        self.format_box.currentIndexChanged.connect(self._update_buttons)
        self._update_buttons()

    def _build_controls(self) -> None:
        self.run_box = QComboBox()
        self.run_box.setToolTip("The run to export: its final adapter, or its latest checkpoint if unfinished")
        self.format_box = QComboBox()
        for key, text in FORMATS.items():
            self.format_box.addItem(text, key)
        self.format_box.setToolTip("What to write; every export comes with a model card (README.md)")
        self.dtype_box = QComboBox()
        for text, key in (("Automatic (f16 where the model's activations allow, else bf16)", "auto"),
                          ("bf16", "bf16"), ("f16", "f16"), ("f32", "f32")):
            self.dtype_box.addItem(text, key)
        self.dtype_box.setToolTip("Precision of the merged weights: f16 keeps 3 more bits of each weight than bf16, "
                                  "so more of the adapter's small changes, but overflows on models whose activations "
                                  "pass 65,504; automatic measures them on the check prompts first")
        self.quant_box, self.quant_note = quant_picker()
        self.into_box = QComboBox()
        self.into_box.addItem("The weights it trained against (as tested in chat)", "trained")
        self.into_box.addItem("The base model's original 16-bit weights", "original")
        self.into_box.setToolTip("A QLoRA adapter learned against the base's NF4-rounded weights: merged into "
                                 "those, the result is the model you tested; merged into the original ones, "
                                 "it picks a different next token more often")
        self.out_edit = QLineEdit()
        self.out_edit.setToolTip("The folder to create; it is written under a temporary name and renamed "
                                 "when complete")
        self.browse_button = button("folder", "Choose…", "Choose where the export goes", self._browse)
        self.export_button = button("export", "Export", "Write the export (asks before replacing an existing "
                                    "folder)", self.export)
        self.open_button = button("folder", "Open folder", "Show the exported files", self._open)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setToolTip("Busy while the export runs")
        self.log = QListWidget()
        self.log.setToolTip("What the export did, step by step")
        self.summary = label()
        self.run_it = QGroupBox("Run it")
        self.run_it.setToolTip("The commands that run this export, for this folder; Copy puts one on the clipboard")
        QFormLayout(self.run_it)
        self.run_it.hide()

    def _build_layout(self) -> None:
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit, 1)
        out_row.addWidget(self.browse_button)
        form = QFormLayout()
        for text, field in (("Run", self.run_box), ("Format", self.format_box), ("Merged precision", self.dtype_box),
                            ("GGUF type", self.quant_box), ("", self.quant_note), ("Merge into", self.into_box),
                            ("Folder", out_row)):
            form.addRow(text, field)
        buttons = QHBoxLayout()
        buttons.addWidget(self.export_button)
        buttons.addWidget(self.open_button)
        buttons.addWidget(self.progress, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.summary)
        layout.addWidget(self.run_it)
        layout.addWidget(self.log, 1)

    def refresh_runs(self) -> None:
        from app.core.adapters import runs_with_adapter  # here: the window opens before the engine's modules load

        from app.core.runs import display_names, newest_finished  # here: the window opens before the engine's modules load

        current = self.run_box.currentData()
        self.run_box.blockSignals(True)
        self.run_box.clear()
        rows = runs_with_adapter()
        names = display_names(rows)
        for row in rows:
            self.run_box.addItem(f"{names[row.id]} ({row.status}, step {row.step}/{row.total_steps})", row.id)
            self.run_box.setItemData(self.run_box.count() - 1, row.id, Qt.ToolTipRole)
        newest = newest_finished(rows)
        if newest and newest != self._newest_seen:  # a run finished since: the one to export
            current = newest
        self._newest_seen = newest or self._newest_seen
        self.run_box.setCurrentIndex(max(0, self.run_box.findData(current)))
        self.run_box.blockSignals(False)
        self._suggest_folder()  # for the run now chosen (a folder the user picked is kept)
        self._show_model_sizes()
        self._update_buttons()

    def _show_model_sizes(self) -> None:
        """The GGUF sizes of the chosen run's model (its config alone; nothing is loaded)."""
        from app.core.errors import UserError  # here: the window opens before the engine's modules load
        from app.core.models.resolve import model_facts  # here: the window opens before the engine's modules load
        from app.core.runs import open_run  # here: the window opens before the engine's modules load

        run_id = self.run_box.currentData()
        try:
            facts = model_facts(open_run(run_id).config().model) if run_id else None
        except (UserError, OSError, ValueError):
            facts = None
        parameters = (facts.parameters or (facts.arch.total_params if facts.arch else 0)) if facts else 0
        if parameters:
            show_sizes(self.quant_box, parameters, "this model")
        else:
            show_sizes(self.quant_box, EXAMPLE_PARAMETERS, "8B model")

    def _suggest_folder(self) -> None:
        from app.core.paths import data_dir  # here: the window opens before the engine's modules load

        run_id, fmt = self.run_box.currentData(), self.format_box.currentData()
        if run_id and (not self.out_edit.text() or self.out_edit.text().startswith(str(data_dir() / "exports"))):
            self.out_edit.setText(str(data_dir() / "exports" / f"{run_id}-{fmt}"))

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export into (a new folder is made inside)")
        if folder and self.run_box.currentData():
            self.out_edit.setText(str(Path(folder) / f"{self.run_box.currentData()}-{self.format_box.currentData()}"))

    def export(self) -> None:
        from app.core.export.exporter import ExportOptions, export_run  # lazy: imports numpy (heavy) only when used

        run_id, fmt, out = self.run_box.currentData(), self.format_box.currentData(), self.out_edit.text().strip()
        if not run_id or not out or self.worker is not None:
            return
        from app.core.export.target import replace_problem  # here: the window opens before the engine's modules load

        force = False
        target = Path(out).expanduser()
        problem = replace_problem(target, run_id)
        if problem:
            QMessageBox.warning(self, "Choose another folder", problem)
            return
        if target.exists() and (target.is_file() or any(target.iterdir())):
            answer = QMessageBox.question(self, "Replace the earlier export?",
                                          f"{target} holds an earlier export. Replace it with this one? Its "
                                          "files are deleted once the new export is complete.",
                                          QMessageBox.Yes | QMessageBox.Cancel, QMessageBox.Cancel)
            if answer != QMessageBox.Yes:
                return
            force = True
        agreed = agree_to_download(self, run_id)
        if agreed is False:
            return
        download = bool(agreed)
        dtype, quant, into = self.dtype_box.currentData(), self.quant_box.currentData(), self.into_box.currentData()
        options = ExportOptions(dtype=dtype, quant=quant, force=force, merge_into=into, download=download)
        self.worker = StreamWorker(lambda emit: export_run(run_id, fmt, out, options, progress=emit))
        self.worker.item.connect(self._progress)
        self.worker.done.connect(self._done)
        self.worker.failed.connect(self._failed)
        self.log.clear()
        self.run_it.hide()
        self.summary.setText(f"Exporting {html.escape(run_id)} as {fmt}…")
        self.progress.setRange(0, 0)  # busy
        self.threads.start(self.worker, self.worker.done, self.worker.failed)
        self._update_buttons()

    def _progress(self, message) -> None:
        if self.log.count() and str(message).startswith("Writing ") and self.log.item(self.log.count() - 1).text(
                ).startswith("Writing "):
            self.log.item(self.log.count() - 1).setText(str(message))  # one line for the tensor-by-tensor part
        else:
            self.log.addItem(str(message))
        self.log.scrollToBottom()

    def _done(self, result) -> None:
        self.worker, self.result = None, result
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        checks = []
        if "max_logit_diff" in result.checks:
            into = result.checks.get("merged_into", "original")
            why = f" ({html.escape(result.checks['merged_into_why'])})" if result.checks.get("merged_into_why") else ""
            checks.append(f"merged into the {'weights it trained against' if into == 'trained' else 'original weights'}"
                          f"{why} vs base + adapter as tested: the same next token at "
                          f"{result.checks['top_token_agreement']:.1%} of positions (logits within "
                          f"{result.checks['max_logit_diff']:.3g})")
        if "logit_check" in result.checks:
            checks.append(f"merged model vs base + adapter: {html.escape(result.checks['logit_check'])}")
        if result.format == "merged" and "dtype" in result.checks:
            checks.append(f"stored in {html.escape(result.checks.get('dtype_choice') or result.checks['dtype'])}")
        if "gguf_tensors" in result.checks:
            checks.append(f"GGUF read back: {result.checks['gguf_tensors']} tensors match")
        self.summary.setText(f"<b>Exported</b> {len(result.files)} files, {result.bytes / 2**20:,.1f} MiB, to "
                             f"{html.escape(str(result.out_dir))}" + ("<br>" + "; ".join(checks) if checks else ""))
        self._show_commands(result)
        self._update_buttons()
        self.finished.emit()

    def _show_commands(self, result) -> None:
        """The exact commands that run the export just written, each with a Copy button."""
        from app.core.export.usage import how_to_run  # here: the window opens before the engine's modules load

        form = self.run_it.layout()
        while form.rowCount():
            form.removeRow(0)
        self.commands = how_to_run(result.format, result.out_dir, result.files)
        for what, command in self.commands:
            line = QLineEdit(command)
            line.setReadOnly(True)
            line.setCursorPosition(0)
            line.setToolTip(command)
            copy = button("", "Copy", f"Copy the {what} command", lambda _=False, c=command:
                          QGuiApplication.clipboard().setText(c))
            row = QHBoxLayout()
            row.addWidget(line, 1)
            row.addWidget(copy)
            form.addRow(what, row)
        self.run_it.setVisible(bool(self.commands))

    def _failed(self, message: str) -> None:
        self.worker = None
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.summary.setText(f"<span style='color:#c0392b'>{html.escape(message)}</span>")
        self._update_buttons()
        self.finished.emit()

    def _open(self) -> None:
        if self.result is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.result.out_dir)))

    def _update_buttons(self) -> None:
        idle = self.worker is None
        self.export_button.setEnabled(idle and self.run_box.count() > 0)
        self.open_button.setEnabled(idle and self.result is not None)
        fmt = self.format_box.currentData()
        self.dtype_box.setEnabled(fmt == "merged")  # a GGUF file's precision is its GGUF type
        self.quant_box.setEnabled(fmt == "gguf")
        self.into_box.setEnabled(fmt != "adapter")

    @property
    def exporting(self) -> bool:
        return self.worker is not None
