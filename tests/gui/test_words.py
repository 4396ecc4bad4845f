"""The window speaks its own words: the core's command-line flags and pip commands become the names
of the window's controls, and no label of the Train tab shows one after the plans a user meets."""

from __future__ import annotations

from PySide6.QtWidgets import QLabel

from app.gui.words import command_line_words, plain


def test_flags_and_pip_commands_become_the_windows_words():
    assert plain("no data given: 2048 tokens (pass --data to fit your examples)") == (
        "no data given: 2048 tokens (choose a dataset to fit your examples)")
    assert plain("try a shorter --seq-len, --batch 1 or --grad-checkpointing") == (
        "try a shorter Sequence length, Micro-batch 1 or Checkpointing “on”")
    assert plain("flash-attn: not installed (pip install flash-attn)") == (
        "flash-attn: not installed (install the Python package flash-attn)")
    assert plain('Liger is not installed (pip install "tunesmith[kernels]")') == (
        "Liger is not installed (install the Python package tunesmith[kernels])")
    assert plain("--no-grad-checkpointing") == "Checkpointing “off”"  # not "--no-" + the flag after it
    assert plain("/home/me/runs/--odd-name/train.log") == "/home/me/runs/--odd-name/train.log"  # paths kept
    assert command_line_words("raise --seq-len or pass --skip-bad, `tunesmith runs`") == [
        "--seq-len", "--skip-bad", "`tunesmith runs`"]
    assert command_line_words(plain("raise --seq-len or pass --skip-bad, `tunesmith runs`")) == []


def labels_with_command_line_words(widget) -> list[str]:
    return [f"{label.objectName() or type(label.parent()).__name__}: {label.text()}"
            for label in widget.findChildren(QLabel) if command_line_words(label.text())]


def test_no_label_of_the_train_tab_speaks_command_line(window, qtbot, tmp_path):
    from app.core.resources import sample_dataset

    tab = window.train_tab
    tab.model_box.setCurrentText("Llama-3.1-8B-Instruct")  # no data yet: the plan for the model alone
    qtbot.waitUntil(lambda: "no data given" in tab.plan_view.reasons["seq_len"].text(), timeout=60_000)
    assert labels_with_command_line_words(window) == []
    tab.load_dataset(str(sample_dataset()))
    tab.preset_box.setCurrentIndex(tab.preset_box.findData("8gb"))
    tab.plan_view.inputs["seq_len"].setValue(65536)
    tab.plan_view.inputs["grad_checkpointing"].setCurrentText("off")  # nothing fits: the refusal
    qtbot.waitUntil(lambda: tab.plan_view.error.isVisible(), timeout=60_000)
    assert "the settings you fixed need at least" in tab.plan_view.error.text()
    assert labels_with_command_line_words(window) == []
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n{"messages": "x\n')
    tab.load_dataset(str(bad))
    qtbot.waitUntil(lambda: tab.report.problems.count() == 2, timeout=60_000)
    assert "at at" not in tab.report.problems.item(1).text()
    items = [tab.report.problems.item(i).text() for i in range(tab.report.problems.count())]
    assert [item for item in items if command_line_words(item)] == []
    assert labels_with_command_line_words(window) == []
