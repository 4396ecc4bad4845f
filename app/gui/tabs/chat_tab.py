"""The Chat tab: talk to a run's adapter. Choose a run (or an adapter folder), load it once, and
chat; answers stream in, rendered as Markdown. "Compare with base" answers every message twice,
with the adapter and without it, side by side. Stop ends an answer; Save appends the conversation
to a JSONL file in the `messages` format. Loading and generation run on worker threads; the
transcript redraws on a timer, so a fast stream never floods the window."""

from __future__ import annotations

import html
import threading
from pathlib import Path

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel,
                               QLineEdit, QMessageBox, QSpinBox, QSplitter, QTextBrowser, QVBoxLayout,
                               QWidget)

from app.core.chat import GenerationSettings
from app.core.config import field_help
from app.gui.widgets.controls import button, label
from app.gui.widgets.download_prompt import agree_to_download
from app.gui.workers import StreamWorker, TaskWorker, Threads

REDRAW_MS = 100
SIDES = ("tuned", "base")


class ChatTab(QWidget):
    """Load an adapter, then chat with it (and with the base model beside it)."""

    def __init__(self, threads: Threads):
        super().__init__()
        self.threads = threads
        self.session = None
        self._loading: TaskWorker | None = None
        self.worker: StreamWorker | None = None
        self._newest_seen = ""  # the newest finished run at the last refresh: a newer one is selected
        self.stop_event = threading.Event()
        self.turns: dict[str, list[dict]] = {side: [] for side in SIDES}
        self.partial: dict[str, str] = {side: "" for side in SIDES}
        self._dirty = False

        self._build_controls()
        self._build_layout()
        self._redraw = QTimer(self, interval=REDRAW_MS, timeout=self._render)
        self._redraw.start()
        self._update_buttons()

    def _build_controls(self) -> None:
        self.source_box = QComboBox()
        self.source_box.setToolTip("A finished run's adapter, or an unfinished run's latest checkpoint")
        self.source_box.setMinimumWidth(320)
        self.browse_button = button("folder", "Folder…", "Chat with any PEFT adapter folder (adapter_config.json "
                                    "and its weights)", self._browse)
        self.load_button = button("model", "Load", "Load the base model in 4-bit with this adapter (once; it stays "
                                  "loaded)", self.load)
        self.loaded_label = label("Choose a run and press Load.")
        defaults = GenerationSettings()
        self.system = QLineEdit()
        self.system.setPlaceholderText("optional, e.g. You are a pirate chef.")
        self.system.setToolTip(field_help(GenerationSettings, "system_prompt"))
        self.temperature = _spin(QDoubleSpinBox(), 0, 2, defaults.temperature, 0.1,
                                 field_help(GenerationSettings, "temperature"))
        self.top_p = _spin(QDoubleSpinBox(), 0.05, 1, defaults.top_p, 0.05, field_help(GenerationSettings, "top_p"))
        self.max_tokens = _spin(QSpinBox(), 1, 8192, defaults.max_new_tokens, 32,
                                field_help(GenerationSettings, "max_new_tokens"))
        self.compare = QCheckBox("Compare with base")
        self.compare.setToolTip("Answer each message twice: with the adapter (left) and without it (right)")
        self.compare.toggled.connect(self._compare_toggled)
        self.views = {side: QTextBrowser() for side in SIDES}
        for side, view in self.views.items():
            view.setOpenExternalLinks(True)
            view.setToolTip("The tuned adapter's answers" if side == "tuned" else "The base model's answers")
        self.views["base"].hide()
        self.message = QLineEdit()
        self.message.setPlaceholderText("Type a message and press Enter")
        self.message.setToolTip("Your message; Enter sends it")
        self.message.returnPressed.connect(self.send)
        self.send_button = button("chat", "Send", "Send the message (Enter)", self.send)
        self.stop_button = button("stop", "Stop", "Stop the answer after the current token", self.stop)
        self.clear_button = button("delete", "Clear", "Start a new conversation", self.clear)
        self.save_button = button("export", "Save…", "Append this conversation to a JSONL dataset file (messages "
                                  "format)", self.save)
        self.stats = QLabel("")

    def _build_layout(self) -> None:
        top = QHBoxLayout()
        for widget, stretch in ((QLabel("Adapter"), 0), (self.source_box, 1), (self.browse_button, 0),
                                (self.load_button, 0)):
            top.addWidget(widget, stretch)
        settings = QFormLayout()
        settings.addRow("System prompt", self.system)
        knobs = QHBoxLayout()
        for text, widget in (("Temperature", self.temperature), ("Top-p", self.top_p),
                             ("Max tokens", self.max_tokens)):
            knobs.addWidget(QLabel(text))
            knobs.addWidget(widget)
        knobs.addWidget(self.compare)
        knobs.addStretch(1)
        settings.addRow(knobs)
        transcript = QSplitter(Qt.Horizontal)
        for view in self.views.values():
            transcript.addWidget(view)
        entry = QHBoxLayout()
        entry.addWidget(self.message, 1)
        for widget in (self.send_button, self.stop_button, self.clear_button, self.save_button):
            entry.addWidget(widget)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.loaded_label)
        layout.addLayout(settings)
        layout.addWidget(transcript, 1)
        layout.addLayout(entry)
        layout.addWidget(self.stats)

    # -- choosing and loading ---------------------------------------------------------------------
    def refresh_sources(self) -> None:
        """Runs that have something to chat with: a final adapter or a checkpoint."""
        from app.core.adapters import runs_with_adapter  # here: the window opens before the engine's modules load

        from app.core.runs import display_names, newest_finished  # here: the window opens before the engine's modules load

        current = self.source_box.currentData()
        self.source_box.clear()
        rows = runs_with_adapter()
        names = display_names(rows)
        for row in rows:
            what = "adapter" if row.status == "finished" else f"step {row.step} checkpoint"
            self.source_box.addItem(f"{names[row.id]} ({what})", row.id)
            self.source_box.setItemData(self.source_box.count() - 1, row.id, Qt.ToolTipRole)
        newest = newest_finished(rows)
        if newest and newest != self._newest_seen:  # a run finished since: it is what one wants to try
            current = newest
        self._newest_seen = newest or self._newest_seen
        if current:
            index = self.source_box.findData(current)
            if index < 0:
                self.source_box.addItem(Path(current).name, current)
                index = self.source_box.count() - 1
            self.source_box.setCurrentIndex(index)
        self._update_buttons()

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a PEFT adapter folder")
        if folder:
            self.source_box.addItem(Path(folder).name, folder)
            self.source_box.setCurrentIndex(self.source_box.count() - 1)

    def load(self) -> None:
        from app.core.chat import load_chat  # here: the window opens before the engine's modules load

        ref = self.source_box.currentData()
        if not ref or self._busy():
            return

        agreed = agree_to_download(self, ref)
        if agreed is False:
            return
        download = bool(agreed)
        self.session = None  # the old model is released before the new one loads
        self.loaded_label.setText(f"Loading {html.escape(str(ref))}…")
        worker = TaskWorker(lambda: load_chat(ref, download=download), ref)
        worker.done.connect(self._loaded)
        worker.failed.connect(self._load_failed)
        self._loading = worker
        self.threads.start(worker, worker.done, worker.failed)
        self._update_buttons()

    def _loaded(self, _ref, session) -> None:
        self._loading = None
        self.session = session
        self.loaded_label.setText(f"Loaded <b>{html.escape(session.source.label)}</b> on {session.device}; "
                                  "the base model is the same weights with the adapter off.")
        self._update_buttons()
        self.message.setFocus()

    def _load_failed(self, _ref, message: str) -> None:
        self._loading = None
        self.loaded_label.setText(f"<span style='color:#c0392b'>{html.escape(message)}</span>")
        self._update_buttons()

    # -- talking ----------------------------------------------------------------------------------
    def settings(self) -> GenerationSettings:
        return GenerationSettings(system_prompt=self.system.text().strip(), temperature=self.temperature.value(),
                                  top_p=self.top_p.value(), max_new_tokens=self.max_tokens.value())

    def send(self) -> None:
        text = self.message.text().strip()
        if not text or self.session is None or self._busy():
            return
        self.message.clear()
        sides = SIDES if self.compare.isChecked() else ("tuned",)
        for side in sides:
            self.turns[side].append({"role": "user", "content": text})
            self.partial[side] = ""
        session, settings = self.session, self.settings()
        # both sides answer the same prompt: the conversation as the tuned adapter has it
        histories = {side: [{"role": t["role"], "content": t["content"]} for t in self.turns["tuned"]] for side in sides}
        self.stop_event = threading.Event()
        stop = self.stop_event

        def generate(emit):
            stats = {}
            for side in sides:
                for piece in session.stream(histories[side], settings, adapter=side == "tuned", stop=stop):
                    emit((side, piece))
                stats[side] = session.last
                emit((side, session.last))  # this side's answer is complete (its stats)
                if stop.is_set():
                    break
            return stats

        self.worker = StreamWorker(generate)
        self.worker.item.connect(self._piece)
        self.worker.done.connect(self._answered)
        self.worker.failed.connect(self._failed)
        self.threads.start(self.worker, self.worker.done, self.worker.failed)
        self.stats.setText("Answering…")
        self._dirty = True
        self._update_buttons()

    def _piece(self, item) -> None:
        side, piece = item
        if not isinstance(piece, str):  # the answer is complete: AnswerStats
            turn = {"role": "assistant", "content": self.partial[side]}
            if piece.cut:  # shown, never sent back to the model nor saved
                turn["cut_at"] = piece.tokens
            self.turns[side].append(turn)
            self.partial[side] = ""
        else:
            self.partial[side] += piece
        self._dirty = True

    def _answered(self, stats: dict) -> None:
        self.worker = None
        parts = [f"{side}: {s.tokens} tokens, {s.tokens_per_s:.1f} tokens/s"
                 + (" (stopped)" if s.stopped else f" (cut at {s.tokens} tokens)" if s.cut else "")
                 for side, s in stats.items()]
        self.stats.setText(" · ".join(parts))
        self._dirty = True
        self._render()
        self._update_buttons()

    def _failed(self, message: str) -> None:
        self.worker = None
        for side in SIDES:  # the unanswered message is taken back
            if self.turns[side] and self.turns[side][-1]["role"] == "user":
                self.turns[side].pop()
            self.partial[side] = ""
        self.stats.setText(f"<span style='color:#c0392b'>{html.escape(message)}</span>")
        self._dirty = True
        self._update_buttons()

    def stop(self) -> None:
        self.stop_event.set()

    def clear(self) -> None:
        if self._busy():
            return
        self.turns = {side: [] for side in SIDES}
        self.stats.setText("")
        self._dirty = True

    def save(self) -> None:
        from app.core.chat import save_conversation  # here: the window opens before the engine's modules load
        from app.core.errors import UserError  # here: the window opens before the engine's modules load

        path, _ = QFileDialog.getSaveFileName(self, "Append the conversation to", "conversations.jsonl",
                                              "JSON lines (*.jsonl)")
        if not path:
            return
        try:
            save_conversation(path, self.turns["tuned"], self.system.text().strip())
        except UserError as err:
            QMessageBox.warning(self, "Not saved", str(err))
            return
        self.stats.setText(f"Appended the conversation to {html.escape(path)}")

    # -- drawing ----------------------------------------------------------------------------------
    def _render(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        for side, view in self.views.items():
            if view.isHidden() and side == "base":
                continue
            turns = self.turns[side] + ([{"role": "assistant", "content": self.partial[side] + " ▌"}]
                                        if self.worker is not None and self.partial[side] else [])
            view.setMarkdown(_transcript(turns, side))
            view.verticalScrollBar().setValue(view.verticalScrollBar().maximum())

    def _compare_toggled(self, on: bool) -> None:
        self.views["base"].setVisible(on)
        if on:  # the base side shows the exchanges from now on (it answers the same prompts)
            self.turns["base"] = []
        self._dirty = True

    def _busy(self) -> bool:
        return self.worker is not None or self._loading is not None

    def _update_buttons(self) -> None:
        ready = self.session is not None
        self.load_button.setEnabled(self.source_box.count() > 0 and not self._busy())
        for widget in (self.send_button, self.message):
            widget.setEnabled(ready and self.worker is None)
        self.stop_button.setEnabled(self.worker is not None)
        self.clear_button.setEnabled(self.worker is None)
        self.save_button.setEnabled(self.worker is None and any(t["role"] == "assistant" for t in self.turns["tuned"]))

    @property
    def answering(self) -> bool:
        return self.worker is not None


def _transcript(turns: list[dict], side: str) -> str:
    """The conversation as Markdown: the user's turns quoted, the answers as written."""
    who = "Tuned adapter" if side == "tuned" else "Base model"
    parts = [f"#### {who}\n"]
    for turn in turns:
        if turn["role"] == "user":
            parts.append("> **You:** " + turn["content"].replace("\n", "\n> "))
        else:
            cut = f" … *(cut at {turn['cut_at']} tokens: raise Max tokens for longer answers)*" if turn.get("cut_at") else ""
            parts.append(turn["content"] + cut)
    return "\n\n".join(parts)


def _spin(box, low, high, value, step, tip: str):
    box.setRange(low, high)
    box.setValue(value)
    box.setSingleStep(step)
    box.setToolTip(tip)
    return box
