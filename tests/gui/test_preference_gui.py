"""Preference tuning (DPO, ORPO) in the window, through real widgets: the method box and what it puts
in the run's config and plan, the method following the data and the one-line refusal when they do
not go together, a pair's preview as two sides, the live margin and accuracy graphs, and the Runs
tab reading preference runs back from their metrics.jsonl (run folders written here by hand)."""

from __future__ import annotations

import json
import re
import time

import numpy as np
from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDropEvent
from PySide6.QtTest import QTest

PAIRS = [
    {"prompt": "How do I make bread?", "chosen": "Ahoy, knead it well, matey!", "rejected": "Knead it."},
    {"prompt": "What is a roux?", "chosen": "Arr, flour and butter cooked together.", "rejected": "Flour and fat."},
    {"system": "You are terse.", "prompt": "Salt or sugar?", "chosen": "Arr, salt!", "rejected": "Sugar, I suppose."},
]
CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy"}]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def drop_file(widget, path) -> None:
    """A real drop event, as the file manager sends it."""
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    widget.dropEvent(QDropEvent(QPointF(10, 10), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier))


def pick(box, method: str) -> None:
    """Choose `method` as a user does: arrow keys on the focused list (which emits `activated`)."""
    target = box.findData(method)
    assert target >= 0, method
    while box.currentIndex() != target:
        QTest.keyClick(box, Qt.Key_Down if box.currentIndex() < target else Qt.Key_Up)


def fake_run(run_id: str, model: str = "demo", method: str = "sft", status: str = "finished", steps: int = 4,
             adapter: bool = True, rows: list[dict] = (), start_from: str = "") -> str:
    """A run folder as the engine leaves one (config, plan, status, metrics.jsonl, the adapter file),
    written by hand: no model trains."""
    from app.core.config import Plan, TrainConfig
    from app.core.paths import runs_dir

    folder = runs_dir() / run_id
    (folder / "checkpoints").mkdir(parents=True)
    config = TrainConfig(model=model, data="/data/pairs.jsonl", method=method, start_from=start_from)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    (folder / "plan.json").write_text(json.dumps(Plan(total_steps=steps).to_dict()))
    now = time.time()
    (folder / "status.json").write_text(json.dumps({"status": status, "reason": "", "step": steps,
                                                    "total_steps": steps, "last_loss": 0.5, "eval_loss": 0.6,
                                                    "created": now, "updated": now}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if adapter:
        (folder / "adapter").mkdir()
        (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"{}")
    return run_id


def step_row(step: int, loss: float, tokens: int = 100) -> dict:
    return {"event": "StepMetrics", "step": step, "total_steps": 4, "epoch": step / 4, "loss": loss, "lr": 1e-4,
            "grad_norm": 0.2, "tokens": tokens, "tokens_per_s": 50.0, "elapsed_s": step * 2.0, "eta_s": 1.0}


def preference_row(step: int, split: str, margin: float, accuracy: float) -> dict:
    return {"event": "PreferenceMetrics", "step": step, "split": split, "chosen_reward": margin / 2,
            "rejected_reward": -margin / 2, "margin": margin, "accuracy": accuracy}


def data_of(item) -> tuple[list[float], list[float]]:
    """The points a curve holds (all of them: `getData` gives those drawn, clipped to the view)."""
    x, y = item.xData, item.yData
    return ([] if x is None else list(np.asarray(x, dtype=float)), [] if y is None else list(np.asarray(y, dtype=float)))


# -- the method box ----------------------------------------------------------------------------------
def test_choosing_dpo_shows_beta_and_start_from_and_the_config_and_plan_follow(window, qtbot):
    fake_run("20250101-000000-demo-chats", model="demo")  # a finished run of this model, with an adapter
    fake_run("20250101-000100-other-chats", model="Qwen2.5-0.5B-Instruct")  # another model's
    fake_run("20250101-000200-demo-stopped", model="demo", status="stopped")  # not finished
    fake_run("20250101-000300-demo-noadapter", model="demo", adapter=False)
    tab = window.train_tab
    method = tab.method
    assert method.method() == "sft" and not method.beta.isVisibleTo(tab) and not method.start_from.isVisibleTo(tab)
    assert tab.config().method == "sft" and tab.config().start_from == ""
    assert "Direct Preference Optimisation" in method.box.toolTip()  # the field's help text
    pick(method.box, "dpo")
    assert method.chosen_by_user and method.beta.isVisibleTo(tab) and method.start_from.isVisibleTo(tab)
    assert "reference" in method.beta.toolTip() and "finished run" in method.start_from.toolTip()
    assert [method.start_from.itemData(i) for i in range(method.start_from.count())] == [
        "", "20250101-000000-demo-chats"]
    assert method.start_from.itemText(0) == "the base model" and method.start_from.itemText(1) == "demo-chats (SFT)"
    method.beta.setText("0.25")
    method.start_from.setCurrentIndex(1)
    config = tab.config()
    assert (config.method, config.beta, config.start_from) == ("dpo", 0.25, "20250101-000000-demo-chats")
    # the preview plans the method: a preference loss needs the full logits
    qtbot.waitUntil(lambda: tab.plan_view.plan is not None and "dpo needs" in tab.plan_view.reasons["loss"].text(),
                    timeout=60_000)
    method.beta.setText("0")  # out of range: said in the plan panel, no plan, no run
    qtbot.waitUntil(lambda: tab.plan_view.plan is None, timeout=30_000)
    assert "Beta: “0” is not a number above 0" in tab.plan_view.error.text()
    pick(method.box, "orpo")
    method.beta.setText("0.5")
    assert (tab.config().method, tab.config().beta) == ("orpo", 0.5)
    pick(method.box, "sft")  # beta and the start point are a preference run's: hidden, not sent
    assert not method.beta.isVisibleTo(tab) and not method.start_from.isVisibleTo(tab)
    assert (tab.config().method, tab.config().beta, tab.config().start_from) == ("sft", 0.1, "")


def test_a_dropped_pairs_file_selects_dpo_and_shows_both_sides_of_a_pair(window, qtbot, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    chats = write_jsonl(tmp_path / "chats.jsonl", [CHAT] * 3)
    tab = window.train_tab
    drop_file(tab.drop, pairs)
    qtbot.waitUntil(lambda: tab.summary is not None, timeout=120_000)
    assert tab.method.method() == "dpo" and not tab.method.chosen_by_user and tab.method.warning.isHidden()
    assert tab.method.beta.isVisibleTo(tab)
    text = tab.report.preview.toPlainText()  # two labelled sides, each with its own answer
    chosen, rejected = text.split("✗ Rejected")
    assert "✓ Chosen" in chosen and "Ahoy, knead it well, matey!" in chosen and "Knead it." not in chosen
    assert "Knead it." in rejected and "matey" not in rejected
    assert rejected.count("How do I make bread?") == chosen.count("How do I make bread?") == 1
    # learned tokens marked on both sides (Qt merges neighbouring tokens of one format): the answers
    _legend, learned_chosen, learned_rejected = re.findall(r'background-color:#f6d365;">(.*?)</span>',
                                                           tab.report.preview.toHtml())
    assert learned_chosen.startswith("Ahoy, knead it well, matey!") and learned_rejected.startswith("Knead it.")
    drop_file(tab.drop, chats)  # the method still follows the data: a chat file trains with SFT
    qtbot.waitUntil(lambda: tab.summary is not None and tab.summary.report.format == "messages", timeout=60_000)
    assert tab.method.method() == "sft" and tab.method.warning.isHidden()
    assert "Chosen" not in tab.report.preview.toPlainText() and "Ahoy" in tab.report.preview.toPlainText()


def test_a_method_that_does_not_fit_the_data_is_said_in_one_line_and_train_refuses(window, qtbot, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    chats = write_jsonl(tmp_path / "chats.jsonl", [CHAT] * 3)
    tab = window.train_tab
    tab.set_engine_ready()
    pick(tab.method.box, "dpo")
    pick(tab.method.box, "sft")  # SFT, chosen by the user
    assert tab.method.chosen_by_user
    tab.load_dataset(str(pairs))
    qtbot.waitUntil(lambda: tab.summary is not None and tab.plan_view.plan is not None, timeout=120_000)
    assert tab.method.method() == "sft"  # the user's choice is kept
    warning = tab.method.warning
    assert warning.isVisibleTo(tab) and warning.text() == "⚠ This file holds preference pairs: train them with DPO or ORPO."
    assert "\n" not in warning.text() and warning.height() < 2.2 * warning.fontMetrics().height()  # one line
    assert not tab.train_button.isEnabled() and tab.status.text() == warning.text()[2:]
    tab.start_training()  # Ctrl+Enter reaches here without the button: refused too
    assert not tab.running
    pick(tab.method.box, "orpo")
    qtbot.waitUntil(lambda: tab.train_button.isEnabled(), timeout=60_000)
    assert warning.isHidden() and tab.status.text().startswith("Ready to train on 3 examples")
    tab.load_dataset(str(chats))
    qtbot.waitUntil(lambda: tab.summary is not None and tab.summary.report.format == "messages", timeout=60_000)
    assert tab.method.method() == "orpo" and not tab.train_button.isEnabled()
    assert warning.text() == "⚠ ORPO needs preference pairs; this file is OpenAI messages: choose SFT."
    pick(tab.method.box, "sft")
    qtbot.waitUntil(lambda: tab.train_button.isEnabled(), timeout=60_000)
    assert warning.isHidden()


# -- the live graphs -----------------------------------------------------------------------------------
def test_preference_events_draw_the_margin_and_accuracy_and_an_sft_run_hides_them(window):
    from app.core.events import EvalMetrics, PreferenceMetrics, RunStarted, StepMetrics

    tab, graphs = window.train_tab, window.train_tab.graphs
    assert not graphs.preference.isVisibleTo(tab)
    for step, margin, accuracy in ((1, 0.1, 0.5), (2, 0.4, 0.75), (3, 0.9, 1.0)):
        tab._on_event(StepMetrics(step, 10, 0.1, 0.69 - step / 10, 1e-4, 0.2, 512, 160.0, 9.0, 21.0))
        tab._on_event(PreferenceMetrics(step, "train", margin / 2, -margin / 2, margin, accuracy))
    tab._on_event(EvalMetrics(3, 0.55))
    tab._on_event(PreferenceMetrics(3, "eval", 0.2, -0.1, 0.3, 0.625))
    graphs.refresh()
    plots = graphs.preference
    assert plots.isVisibleTo(tab)
    assert data_of(plots.margin.raw) == ([1, 2, 3], [0.1, 0.4, 0.9])
    assert data_of(plots.accuracy.raw) == ([1, 2, 3], [0.5, 0.75, 1.0])
    assert data_of(plots.margin.eval) == ([3], [0.3]) and data_of(plots.accuracy.eval) == ([3], [0.625])
    assert len(data_of(plots.margin.smooth)[1]) == 3 and data_of(graphs.loss.eval) == ([3], [0.55])
    assert "margin" in plots.margin.getPlotItem().titleLabel.text
    assert "accuracy" in plots.accuracy.getPlotItem().titleLabel.text
    tab._on_event(RunStarted("run", "/nowhere", 10, 1, 30, 2, 0, 0, "cpu"))  # resumed from step 1: later points go
    graphs.refresh()
    assert data_of(plots.margin.raw) == ([1], [0.1]) and data_of(plots.accuracy.eval) == ([], [])
    graphs.clear()  # a new run starts: an SFT run sends none, so the graphs stay hidden
    tab._on_event(StepMetrics(1, 10, 0.1, 0.6, 1e-4, 0.2, 512, 160.0, 9.0, 21.0))
    graphs.refresh()
    assert not plots.isVisibleTo(tab) and data_of(plots.margin.raw) == ([], [])


# -- the runs tab ----------------------------------------------------------------------------------------
def test_the_runs_tab_shows_each_runs_method_and_compares_preference_curves(window):
    from app.core.runs import list_runs

    sft = fake_run("20250101-000000-demo-chats", rows=[step_row(s, 1.0 / s) for s in (1, 2, 3, 4)])
    dpo_rows = [step_row(1, 0.69), preference_row(1, "train", 0.1, 0.5), step_row(2, 0.6),
                preference_row(2, "train", 0.3, 0.5), preference_row(2, "eval", 0.2, 0.5),
                preference_row(3, "train", 9.0, 0.0),  # the first try of step 3, repeated after a resume
                step_row(3, 0.5), preference_row(3, "train", 0.6, 1.0), step_row(4, 0.4),
                preference_row(4, "train", 0.8, 1.0), preference_row(4, "eval", 0.7, 0.75)]
    dpo = fake_run("20250101-000100-demo-pairs", method="dpo", rows=dpo_rows, start_from=sft)
    orpo = fake_run("20250101-000200-demo-pairs", method="orpo",
                    rows=[step_row(1, 2.0, 300), preference_row(1, "train", 0.05, 0.25),
                          step_row(2, 1.8, 300), preference_row(2, "train", 0.15, 0.5)])
    window.tabs.setCurrentWidget(window.runs_tab)
    tab = window.runs_tab
    column = 4
    assert tab.table.headerItem().text(column) == "Method"
    methods = {tab.table.topLevelItem(i).data(0, Qt.UserRole + 1): tab.table.topLevelItem(i).text(column)
               for i in range(3)}
    assert methods == {sft: "SFT", dpo: "DPO", orpo: "ORPO"}
    tab.select(dpo)
    assert tab.preference.isVisibleTo(tab)
    assert (tab.preference.margin.steps, tab.preference.margin.losses) == ([1, 2, 3, 4], [0.1, 0.3, 0.6, 0.8])
    assert tab.preference.accuracy.losses == [0.5, 0.5, 1.0, 1.0]
    assert (tab.preference.accuracy.eval_steps, tab.preference.accuracy.eval_losses) == ([2, 4], [0.5, 0.75])
    assert "DPO (beta 0.1) from demo-chats" in tab.details.text()
    tab.select(sft)
    assert not tab.preference.isVisibleTo(tab) and "· SFT" in tab.details.text()
    tab.select(sft, dpo, orpo)
    assert tab.curves.currentIndex() == 1 and tab.compare_preference.isVisibleTo(tab)
    names = {row.id: tab.names[row.id] for row in list_runs()}
    margins = [item for item in tab.compare_preference.margin.listDataItems() if item.opts["pen"] is not None]
    assert sorted(tab.compare_preference.margin.names) == sorted([names[dpo], names[orpo]])
    assert sorted(data_of(item)[0] for item in margins) == [[1, 2], [1, 2, 3, 4]]
    dots = [item for item in tab.compare_preference.accuracy.listDataItems() if item.opts["pen"] is None]
    assert [data_of(item) for item in dots] == [([2, 4], [0.5, 0.75])]  # the DPO run's evals
    loss_curves = [item for item in tab.compare.listDataItems() if item.opts["pen"] is not None]
    assert len(loss_curves) == 3  # the loss of all three, SFT included
    tab.compare_axis.setCurrentIndex(tab.compare_axis.findData("tokens"))
    margins = [item for item in tab.compare_preference.margin.listDataItems() if item.opts["pen"] is not None]
    assert sorted(data_of(item)[0] for item in margins) == [[100, 200, 300, 400], [300, 600]]
    more = fake_run("20250101-000300-demo-more")
    tab.refresh()
    tab.select(sft, more)  # two SFT runs: no preference graphs
    assert tab.curves.currentIndex() == 1 and not tab.compare_preference.isVisibleTo(tab)
