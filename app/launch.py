"""`tunesmith`: the desktop app when no command is given (or `gui`), else the command line.

The one place that knows both faces: the command line never imports Qt and the window never
imports the command line (the layers contract in pyproject.toml), so the choice is made here,
with the command line's own parser (which lists `gui` and its --smoke for --help).
"""

from __future__ import annotations

import sys

from app.cli import build_parser, main as cli_main
from app.core.portable import console_safe


def main(argv: list[str] | None = None) -> int:
    console_safe(sys.stdout, sys.stderr)  # a cp1252 console prints `?` for what it lacks, never a traceback
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) in (None, "gui"):
        from app.gui.application import run_gui  # here: the CLI never loads the window's modules

        return run_gui(smoke=getattr(args, "smoke", False))
    return cli_main(argv)
