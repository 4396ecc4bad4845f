"""`tunesmith`: the desktop app when no command is given (or `gui`), else the command line.

The one place that knows both faces: the command line never imports Qt and the window never
imports the command line (the layers contract in pyproject.toml), so the choice is made here,
with the command line's own parser (which lists `gui` and its --smoke for --help).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    import sys

    from app.core.portable import console_safe

    console_safe(sys.stdout, sys.stderr)  # a cp1252 console prints `?` for what it lacks, never a traceback
    from app.cli import build_parser
    from app.cli import main as cli_main

    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) in (None, "gui"):
        from app.gui.application import run_gui

        return run_gui(smoke=getattr(args, "smoke", False))
    return cli_main(argv)
