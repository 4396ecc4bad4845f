"""Take the README's screenshots: start the app under Xvfb as a new user would, check a broken file,
load the sample dataset, train the demo model a few steps, chat with a past run and export it as
GGUF, and save a PNG of each tab (and of a run's before/after report) into docs/.

    python docs/make_screenshots.py [--steps 10] [--theme light|dark] [--out docs]

Without a display it runs itself again under `xvfb-run` (Debian: `apt install xvfb`); with none
available it falls back to Qt's offscreen platform. Runs go to a throwaway TUNESMITH_HOME that
shares your model cache, so the demo model is converted once. Two short past runs (learning rates
2e-4 and 5e-4) are trained first so the Runs tab has something to compare.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = (1480, 940)
BROKEN_LINES = {3: "{not json", 7: '{"messages": [{"role": "user", "content": "Where is the galley?"}]}',
                12: '{"messages": [{"role": "captain", "content": "Hoist the sails"}, '
                    '{"role": "assistant", "content": "Aye"}]}'}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24, help="demo steps to train in the window")
    parser.add_argument("--past-steps", type=int, default=30, help="steps of each of the two past runs")
    parser.add_argument("--theme", choices=("light", "dark"), default="light")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    again = rerun_on_a_display(SIZE)
    return again if again is not None else take_screenshots(args)


def rerun_on_a_display(size: tuple[int, int]) -> int | None:
    """Without a display, this script again under `xvfb-run` (its exit status), else None after
    choosing Qt's offscreen platform where there is no xvfb-run either."""
    if os.environ.get("DISPLAY") or os.environ.get("QT_QPA_PLATFORM"):
        return None
    if shutil.which("xvfb-run"):
        return subprocess.call(["xvfb-run", "-a", "-s", f"-screen 0 {size[0] + 200}x{size[1] + 200}x24",
                                sys.executable, *sys.argv])
    print("no display and no xvfb-run: using Qt's offscreen platform", file=sys.stderr)
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    return None


def throwaway_home(prefix: str) -> Path:
    """A new TUNESMITH_HOME for this process that shares the user's model cache."""
    from app.core.paths import cache_dir

    home = Path(tempfile.mkdtemp(prefix=prefix))
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    (home / "cache").symlink_to(cache, target_is_directory=True)
    os.environ["TUNESMITH_HOME"] = str(home)
    return home


def take_screenshots(args) -> int:
    home = throwaway_home("tunesmith-shots-")
    past_runs(args.past_steps)

    from PySide6.QtCore import QSettings, Qt
    from PySide6.QtWidgets import QApplication

    from app.core.demo import demo_config
    from app.core.resources import sample_dataset
    from app.gui.icons import app_icon
    from app.gui.main_window import MainWindow
    from app.gui.theme import apply_theme

    app = QApplication(sys.argv[:1])
    app.setApplicationName("Tunesmith")
    app.setWindowIcon(app_icon())
    apply_theme(app, args.theme)
    QSettings.setDefaultFormat(QSettings.IniFormat)
    QSettings.setPath(QSettings.IniFormat, QSettings.UserScope, str(home / "settings"))
    window = MainWindow(QSettings(), load_engine=True)
    window.resize(*SIZE)
    window.show()
    tab = window.train_tab
    wait(lambda: tab.engine_ready, 120, "the engine to load")
    args.out.mkdir(parents=True, exist_ok=True)

    broken = home / "chats-with-mistakes.jsonl"
    lines = sample_dataset().read_text(encoding="utf-8").splitlines()[:40]
    for number, text in BROKEN_LINES.items():
        lines[number - 1] = text
    broken.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tab.load_dataset(str(broken))
    wait(lambda: tab.report.problems.count() == len(BROKEN_LINES), 120, "the broken file's report")
    tab.report.problems.setCurrentRow(0)
    settle(1.0)
    save(window, args.out / "train-problems.png")

    tab.load_dataset(str(sample_dataset()))
    wait(lambda: tab.train_button.isEnabled(), 120, "the sample data's plan")
    demo = demo_config()  # the demo's small steps (4 chats each), so a CPU shows a curve in a minute
    for name in ("rank", "seq_len", "micro_batch", "grad_accum", "epochs", "lr"):
        tab.plan_view.inputs[name].setValue(getattr(demo, name))
    settle(0.6)
    wait(lambda: tab.train_button.isEnabled(), 60, "the plan")
    tab.start_training()
    wait(lambda: tab.graphs.loss.point_count >= args.steps, 60 * args.steps, f"{args.steps} training steps")
    settle(1.5)
    save(window, args.out / "train.png")
    tab.stop_training()
    wait(lambda: not tab.running, 300, "the run to stop")

    window.tabs.setCurrentWidget(window.runs_tab)
    runs = window.runs_tab
    runs.select(*[row.id for row in runs.rows])
    settle(1.0)
    save(window, args.out / "runs.png")
    runs.select(next(row.id for row in runs.rows if row.status == "finished"))
    runs.views.setCurrentWidget(runs.report)
    settle(1.0)
    save(window, args.out / "report.png")
    runs.views.setCurrentIndex(0)

    window.tabs.setCurrentWidget(window.chat_tab)
    chat = window.chat_tab
    chat.source_box.setCurrentIndex(chat.source_box.findText("demo-lr-0.0005", Qt.MatchContains))
    chat.load()
    wait(lambda: chat.session is not None, 300, "the chat model to load")
    chat.temperature.setValue(0)
    chat.max_tokens.setValue(70)
    chat.compare.setChecked(True)
    chat.message.setText("How do I make garlic bread?")
    chat.send()
    wait(lambda: not chat.answering, 600, "the answers")
    settle(0.5)
    save(window, args.out / "chat.png")

    window.tabs.setCurrentWidget(window.export_tab)
    export = window.export_tab
    export.run_box.setCurrentIndex(export.run_box.findText("demo-lr-0.0005", Qt.MatchContains))
    export.format_box.setCurrentIndex(export.format_box.findData("gguf"))
    # Ollama's usual 4-bit type where llama.cpp's quantizer is installed, else the 8-bit one we write
    index = export.quant_box.findData("q4_k_m")
    if not export.quant_box.model().item(index).isEnabled():
        index = export.quant_box.findData("q8_0")
    export.quant_box.setCurrentIndex(index)
    export.out_edit.setText(str(home / "exports" / "pirate-chef-gguf"))
    export.export()
    wait(lambda: not export.exporting, 900, "the export")
    settle(0.5)
    save(window, args.out / "export.png")
    window.close()
    shutil.rmtree(home, ignore_errors=True)
    return 0


def past_runs(steps: int) -> None:
    """Two short demo runs with different learning rates, as earlier sessions would have left."""
    from dataclasses import replace

    from app.core.demo import demo_config
    from app.core.train.trainer import run_training

    for lr in (2e-4, 5e-4):
        config = replace(demo_config(), lr=lr, max_steps=steps, name=f"demo-lr-{lr:g}")
        result = run_training(config)
        print(f"past run {result.run_id}: {result.status}, loss {result.final_loss}", flush=True)


def wait(condition, timeout_s: float, what: str) -> None:
    from PySide6.QtWidgets import QApplication

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"make_screenshots: timed out waiting for {what}")
        QApplication.processEvents()
        time.sleep(0.02)


def settle(seconds: float) -> None:
    """Let timers fire (graph redraws, memory samples) before a picture."""
    wait(lambda deadline=time.monotonic() + seconds: time.monotonic() > deadline, seconds + 1, "a pause")


def save(window, path: Path) -> None:
    if not window.grab().save(str(path)):
        raise SystemExit(f"make_screenshots: could not write {path}")
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
