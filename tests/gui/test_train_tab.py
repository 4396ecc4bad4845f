"""The Train tab driven through real widgets (offscreen): dataset report, plan, train, stop/resume,
failure dialog, and an event loop that keeps turning while a real tiny model trains."""

from __future__ import annotations

import re
import time

import pytest
from PySide6.QtCore import QMimeData, QObject, QPointF, Qt, QTimer, QUrl, Slot
from PySide6.QtGui import QDropEvent



def drop_file(widget, path) -> None:
    """A real drop event, as the file manager sends it."""
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    event = QDropEvent(QPointF(10, 10), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    widget.dropEvent(event)


def test_dropping_a_bad_file_lists_every_problem_with_its_line(window, qtbot, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy"}]}'
    bad.write_text("\n".join([good, "{not json", good, '{"messages": [{"role": "user", "content": "Hi"}]}']) + "\n")
    tab = window.train_tab
    drop_file(tab.drop, bad)
    qtbot.waitUntil(lambda: tab.report.problems.count() == 2, timeout=60_000)
    items = [tab.report.problems.item(i).text() for i in range(2)]
    assert items[0].startswith("line 2:") and items[1].startswith("line 4:") and "assistant" in items[1]
    assert "2 with problems" in tab.report.summary.text()
    tab.set_engine_ready()
    assert not tab.train_button.isEnabled() and tab.skip_bad.isVisibleTo(tab)
    tab.report.problems.setCurrentRow(0)  # clicking a problem shows its line
    assert "{not json" in tab.report.preview.toPlainText()


def test_the_dataset_check_says_what_it_is_doing_until_the_report(window, qtbot, tmp_path, monkeypatch):
    """The first check loads a tokenizer (10-20 s on a slow machine): the report says so, and on a
    long file how many lines are read, instead of a bare "Checking"."""
    good = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy"}]}\n'
    data = tmp_path / "long.jsonl"
    data.write_text(good * 5_000)
    tab, seen = window.train_tab, []
    show_busy = tab.report.show_busy
    monkeypatch.setattr(tab.report, "show_busy", lambda path, doing="": (seen.append(doing), show_busy(path, doing)))
    import app.core.data.validate as validate

    monkeypatch.setattr(validate, "PROGRESS_EVERY_S", 0)  # a fast machine reads these lines in under 0.5 s
    tab.load_dataset(str(data))
    qtbot.waitUntil(lambda: "5000 rows" in tab.report.summary.text().replace(",", ""), timeout=120_000)
    assert seen[0] == "" and any(doing.startswith("Reading long.jsonl: ") and "lines" in doing for doing in seen)
    assert any("loading the tokenizer" in doing for doing in seen), seen
    assert any(doing.startswith("Measuring 5,000 examples") for doing in seen), seen


def test_a_long_step_shows_where_it_is_in_the_status(window):
    from app.core.events import StepProgress

    tab = window.train_tab
    tab._on_event(StepProgress(1, 20, 2, 4, "backward", 12, 30, 1536, 200.0))
    assert tab.status.text() == ("step 1/20 in progress · micro-batch 2 of 4 · backward, layer 12 of 30 · "
                                 "1,536 tokens through · 3m20s so far")


def test_changing_the_preset_changes_the_plan(window, qtbot):
    from app.core.resources import sample_dataset

    tab = window.train_tab
    tab.model_box.setCurrentText("Llama-3.1-8B-Instruct")
    tab.load_dataset(str(sample_dataset()))
    tab.preset_box.setCurrentIndex(tab.preset_box.findData("80gb"))
    qtbot.waitUntil(lambda: tab.plan_view.plan is not None and tab.plan_view.plan.preset == "80gb", timeout=60_000)
    big = tab.plan_view.plan
    tab.preset_box.setCurrentIndex(tab.preset_box.findData("8gb"))
    qtbot.waitUntil(lambda: tab.plan_view.plan is not None and tab.plan_view.plan.preset == "8gb", timeout=60_000)
    small = tab.plan_view.plan
    assert small.budget_bytes < big.budget_bytes and small.predicted_peak_bytes <= small.budget_bytes
    assert (small.grad_checkpointing, -small.micro_batch) > (big.grad_checkpointing, -big.micro_batch)
    assert "of 7.25 GiB usable" in tab.plan_view.peak.text()
    assert "<b>on</b> packed: several examples per row" in tab.plan_view.reasons["packing"].text()
    assert tab.plan_view.reasons["loss"].text().startswith("fused (ours, chunked)")  # words; the name in the tip
    assert "Technical name: chunked" in tab.plan_view.inputs["loss"].toolTip()
    _set_plan(tab, packing="off")
    qtbot.waitUntil(lambda: tab.plan_view.plan is not None and tab.plan_view.plan.batching == "grouped", timeout=60_000)
    assert "turned off by you" in tab.plan_view.reasons["packing"].text()


def test_a_long_sequence_shows_the_long_context_rungs_the_planner_chose(window, qtbot, monkeypatch):
    from app.core import host
    from app.core.units import GIB
    from app.core.resources import sample_dataset

    monkeypatch.setattr(host, "available_ram", lambda: 64 * GIB)  # the test's machine, not this one
    tab = window.train_tab
    tab.model_box.setCurrentText("Llama-3.1-8B-Instruct")
    tab.load_dataset(str(sample_dataset()))
    tab.preset_box.setCurrentIndex(tab.preset_box.findData("24gb"))
    _set_plan(tab, seq_len=65536)
    qtbot.waitUntil(lambda: tab.plan_view.plan is not None and tab.plan_view.plan.seq_len == 65536, timeout=60_000)
    plan, reason = tab.plan_view.plan, tab.plan_view.reasons["grad_checkpointing"].text()
    assert plan.offload_checkpoints and plan.layer_tile == 2048 and plan.predicted_peak_bytes <= plan.budget_bytes
    assert reason.startswith("<b>on, inputs in RAM, layer tiles of 2,048</b>")
    assert "16.00 GiB of layer inputs wait in host RAM" in reason
    _set_plan(tab, seq_len=4096, grad_checkpointing="on, long context")  # the user's choice, at any length
    qtbot.waitUntil(lambda: tab.plan_view.plan is not None and tab.plan_view.plan.seq_len == 4096, timeout=60_000)
    assert tab.plan_view.plan.layer_tile == 2048 and "set by you" in tab.plan_view.reasons["grad_checkpointing"].text()


def _set_plan(tab, **values) -> None:
    for name, value in values.items():
        widget = tab.plan_view.inputs[name]
        if name in ("grad_checkpointing", "packing"):
            widget.setCurrentText(value)
        else:
            widget.setValue(value)


def _ready(tab, qtbot, model, data, epochs: float | None = None) -> None:
    """Model, data and a small fixed plan; with `epochs`, wait until the plan has more steps."""
    tab.model_box.setCurrentText(str(model))
    tab.load_dataset(str(data))
    _set_plan(tab, rank=8, seq_len=128, micro_batch=4, grad_accum=1)
    tab.plan_view.inputs["lr"].setValue(0.005)
    tab.set_engine_ready()
    qtbot.waitUntil(lambda: tab.train_button.isEnabled(), timeout=60_000)
    if epochs is not None:
        tab.plan_view.inputs["epochs"].setValue(epochs)
        qtbot.waitUntil(lambda: tab.plan_view.plan is not None and tab.plan_view.plan.total_steps > epochs,
                        timeout=30_000)


@pytest.mark.slow
def test_train_runs_to_the_end_with_live_loss_and_a_responsive_window(window, qtbot, tiny_model, chat_data):
    tab = window.train_tab
    _ready(tab, qtbot, tiny_model, chat_data, epochs=3)
    gaps, last = [], [time.monotonic()]

    def tick():
        now = time.monotonic()
        gaps.append(now - last[0])
        last[0] = now

    timer = QTimer(interval=20, timeout=tick)
    timer.start()
    qtbot.mouseClick(tab.train_button, Qt.LeftButton)
    assert tab.running and tab.stop_button.isEnabled() and not tab.train_button.isEnabled()
    qtbot.waitUntil(lambda: not tab.running, timeout=300_000)
    timer.stop()
    result = tab.last_run
    assert result.status == "finished", result.reason
    assert tab.loss_plot.point_count == result.total_steps == result.step
    assert tab.train_button.isEnabled() and not tab.stop_button.isEnabled()
    assert "Finished" in tab.status.text()
    assert re.search(r"Before/after: general questions \d+/50 -> \d+/50, (kept|better|forgotten) \(Runs ▸ Report\)\.",
                     tab.status.text()), tab.status.text()  # the report, made on the run's thread, in a few words
    assert max(gaps) < 0.2, f"the event loop stalled {max(gaps) * 1000:.0f} ms"


@pytest.mark.slow
def test_stop_leaves_a_resumable_run_and_resume_continues_the_curve(window, qtbot, tiny_model, chat_data):
    from app.core.runs import open_run
    from app.core.events import StepMetrics

    tab = window.train_tab
    _ready(tab, qtbot, tiny_model, chat_data, epochs=6)
    qtbot.mouseClick(tab.train_button, Qt.LeftButton)
    with qtbot.waitSignal(tab.worker.event, timeout=120_000, check_params_cb=lambda e: isinstance(e, StepMetrics)):
        pass
    tab.stop_after_action.trigger()  # Stop ▸ After this step (the button opens the menu)
    qtbot.waitUntil(lambda: not tab.running, timeout=120_000)
    stopped = tab.last_run
    assert stopped.status == "stopped" and 0 < stopped.step < stopped.total_steps
    assert open_run(stopped.run_id).status()["status"] == "stopped"
    assert tab.resume_button.isEnabled() and tab.loss_plot.point_count == stopped.step
    qtbot.mouseClick(tab.resume_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not tab.running, timeout=300_000)
    assert tab.last_run.status == "finished" and tab.last_run.run_id == stopped.run_id
    assert tab.loss_plot.steps == list(range(1, stopped.total_steps + 1))  # one continuous curve


def test_stop_offers_after_this_step_and_now_and_now_leaves_a_resumable_run(window, qtbot, tiny_model, chat_data):
    from app.core.runs import open_run
    from app.core.events import StepMetrics

    tab = window.train_tab
    _ready(tab, qtbot, tiny_model, chat_data, epochs=6)
    assert [action.text() for action in tab.stop_button.menu().actions()] == [
        "After this step, with a checkpoint (Esc)", "Now: drop the step in progress, keep the last checkpoint"]
    qtbot.mouseClick(tab.train_button, Qt.LeftButton)
    with qtbot.waitSignal(tab.worker.event, timeout=120_000, check_params_cb=lambda e: isinstance(e, StepMetrics)):
        pass
    tab.stop_now_action.trigger()
    assert tab.worker.stop_requested.now and not tab.stop_button.isEnabled()
    qtbot.waitUntil(lambda: not tab.running, timeout=120_000)
    stopped = tab.last_run
    assert stopped.status == "stopped" and open_run(stopped.run_id).status()["status"] == "stopped"
    assert tab.resume_button.isEnabled() and tab.status.text().startswith("Stopped")
    assert "resume continues" in tab.status.text().lower()


def test_a_failing_run_shows_the_reason_with_a_log_button(window, qtbot, tiny_model, chat_data, monkeypatch):
    from app.core.train.session import QLoraSession

    def broken_step(self, batches):
        raise RuntimeError("the GPU fell off the bus")

    monkeypatch.setattr(QLoraSession, "train_step", broken_step)
    tab = window.train_tab
    _ready(tab, qtbot, tiny_model, chat_data)
    qtbot.mouseClick(tab.train_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not tab.running, timeout=120_000)
    assert tab.last_run.status == "failed"
    dialog = tab.error_dialog
    assert dialog is not None and dialog.isVisible()
    assert "the GPU fell off the bus" in dialog.text()
    assert any(button.text() == "Open log" for button in dialog.buttons())
    assert tab.train_button.isEnabled() and tab.resume_button.isEnabled()
    dialog.close()


def test_a_kernel_replaced_by_the_self_test_stays_in_view(window, qtbot, tiny_model, chat_data, monkeypatch):
    from app.core.train.memory_savers import packed_attention
    from tests.core.test_selftest import raising_once

    monkeypatch.setattr(packed_attention, "packed_loop", raising_once(packed_attention.packed_loop))
    tab = window.train_tab
    _ready(tab, qtbot, tiny_model, chat_data)
    assert tab.plan_view.plan.attention == "tunesmith_packed_loop"
    qtbot.mouseClick(tab.train_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not tab.running, timeout=120_000)
    assert tab.last_run.status == "finished"
    assert tab.notice.isVisible()  # still shown after the run's last status line
    assert "SDPA per example failed" in tab.notice.text()
    assert "using SDPA with a block-diagonal mask" in tab.notice.text()
    reason = tab.plan_view.reasons["attention"].text()  # the panel shows the run's plan, the change marked
    assert tab.plan_view.plan.attention != "tunesmith_packed_loop"
    assert "⚠ changed by the run: Start-up self-test:" in reason and "SDPA per example failed" in reason


def test_a_card_preset_without_a_card_shows_the_cpu_plan_that_runs_before_step_one(window, qtbot, tiny_model,
                                                                                    chat_data):
    from app.core import host
    from app.core.runs import open_run
    from app.core import events as ev

    if host.local_device() == "cuda":
        pytest.skip("needs a machine without an NVIDIA card")
    tab = window.train_tab
    tab.preset_box.setCurrentIndex(tab.preset_box.findData("8gb"))
    _ready(tab, qtbot, tiny_model, chat_data)
    qtbot.waitUntil(lambda: tab.plan_view.plan.preset == "8gb", timeout=60_000)
    preview = tab.plan_view.plan
    assert (preview.device, preview.compute_dtype, preview.optimizer) == ("cuda", "bfloat16", "paged_adamw_8bit")
    assert tab.plan_view.device.text() == ("Planned for a card with 8 GiB (the 8gb preset); this machine has no "
                                           "NVIDIA card: Train will plan for this CPU")
    seen = {}
    on_event = tab._on_event

    class Watch(QObject):  # a slot of a window-thread QObject, so Qt queues each event to that thread
        @Slot(object)   # (a plain function as the slot ran in the training thread: a segfault in Qt)
        def forward(self, event):  # what the panel shows when the first step arrives, before drawing it
            if isinstance(event, ev.StepMetrics) and not seen:
                seen.update(plan=tab.plan_view.plan, device=tab.plan_view.device.text(),
                            peak=tab.plan_view.peak.text(), optimizer=tab.plan_view.reasons["optimizer"].text(),
                            locked=not tab.plan_view.inputs["rank"].isEnabled())
            on_event(event)

    watch = Watch()
    tab._on_event = watch.forward
    qtbot.mouseClick(tab.train_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not tab.running, timeout=300_000)
    assert tab.last_run.status == "finished", tab.last_run.reason
    run_plan = open_run(tab.last_run.run_dir).plan()
    assert seen["plan"] == run_plan and seen["locked"]
    assert (run_plan.device, run_plan.compute_dtype, run_plan.optimizer) == ("cpu", "float32", "adamw_torch")
    assert seen["device"].startswith(f"Run {tab.last_run.run_id} trains with this plan, planned for this CPU: ")
    assert "of RAM available; the 8gb preset is for NVIDIA cards" in seen["device"]
    assert seen["optimizer"].startswith("AdamW (torch): the paged 8-bit optimizer needs CUDA")
    assert seen["peak"].startswith(f"predicted peak {run_plan.predicted_peak_bytes / 2**30:.2f} GiB of "
                                   f"{run_plan.budget_bytes / 2**30:.2f} GiB")
    assert tab.plan_view.plan == run_plan and tab.plan_view.inputs["rank"].isEnabled()  # after: still the run's


def test_epochs_take_any_fraction_max_steps_decides_and_a_bad_entry_is_shown_not_replaced(window, qtbot,
                                                                                           tiny_model, chat_data):
    tab = window.train_tab
    _ready(tab, qtbot, tiny_model, chat_data)
    epochs = tab.plan_view.inputs["epochs"]
    epochs.setText("0.05")
    qtbot.waitUntil(lambda: tab.plan_view.plan is not None and tab.plan_view.plan.total_steps == 1, timeout=30_000)
    assert epochs.text() == "0.05" and "<b>1 step</b> 0.05 epoch(s) of " in tab.plan_view.reasons["epochs"].text()
    epochs.setText("0,5x")
    qtbot.waitUntil(lambda: tab.plan_view.plan is None, timeout=30_000)
    assert epochs.text() == "0,5x" and "c0392b" in epochs.styleSheet()  # kept as typed, in red
    assert "Epochs: “0,5x” is not a number above 0" in tab.plan_view.error.text()
    assert not tab.train_button.isEnabled()
    epochs.setText("2")
    tab.plan_view.inputs["max_steps"].setValue(3)  # either decides: max steps, when set
    qtbot.waitUntil(lambda: tab.plan_view.plan is not None and tab.plan_view.plan.total_steps == 3, timeout=30_000)
    assert "set by you (max steps)" in tab.plan_view.reasons["epochs"].text() and epochs.styleSheet() == ""
    # and how long: nothing trained like it here yet, so the first steps will tell
    assert "measured from the first steps" in tab.plan_view.reasons["epochs"].text()
    if tab.plan_view.plan.device == "cpu":  # the CPU threads, and why that many
        threads = tab.plan_view.reasons["threads"].text()
        assert f"<b>{tab.plan_view.plan.threads}</b>" in threads and "core" in threads, threads
        tab.plan_view.inputs["threads"].setValue(1)
        qtbot.waitUntil(lambda: tab.plan_view.plan is not None and tab.plan_view.plan.reasons.get("threads") ==
                        "set by you", timeout=30_000)
        assert tab.plan_view.plan.threads == 1 and tab.config().threads == 1
    tab.plan_view.inputs["lr"].setText("2e-4")  # as papers write it
    qtbot.waitUntil(lambda: tab.plan_view.plan is not None and tab.config().lr == 2e-4, timeout=30_000)
    assert tab.train_button.isEnabled()


def test_a_named_card_in_the_preset_list_plans_its_precision(window, qtbot):
    from app.core.resources import sample_dataset

    tab = window.train_tab
    tab.model_box.setCurrentText("Llama-3.1-8B-Instruct")
    tab.load_dataset(str(sample_dataset()))
    tab.preset_box.setCurrentIndex(tab.preset_box.findData("card:RTX 2080 Ti"))
    qtbot.waitUntil(lambda: tab.plan_view.plan is not None and tab.plan_view.plan.gpu == "RTX 2080 Ti",
                    timeout=60_000)
    assert tab.plan_view.plan.compute_dtype == "float16"
    assert tab.plan_view.reasons["compute_dtype"].text().startswith("fp16 with a gradient scaler")
    assert "compute capability 8.0+" in tab.plan_view.reasons["attention"].text()
    assert "of 10.00 GiB usable" in tab.plan_view.peak.text()
    assert "<b>4-bit</b> 4-bit NF4 (QLoRA): unquantised weights would" in tab.plan_view.reasons["quantize"].text()
    tab.plan_view.inputs["quantize"].setCurrentIndex(tab.plan_view.inputs["quantize"].findData("none"))
    # an 8B model unquantised is 16 GB: no plan, and the message says how to get one back
    qtbot.waitUntil(lambda: tab.plan_view.plan is None and tab.plan_view.error.isVisible(), timeout=60_000)
    assert "the model alone needs 15.65 GiB" in tab.plan_view.error.text()
    assert "keep the base in 4 bits" in tab.plan_view.error.text()
    tab.model_box.setCurrentText("Qwen2.5-0.5B-Instruct")
    qtbot.waitUntil(lambda: tab.plan_view.plan is not None and tab.plan_view.plan.quantize == "none", timeout=60_000)
    assert "unquantised (fp16): set by you" in tab.plan_view.reasons["quantize"].text()
    assert tab.plan_view.error.isHidden()


def test_resuming_a_run_started_with_remote_code_asks_first(window, qtbot, tiny_model, chat_data, monkeypatch):
    """QMessageBox.question is answered by the test (a modal dialog cannot be clicked offscreen)."""
    import json

    from PySide6.QtWidgets import QMessageBox

    from app.core.runs import open_run
    from conftest import train_tiny

    run = open_run(train_tiny(tiny_model, chat_data, steps=4, stop_at=2).run_id)
    config = json.loads((run.dir / "config.json").read_text())
    (run.dir / "config.json").write_text(json.dumps(config | {"trust_remote_code": True}))
    extra = tiny_model / "modeling_extra.py"  # the session's tiny model: removed again below
    extra.write_text("# code a model folder might carry\n")
    try:
        asked = []
        monkeypatch.setattr(QMessageBox, "question",
                            lambda parent, title, text, *args: asked.append(text) or QMessageBox.Cancel)
        tab = window.train_tab
        tab.set_engine_ready()
        tab.resume_run(run.id)
        assert not tab.running and open_run(run.id).status()["status"] == "stopped"  # declined: nothing ran
        assert "the model's own Python code" in asked[0] and "modeling_extra.py" in asked[0] and run.id in asked[0]
        monkeypatch.setattr(QMessageBox, "question", lambda *args: QMessageBox.Yes)
        tab.resume_run(run.id)
        assert tab.running
        qtbot.waitUntil(lambda: not tab.running, timeout=300_000)
        assert tab.last_run.status == "finished" and tab.last_run.step == 4
    finally:
        extra.unlink()


def test_the_gpu_count_shows_only_with_several_cards_and_reaches_the_plan(window, qtbot):
    """No GPU here: the picker is built as it is for a machine with two cards (what NVML would
    report), and the tab's own picker (no cards here) is given the same range."""
    from app.gui.widgets.pickers import BudgetPicker

    two, none = BudgetPicker(cards=2), BudgetPicker(cards=0)
    qtbot.addWidget(two)
    qtbot.addWidget(none)
    two.show()
    none.show()
    assert two.gpu_count.isVisibleTo(two) and two.gpu_count.maximum() == 2 and two.gpus() == 1
    assert not none.gpu_count.isVisibleTo(none) and none.gpus() == 1
    tab = window.train_tab
    tab.model_box.setCurrentText("Llama-3.1-8B-Instruct")
    tab.preset_box.setCurrentIndex(tab.preset_box.findData("24gb"))
    tab.budget.gpu_count.setRange(1, 2)
    tab.budget.gpu_count.setValue(2)
    assert tab.config().gpus == 2
    qtbot.waitUntil(lambda: tab.plan_view.plan is not None and tab.plan_view.plan.gpus == 2, timeout=60_000)
    assert tab.plan_view.plan.reasons["gpus"].startswith("DDP over 2 GPUs")


def test_the_status_shows_each_processs_memory_during_a_run_on_several(window):
    """The step's memory by process, as a run on two processes reports it (StepMetrics.memory)."""
    from app.core.events import StepMetrics

    tab = window.train_tab
    tab._on_event(StepMetrics(3, 10, 0.3, 2.5, 1e-4, 0.2, 512, 160.0, 9.0, 21.0, (2 * 2**30, 3 * 2**30)))
    assert tab.status.text().endswith("· peak 2.0/3.0 GiB")
    tab._on_event(StepMetrics(4, 10, 0.4, 2.4, 1e-4, 0.2, 512, 160.0, 9.0, 21.0))  # an older run's line
    assert "memory" not in tab.status.text() and "step 4/10" in tab.status.text()


def test_a_damaged_checkpoint_skipped_on_resume_stays_in_view(window):
    from app.core.events import LogLine

    tab = window.train_tab
    tab._on_event(LogLine("Checkpoint step-0000004 is damaged (optimizer.pt does not match its checksum); "
                          "using the one before", "warning"))
    tab._on_event(LogLine("Resuming from step-0000002"))  # the next line replaces the status, not the notice
    assert tab.notice.isVisible() and "⚠ Checkpoint step-0000004 is damaged" in tab.notice.text()
    assert tab.status.text() == "Resuming from step-0000002"


def test_choosing_another_model_measures_the_dataset_again_with_its_tokenizer(window, qtbot, tiny_model,
                                                                              demo_model_path, chat_data):
    """Token lengths belong to a tokenizer: the report and the plan follow the model chosen."""
    tab = window.train_tab
    tab.model_box.setCurrentText(str(tiny_model))
    tab.load_dataset(str(chat_data))
    qtbot.waitUntil(lambda: tab.summary is not None, timeout=60_000)
    tiny = (tab.summary.tokenizer_of, tab.summary.stats.total)
    tab.model_box.setCurrentText(str(demo_model_path))  # as typed or picked: chosen once its facts are read
    qtbot.waitUntil(lambda: tab.summary is not None and tab.summary.tokenizer_of != tiny[0], timeout=60_000)
    assert tab.summary.stats.total != tiny[1]  # measured again, not relabelled
    assert f"tokenizer of {tab.summary.tokenizer_of}" in tab.report.summary.text()
