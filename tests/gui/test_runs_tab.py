"""The Runs tab on real runs of a tiny model: list, redraw, compare, resume, delete with a confirmation."""

from __future__ import annotations

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMessageBox

from app.core.runs import list_runs, open_run, read_history
from conftest import train_tiny


def _show_runs(window):
    window.tabs.setCurrentWidget(window.runs_tab)
    return window.runs_tab


def test_the_runs_tab_lists_runs_redraws_one_and_compares_two(window, tiny_model, chat_data):
    first = train_tiny(tiny_model, chat_data, steps=6)
    second = train_tiny(tiny_model, chat_data, steps=4, lr=1e-3)
    tab = _show_runs(window)
    assert tab.table.topLevelItemCount() == 2
    assert {tab.table.topLevelItem(i).text(1) for i in range(2)} == {"finished"}
    tab.select(first.run_id)
    assert tab.loss.steps == tab.lr.steps == list(range(1, 7))
    assert tab.loss.losses == read_history(open_run(first.run_id)).losses
    assert first.run_id in tab.details.text() and "LoRA rank" in tab.details.text()
    assert tab.curves.currentIndex() == 0 and not tab.resume_button.isEnabled()  # finished: nothing to resume
    # the same model and data: two names, numbered by start, never two alike
    names = {tab.table.topLevelItem(i).text(0) for i in range(2)}
    # (two runs started in the same second are told apart by their ids already: "-chats", "-chats-2")
    assert names in ({"tiny-llama0-chats #1", "tiny-llama0-chats #2"}, {"tiny-llama0-chats", "tiny-llama0-chats-2"}), names
    tab.select(first.run_id, second.run_id)
    assert tab.curves.currentIndex() == 1 and tab.compare.isVisibleTo(tab) and len(tab.compare.names) == 2
    assert sorted(tab.compare.names) == sorted(names)
    drawn = [item for item in tab.compare.listDataItems() if item.opts["pen"] is not None]
    assert sorted(len(item.xData) for item in drawn) == [4, 6]
    assert sorted(list(item.xData) for item in drawn) == [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6]]
    tab.compare_axis.setCurrentIndex(tab.compare_axis.findData("tokens"))  # by tokens trained
    drawn = [item for item in tab.compare.listDataItems() if item.opts["pen"] is not None]
    expected = sorted(read_history(open_run(r.run_id)).tokens_through for r in (first, second))
    assert sorted(list(item.xData) for item in drawn) == expected and expected[0][-1] > 4
    assert tab.compare.getAxis("bottom").labelText == "tokens trained"


def test_rename_gives_a_run_a_name_of_its_own_and_empty_takes_it_back(window, tiny_model, chat_data, monkeypatch):
    from PySide6.QtWidgets import QInputDialog

    run = train_tiny(tiny_model, chat_data, steps=2)
    tab = _show_runs(window)
    tab.select(run.run_id)
    answers = iter([("  pirate   chef, take 2 ", True), ("x" * 81, True), ("", True)])
    monkeypatch.setattr(QInputDialog, "getText", lambda *args, **kwargs: next(answers))
    warned = []
    monkeypatch.setattr(QMessageBox, "warning", lambda parent, title, text: warned.append(text))
    tab.rename_selected()
    assert tab.table.topLevelItem(0).text(0) == "pirate chef, take 2"
    assert open_run(run.run_id).label() == "pirate chef, take 2" and list_runs()[0].id == run.run_id  # id kept
    tab.select(run.run_id)
    tab.rename_selected()  # too long: said, the name kept
    assert "at most 80 characters" in warned[0] and tab.table.topLevelItem(0).text(0) == "pirate chef, take 2"
    tab.select(run.run_id)
    tab.rename_selected()
    assert tab.table.topLevelItem(0).text(0) == "tiny-llama0-chats" and open_run(run.run_id).label() == ""


@pytest.mark.slow
def test_resume_from_the_runs_tab_continues_a_stopped_run_on_the_train_tab(window, qtbot, tiny_model, chat_data):
    stopped = train_tiny(tiny_model, chat_data, steps=8, stop_at=3)
    assert stopped.status == "stopped" and stopped.step == 3
    tab = _show_runs(window)
    window.train_tab.set_engine_ready()
    tab.select(stopped.run_id)
    assert tab.resume_button.isEnabled()
    qtbot.mouseClick(tab.resume_button, Qt.LeftButton)
    assert window.tabs.currentWidget() is window.train_tab and window.train_tab.running
    assert not tab.resume_button.isEnabled()  # one run at a time
    qtbot.waitUntil(lambda: not window.train_tab.running, timeout=300_000)
    result = window.train_tab.last_run
    assert result.status == "finished" and result.run_id == stopped.run_id
    assert window.train_tab.loss_plot.steps == list(range(1, 9))  # the past three steps, then the rest
    row = next(r for r in list_runs() if r.id == stopped.run_id)
    assert row.status == "finished" and row.elapsed_s > 0


def test_delete_asks_first_and_keeps_the_run_when_cancelled(window, tiny_model, chat_data, monkeypatch):
    run = train_tiny(tiny_model, chat_data, steps=2)
    tab = _show_runs(window)
    tab.select(run.run_id)
    asked = []

    def answer(reply):
        def question(parent, title, text, *args):
            asked.append(text)
            return reply
        return question

    monkeypatch.setattr(QMessageBox, "question", answer(QMessageBox.Cancel))
    tab.delete_selected()
    assert open_run(run.run_id).dir.exists() and tab.table.topLevelItemCount() == 1
    assert run.run_id in asked[0] and "cannot be undone" in asked[0]
    monkeypatch.setattr(QMessageBox, "question", answer(QMessageBox.Yes))
    tab.delete_selected()
    assert list_runs() == [] and tab.table.topLevelItemCount() == 0 and tab.empty.isVisibleTo(tab)


def test_the_report_view_shows_a_runs_report_and_makes_one_for_a_run_without(window, qtbot, tiny_model, chat_data):
    from dataclasses import replace

    from app.core.config import TrainConfig
    from app.core.train.trainer import run_training

    judged = train_tiny(tiny_model, chat_data, steps=3, report="loss,answers,probes")
    config = TrainConfig(model=str(tiny_model), data=str(chat_data), seq_len=128, micro_batch=4, max_steps=3,
                         quantize="none")
    unjudged = run_training(replace(config, report="off"))
    tab = _show_runs(window)
    tab.select(judged.run_id)
    tab.views.setCurrentWidget(tab.report)
    page = tab.report.page.toPlainText()
    assert "Before and after" in page and "General questions" in page and "kept what it knew" in page
    assert tab.report.make_button.text() == "Make again" and tab.report.make_button.isEnabled()
    tab.select(unjudged.run_id)
    assert "No report for this run yet" in tab.report.page.toPlainText()
    assert tab.report.make_button.text() == "Make report"
    qtbot.mouseClick(tab.report.make_button, Qt.LeftButton)
    assert tab.report.make_button.text() == "Stop"
    qtbot.waitUntil(lambda: not tab.report.making, timeout=120_000)
    assert "General questions" in tab.report.page.toPlainText()
    assert tab.report.note.text().startswith("Made in ")
    assert (open_run(unjudged.run_id).dir / "report.md").exists()
