"""A walk-through that checks itself: drive the real window as a new user would, save a picture of
every step into docs/walkthrough/, and assert what each step must show.

    python docs/walkthrough.py [--steps 6] [--out docs/walkthrough]

The steps: the first window; a dataset with mistakes; the sample dataset and its plan (for an 8 GB
card this machine may lack, then for this machine); Train a few steps of the demo model; Stop now;
Resume to the end; the Runs tab comparing this run with an earlier one; Chat comparing the tuned
and the base model; Export as GGUF and as a merged model; the window at 1000 x 700; the dark theme.
At every step no label, button or tab of the window may show a command-line flag or a pip command
(app/gui/words.py), and each step's own checks must hold: the plan's device line, the run's own
plan in the panel, the predicted peak drawn on the memory graph, the newest run selected in Chat
and Export, the commands to run an export. A failed check ends the walk-through with exit 1 and the
step's picture saved. Without a display it runs itself again under `xvfb-run` (Debian: `apt
install xvfb`), else Qt's offscreen platform. Runs go to a throwaway TUNESMITH_HOME that shares
your model cache.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "docs"))

from make_screenshots import BROKEN_LINES, rerun_on_a_display, settle, throwaway_home, wait  # noqa: E402

SIZE = (1480, 940)
SMALL = (1000, 700)


class Walk:
    """The steps so far: each a picture and the checks that held."""

    def __init__(self, window, out: Path):
        self.window, self.out, self.number, self.failures = window, out, 0, []

    def step(self, name: str, checks: list[tuple[bool, str]]) -> None:
        self.number += 1
        path = self.out / f"{self.number:02d}-{name}.png"
        if not self.window.grab().save(str(path)):
            raise SystemExit(f"walkthrough: could not write {path}")
        words = command_line_words_shown(self.window)
        checks = checks + [(not words, f"no command-line words in the window (found: {words[:3]})")]
        failed = [what for ok, what in checks if not ok]
        mark = "FAILED: " + "; ".join(failed) if failed else "ok"
        print(f"{self.number:02d} {name}: {mark} ({path.name})", flush=True)
        self.failures += [f"{name}: {what}" for what in failed]


def command_line_words_shown(window) -> list[str]:
    """Flags, pip commands and `code` in any visible label, button, check box, group or tab title
    (the Run it commands are in read-only fields, meant to be copied, so not among them)."""
    from PySide6.QtWidgets import QAbstractButton, QGroupBox, QLabel, QTabWidget

    from app.gui.words import command_line_words

    texts = []
    for widget in window.findChildren(QLabel) + window.findChildren(QAbstractButton):
        if widget.isVisible():
            texts.append(widget.text())
    texts += [box.title() for box in window.findChildren(QGroupBox) if box.isVisible()]
    for tabs in window.findChildren(QTabWidget):
        texts += [tabs.tabText(i) for i in range(tabs.count())]
    found = []
    for text in texts:
        found += command_line_words(html.unescape(re.sub(r"<[^>]+>", " ", text or "")))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="demo steps of the run trained in the window")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "walkthrough")
    args = parser.parse_args()
    again = rerun_on_a_display(SIZE)
    return again if again is not None else walk(args)


def walk(args) -> int:
    home = throwaway_home("tunesmith-walk-")
    earlier = earlier_run()

    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from app.core import host
    from app.core.demo import demo_config
    from app.core.resources import sample_dataset
    from app.core.runs import open_run
    from app.gui.icons import app_icon
    from app.gui.main_window import MainWindow
    from app.gui.theme import apply_theme

    app = QApplication(sys.argv[:1])
    app.setApplicationName("Tunesmith")
    app.setWindowIcon(app_icon())
    apply_theme(app, "light")
    QSettings.setDefaultFormat(QSettings.IniFormat)
    QSettings.setPath(QSettings.IniFormat, QSettings.UserScope, str(home / "settings"))
    window = MainWindow(QSettings(), load_engine=True)
    window.resize(*SIZE)
    window.show()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    walk = Walk(window, args.out)
    tab = window.train_tab
    wait(lambda: tab.engine_ready, 120, "the engine to load")
    settle(0.5)
    walk.step("first-window", [(window.tabs.currentWidget() is tab, "the Train tab first"),
                               (not tab.train_button.isEnabled(), "Train waits for a dataset")])

    broken = home / "chats-with-mistakes.jsonl"
    lines = sample_dataset().read_text(encoding="utf-8").splitlines()[:40]
    for number, text in BROKEN_LINES.items():
        lines[number - 1] = text
    broken.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tab.load_dataset(str(broken))
    wait(lambda: tab.report.problems.count() == len(BROKEN_LINES), 120, "the broken file's report")
    tab.report.problems.setCurrentRow(0)
    settle(0.5)
    items = [tab.report.problems.item(i).text() for i in range(tab.report.problems.count())]
    walk.step("dataset-with-mistakes", [
        ([item.split(":")[0] for item in items] == [f"line {n}" for n in sorted(BROKEN_LINES)],
         "every bad line listed with its number"),
        (not tab.train_button.isEnabled(), "no Train with bad lines")])

    tab.load_dataset(str(sample_dataset()))
    no_card = host.local_device() != "cuda"
    tab.preset_box.setCurrentIndex(tab.preset_box.findData("8gb"))
    wait(lambda: tab.plan_view.plan is not None and tab.plan_view.plan.preset == "8gb", 120, "the 8 GB plan")
    settle(0.5)
    device = tab.plan_view.device.text()
    walk.step("plan-for-an-8gb-card", [
        (device.startswith("Planned for a card with 8 GiB"), f"the device line says what it is for ({device!r})"),
        (not no_card or "Train will plan for this CPU" in device, "and that Train plans for this CPU")])

    tab.preset_box.setCurrentIndex(tab.preset_box.findData("auto"))
    demo = demo_config()  # the demo's small steps, so a CPU shows a curve in a minute
    for name in ("rank", "seq_len", "micro_batch", "grad_accum"):
        tab.plan_view.inputs[name].setValue(getattr(demo, name))
    tab.plan_view.inputs["max_steps"].setValue(args.steps)
    wait(lambda: tab.plan_view.plan is not None and tab.plan_view.plan.total_steps == args.steps
         and tab.train_button.isEnabled(), 120, "the plan for this machine")
    settle(0.5)
    plan = tab.plan_view.plan
    walk.step("plan-for-this-machine", [
        (plan.preset == "auto" and plan.total_steps == args.steps, f"{args.steps} steps planned"),
        (tab.plan_view.device.text() != "", "the device line"),
        (plan.device != "cpu" or plan.threads >= 1, "the CPU threads planned")])

    tab.start_training()
    wait(lambda: tab.graphs.loss.point_count >= 2, 900, "two training steps")
    settle(1.5)
    run_dir = tab.run_dir
    run_plan = open_run(run_dir).plan()
    walk.step("training", [
        (tab.plan_view.run_id == Path(run_dir).name, "the panel shows the run's own plan"),
        (tab.plan_view.plan == run_plan, "equal to its plan.json"),
        (not tab.plan_view.inputs["rank"].isEnabled(), "locked while it trains"),
        (tab.graphs.memory.predicted.isVisible(), "the predicted peak drawn on the memory graph")])

    asked = time.monotonic()
    tab.stop_now_action.trigger()
    wait(lambda: not tab.running, 120, "stop now")
    took = time.monotonic() - asked
    settle(0.5)
    stopped = tab.last_run
    walk.step("stopped-now", [(took < 10, f"stop now returned in {took:.1f} s"),
                              (stopped.status == "stopped", "the run is stopped"),
                              ("resume continues" in tab.status.text().lower(), "the status says where resume goes on")])

    tab.resume_button.click()
    wait(lambda: not tab.running, 300 * args.steps, "the resumed run to finish")
    settle(1.0)
    finished = tab.last_run
    walk.step("resumed-to-the-end", [(finished.status == "finished", f"finished ({finished.status})"),
                                     (finished.step == args.steps, f"at step {finished.step}")])

    window.tabs.setCurrentWidget(window.runs_tab)
    runs = window.runs_tab
    runs.refresh()
    runs.select(earlier.run_id, finished.run_id)
    runs.compare_axis.setCurrentIndex(runs.compare_axis.findData("tokens"))
    settle(1.0)
    names = [runs.table.topLevelItem(i).text(0) for i in range(runs.table.topLevelItemCount())]
    walk.step("runs-compared", [(len(set(names)) == len(names), f"every run named distinctly ({names})"),
                                (runs.curves.currentIndex() == 1, "the comparison drawn")])

    window.tabs.setCurrentWidget(window.chat_tab)
    chat = window.chat_tab
    newest_selected = chat.source_box.currentData() == finished.run_id
    chat.load()
    wait(lambda: chat.session is not None, 300, "the chat model to load")
    chat.temperature.setValue(0)
    chat.max_tokens.setValue(60)
    chat.compare.setChecked(True)
    chat.message.setText("How do I make garlic bread?")
    chat.send()
    wait(lambda: not chat.answering, 600, "the answers")
    settle(0.5)
    walk.step("chat-compared", [(newest_selected, "the run just finished is selected"),
                                (bool(chat.turns["tuned"]) and bool(chat.turns["base"]), "both sides answered")])

    window.tabs.setCurrentWidget(window.export_tab)
    export = window.export_tab
    newest_selected = export.run_box.currentData() == finished.run_id
    export.format_box.setCurrentIndex(export.format_box.findData("gguf"))
    index = export.quant_box.findData("q4_k_m")
    if not export.quant_box.model().item(index).isEnabled():
        index = export.quant_box.findData("q8_0")
    export.quant_box.setCurrentIndex(index)
    export.out_edit.setText(str(home / "exports" / "pirate-chef-gguf"))
    export.export()
    wait(lambda: not export.exporting, 900, "the GGUF export")
    settle(0.5)
    walk.step("export-gguf", [(newest_selected, "the run just finished is selected"),
                              (export.result is not None and export.result.format == "gguf", "exported"),
                              ("(this model: " in export.quant_box.currentText(), "sizes of this model"),
                              ([what for what, _ in export.commands] == ["Ollama", "llama.cpp", "LM Studio"],
                               "the commands to run it")])
    export.format_box.setCurrentIndex(export.format_box.findData("merged"))
    export.out_edit.setText(str(home / "exports" / "pirate-chef-merged"))
    export.export()
    wait(lambda: not export.exporting, 900, "the merged export")
    settle(0.5)
    walk.step("export-merged", [(export.result is not None and export.result.format == "merged", "exported"),
                                ("the same next token at" in export.summary.text(), "checked against base + adapter"),
                                ([what for what, _ in export.commands] == ["transformers"], "the command to run it")])

    window.tabs.setCurrentWidget(tab)
    window.resize(*SMALL)
    settle(1.0)
    walk.step("small-window", [((window.width(), window.height()) == SMALL,
                                f"the window fits {SMALL[0]} x {SMALL[1]} (is {window.width()} x {window.height()})")])

    window.resize(*SIZE)
    apply_theme(app, "dark")
    settle(1.0)
    walk.step("dark-theme", [(app.palette().window().color().lightness() < 100, "a dark palette")])

    window.close()
    shutil.rmtree(home, ignore_errors=True)
    if walk.failures:
        print("walkthrough: " + str(len(walk.failures)) + " checks failed:\n  " + "\n  ".join(walk.failures),
              file=sys.stderr)
        return 1
    print(f"walkthrough: every check held; {walk.number} pictures in {args.out}")
    return 0


def earlier_run():
    """A short demo run, as an earlier session would have left, for the Runs tab to compare."""
    from app.core.demo import demo_config
    from app.core.train.trainer import run_training

    result = run_training(replace(demo_config(), max_steps=4, lr=5e-4))
    print(f"earlier run {result.run_id}: {result.status}", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
