"""Start the desktop app: `tunesmith`, `tunesmith gui`, or the `tunesmith-gui` launcher."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

_IMPORTED_AT = time.monotonic()


def process_age_ms() -> float:
    """Milliseconds since this process started (Linux: from /proc; elsewhere since this import)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start = int(Path("/proc/self/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[19]) / ticks
        uptime = float(Path("/proc/uptime").read_text(encoding="utf-8").split()[0])
        return (uptime - start) * 1000
    except (OSError, ValueError, IndexError, AttributeError):
        return (time.monotonic() - _IMPORTED_AT) * 1000


def run_gui(smoke: bool = False) -> int:
    """Open the main window. `smoke`: exit once it is shown and print the ms from process start.
    Exit 2, with one line that says what to install, when the window cannot open here."""
    from app.gui import preflight  # Qt-free; the modules below import Qt, so they load after its check

    if preflight.check():
        return 2
    from PySide6.QtCore import QSettings, QTimer
    from PySide6.QtWidgets import QApplication

    # here, not at the top: Qt loads only once the preflight check knows its libraries are there
    from app.gui.icons import app_icon
    from app.gui.main_window import MainWindow
    from app.gui.theme import apply_theme

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("Tunesmith")
    app.setOrganizationName("Tunesmith")
    app.setDesktopFileName("tunesmith")  # Wayland/X11 match the window to tunesmith.desktop and its icon
    app.setWindowIcon(app_icon())
    settings = None if smoke else QSettings()
    apply_theme(app, settings.value("theme", "system") if settings is not None else "system")
    window = MainWindow(settings, load_engine=not smoke)
    window.show()
    if smoke:
        def report() -> None:
            print(f"{process_age_ms():.0f}", flush=True)  # the last line: ms from start to shown
            window.close()
            app.quit()

        QTimer.singleShot(0, report)
    return app.exec()


def main() -> int:
    """The `tunesmith-gui` entry point (a gui-script: no console window on Windows)."""
    return run_gui("--smoke" in sys.argv[1:])
