"""The probe and multiple-choice files' reader: one JSON object a line, every bad line found, the
first said in one DatasetError naming its line (and how many more there are)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, TypeVar

from app.core.errors import DatasetError

T = TypeVar("T")


def read_objects(path: str | Path, parse: Callable[[object, int], T], missing: str, unreadable: str,
                 empty: str) -> list[T]:
    """`parse(record, line)` of every non-blank line of `path` (ValueError: a bad line). `missing`,
    `unreadable` (with "{err}") and `empty` are what to say of a file that is not there, cannot be
    read, or holds nothing."""
    path = Path(path).expanduser()
    name = str(path)
    if not path.is_file():
        raise DatasetError(missing, file=name)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(unreadable.format(err=err), file=name) from None
    items, problems = [], []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            items.append(parse(json.loads(text), number))
        except json.JSONDecodeError as err:
            problems.append((number, f"not valid JSON ({err.msg} at column {err.colno})"))
        except ValueError as err:
            problems.append((number, str(err)))
    if problems:
        line, message = problems[0]
        more = f" (and {len(problems) - 1} more bad line{'s' * (len(problems) > 2)})" if len(problems) > 1 else ""
        raise DatasetError(message + more, file=name, line=line)
    if not items:
        raise DatasetError(empty, file=name)
    return items
