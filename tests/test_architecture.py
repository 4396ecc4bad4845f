"""The house rule: the engine never imports Qt, statically or at run time."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import REPO


def test_import_linter_contract_holds():
    lint = shutil.which("lint-imports")
    assert lint, "import-linter is a dev dependency; install with .[dev]"
    proc = subprocess.run([lint], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "KEPT" in proc.stdout


def test_importing_the_trainer_loads_no_qt():
    code = ("import sys, app.core.train.trainer, app.core.chat, app.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('PySide6', 'pyqtgraph', 'shiboken6')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
