"""The Chat and Export tabs on a real tiny run: load, stream, compare with base, stop, save; export
with progress, and a confirmation before an existing folder is replaced."""

from __future__ import annotations

import json

from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QMessageBox, QPushButton

from conftest import train_tiny



def _loaded_chat(window, qtbot, run_id):
    window.tabs.setCurrentWidget(window.chat_tab)
    tab = window.chat_tab
    tab.source_box.setCurrentIndex(tab.source_box.findData(run_id))
    qtbot.mouseClick(tab.load_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: tab.session is not None, timeout=120_000)
    return tab


def test_chat_streams_an_answer_compares_with_base_and_saves(window, qtbot, tiny_run, tmp_path, monkeypatch):
    tab = _loaded_chat(window, qtbot, tiny_run.run_id)
    assert tiny_run.run_id in tab.loaded_label.text() and tab.send_button.isEnabled()
    tab.temperature.setValue(0)
    tab.max_tokens.setValue(12)
    tab.message.setText("How do I keep bread fresh?")
    qtbot.keyClick(tab.message, Qt.Key_Return)
    assert tab.answering and tab.stop_button.isEnabled() and not tab.send_button.isEnabled()
    qtbot.waitUntil(lambda: not tab.answering, timeout=120_000)
    answer = tab.turns["tuned"][-1]
    assert answer["role"] == "assistant" and answer["content"]
    assert "tokens/s" in tab.stats.text()
    qtbot.waitUntil(lambda: "keep bread fresh" in tab.views["tuned"].toPlainText(), timeout=5_000)
    # the random tiny model never ends an answer: it stops at Max tokens, and says so
    assert "(cut at 12 tokens)" in tab.stats.text() and answer["cut_at"] == 12
    assert "(cut at 12 tokens: raise Max tokens" in tab.views["tuned"].toPlainText()

    tab.compare.setChecked(True)
    assert tab.views["base"].isVisibleTo(tab)
    tab.message.setText("And cheese?")
    qtbot.mouseClick(tab.send_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not tab.answering, timeout=120_000)
    assert tab.turns["base"][-1]["role"] == "assistant" and tab.turns["base"][-1]["content"]
    assert "base:" in tab.stats.text() and "tuned:" in tab.stats.text()

    target = tmp_path / "keep.jsonl"
    monkeypatch.setattr("app.gui.tabs.chat_tab.QFileDialog.getSaveFileName", lambda *a, **k: (str(target), ""))
    qtbot.mouseClick(tab.save_button, Qt.LeftButton)
    saved = json.loads(target.read_text().splitlines()[0])["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant", "user", "assistant"]


def test_stop_ends_an_answer_early(window, qtbot, tiny_run):
    tab = _loaded_chat(window, qtbot, tiny_run.run_id)
    tab.temperature.setValue(0)
    tab.max_tokens.setValue(400)
    tab.message.setText("Tell me everything.")
    tab.send()
    qtbot.waitUntil(lambda: tab.partial["tuned"] != "", timeout=120_000)
    qtbot.mouseClick(tab.stop_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not tab.answering, timeout=120_000)
    assert "(stopped)" in tab.stats.text()
    assert int(tab.stats.text().split("tuned: ")[1].split(" tokens")[0]) < 400


def test_export_shows_progress_and_asks_before_replacing_a_folder(window, qtbot, tiny_run, tmp_path, monkeypatch):
    window.tabs.setCurrentWidget(window.export_tab)
    tab = window.export_tab
    assert tab.run_box.findData(tiny_run.run_id) >= 0
    tab.format_box.setCurrentIndex(tab.format_box.findData("gguf"))
    tab.quant_box.setCurrentIndex(tab.quant_box.findData("q8_0"))
    target = tmp_path / "out"
    tab.out_edit.setText(str(target))
    qtbot.mouseClick(tab.export_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not tab.exporting, timeout=300_000)
    assert "Exported" in tab.summary.text() and "GGUF read back" in tab.summary.text()
    assert (target / "Modelfile").exists() and tab.log.count() >= 3 and tab.open_button.isEnabled()
    assert "(this model: " in tab.quant_box.currentText()  # the tiny model's size, not an 8B one's
    # how to run it, for this folder, each command a click from the clipboard
    assert tab.run_it.isVisibleTo(tab) and [what for what, _ in tab.commands] == ["Ollama", "llama.cpp", "LM Studio"]
    assert f"-f {target / 'Modelfile'}" in tab.commands[0][1]
    copy = [b for b in tab.run_it.findChildren(QPushButton) if b.text() == "Copy"]
    assert len(copy) == 3
    qtbot.mouseClick(copy[1], Qt.LeftButton)
    assert QGuiApplication.clipboard().text() == tab.commands[1][1]

    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *args, **kwargs: asked.append(args[2]) or QMessageBox.Cancel)
    before = sorted(p.name for p in target.iterdir())
    tab.format_box.setCurrentIndex(tab.format_box.findData("adapter"))
    tab.out_edit.setText(str(target))
    qtbot.mouseClick(tab.export_button, Qt.LeftButton)
    assert asked and "earlier export" in asked[0] and not tab.exporting
    assert sorted(p.name for p in target.iterdir()) == before

    mine = tmp_path / "mine"  # a folder of the user's: refused with a warning, never offered for replacing
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    warned, asked[:] = [], []
    monkeypatch.setattr(QMessageBox, "warning", lambda *args, **kwargs: warned.append(args[2]) or QMessageBox.Ok)
    tab.out_edit.setText(str(mine))
    qtbot.mouseClick(tab.export_button, Qt.LeftButton)
    assert warned and "did not write" in warned[0] and not asked and not tab.exporting
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"

    (target / "NOTES.md").write_text("my notes")  # a file of the user's in the earlier export
    warned[:] = []
    tab.out_edit.setText(str(target))
    qtbot.mouseClick(tab.export_button, Qt.LeftButton)
    assert warned and "holds NOTES.md that the export did not write" in warned[0] and not asked
    assert (target / "NOTES.md").read_text() == "my notes" and not tab.exporting


def test_a_merged_export_says_its_agreement_and_the_precision_it_chose(window, qtbot, tiny_run, tmp_path):
    window.tabs.setCurrentWidget(window.export_tab)
    tab = window.export_tab
    tab.run_box.setCurrentIndex(tab.run_box.findData(tiny_run.run_id))
    tab.format_box.setCurrentIndex(tab.format_box.findData("merged"))
    assert tab.dtype_box.isEnabled() and tab.dtype_box.currentData() == "auto"
    tab.out_edit.setText(str(tmp_path / "merged"))
    qtbot.mouseClick(tab.export_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not tab.exporting, timeout=300_000)
    text = tab.summary.text()
    assert "vs base + adapter as tested: the same next token at" in text, text
    assert "stored in f16: the largest activation on the check prompts" in text, text
    config = (tmp_path / "merged" / "config.json").read_text()
    assert '"float16"' in config


def test_loading_an_adapter_whose_base_is_not_here_asks_before_downloading(window, tiny_run, tmp_path, monkeypatch):
    from conftest import adapter_of_a_hub_base

    adapter = adapter_of_a_hub_base(tiny_run, tmp_path)
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda parent, title, text, *rest: asked.append(text)
                        or QMessageBox.Cancel)
    tab = window.chat_tab
    tab.source_box.addItem(adapter.name, str(adapter))
    tab.source_box.setCurrentIndex(tab.source_box.count() - 1)
    tab.load()
    assert asked == ["The adapter was trained on someone/not-here-7b, which is not on this machine. Download it "
                     "from the Hugging Face Hub (its size could not be read from the Hub)?"]
    assert tab._loading is None and tab.session is None  # declined: nothing loads, nothing downloads


def test_chat_and_export_select_a_run_that_finished_since_and_otherwise_keep_the_choice(window, tiny_run, tiny_model,
                                                                                       chat_data):
    chat, export = window.chat_tab, window.export_tab
    for refresh, box in ((chat.refresh_sources, chat.source_box), (export.refresh_runs, export.run_box)):
        refresh()
        assert box.currentData() == tiny_run.run_id
    newer = train_tiny(tiny_model, chat_data, steps=2)
    for refresh, box in ((chat.refresh_sources, chat.source_box), (export.refresh_runs, export.run_box)):
        refresh()
        assert box.currentData() == newer.run_id  # it just finished: the one to try
        names = {box.itemText(i).split(" (")[0] for i in range(box.count())}
        assert len(names) == 2 and all(name.startswith("tiny-llama0-chats") for name in names)  # never two alike
        box.setCurrentIndex(box.findData(tiny_run.run_id))  # the user goes back to the older one
        refresh()
        assert box.currentData() == tiny_run.run_id  # kept: nothing finished since
    assert export.out_edit.text().endswith(f"{tiny_run.run_id}-{export.format_box.currentData()}")
