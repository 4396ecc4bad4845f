"""How the command line prints: progress notes on stderr, tables, and the small formats tables use."""

from __future__ import annotations

import sys

from app.core.units import gib

EXIT_USER_ERROR = 2  # bad input: one line on stderr, never a traceback


def info(message: str) -> None:
    """A progress note: on stderr, so stdout stays the command's answer."""
    print(message, file=sys.stderr)


def print_table(rows: list[tuple]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())


def gib_or_unknown(value) -> str:
    return gib(value) if isinstance(value, int) else "?"


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def maybe(value, unit: str) -> str:
    return f"{value}{unit}" if value is not None else "not reported"


def num(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def short(text: str, width: int = 28) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]
