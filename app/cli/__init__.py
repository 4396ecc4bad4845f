"""The command line: `tunesmith train|resume|plan|runs|check-data|demo` (training.py),
`models|gpu` (machine.py), `chat` (chat.py), `eval` (evaluate.py) and `export` (export.py). `gui` is listed for --help;
app.launch starts the window (for `tunesmith` alone and `tunesmith gui`) before this parser runs.

A thin face over app.core. User errors print one line on stderr and exit 2 (`--debug` shows the
traceback); a failed run exits 1; Ctrl-C during training stops cleanly with a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from app import __version__
from app.cli import chat, evaluate, export, machine, training
from app.cli.output import EXIT_USER_ERROR
from app.core.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None) or args.command == "gui":
        print("tunesmith: the desktop app starts from `tunesmith` or `tunesmith gui` (app.launch), not "
              "from the command line's main()", file=sys.stderr)
        return EXIT_USER_ERROR
    _quiet_libraries(args.debug)
    try:
        return args.func(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"tunesmith: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\ntunesmith: aborted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tunesmith plan | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune an open LLM with QLoRA.")
    parser.add_argument("--version", action="version", version=f"tunesmith {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    training.add_commands(sub)
    gui = sub.add_parser("gui", help="open the desktop app (also what plain `tunesmith` does)")
    gui.add_argument("--smoke", action="store_true",
                     help="open the window, print the ms from start to shown, and exit")
    machine.add_commands(sub)
    chat.add_commands(sub)
    evaluate.add_commands(sub)
    export.add_commands(sub)
    return parser


def _quiet_libraries(debug: bool) -> None:
    if debug:
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    for name in ("transformers", "peft", "bitsandbytes", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
