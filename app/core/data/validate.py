"""Validate every row of a dataset file and collect all problems with file:line and field.

`check_file` never stops at the first bad row: the report lists every problem, so the user can
fix the file in one go before a GPU minute is spent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from app.core.data.formats import FORMAT_LABELS, Example, RowError, detect_format, normalise
from app.core.data.read import Problem, Row, read_rows
from app.core.errors import DatasetError


@dataclass
class DataReport:
    """What a dataset file holds: its format, the usable examples and every problem."""

    file: str
    format: str | None = None
    rows: int = 0
    examples: list[Example] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def format_label(self) -> str:
        return FORMAT_LABELS.get(self.format or "", "unknown")

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.examples)

    def raise_if_unusable(self, skip_bad: bool) -> None:
        """Raise a one-line DatasetError unless the file can be trained on as asked."""
        if not self.examples:
            first = f" (first: {self.problems[0]})" if self.problems else ""
            raise DatasetError(f"no usable rows{first}; run `tunesmith check-data {self.file}` for the list",
                               file=self.file)
        if self.problems and not skip_bad:
            more = len(self.problems) - 1
            tail = f" (and {more} more problem{'s' * (more != 1)})" if more else ""
            raise DatasetError(f"{self.problems[0]}{tail}; fix the file, see all with "
                               f"`tunesmith check-data {self.file}`, or pass --skip-bad")


PROGRESS_EVERY_S = 0.5  # check_file's progress on a long file


def check_file(path: str | Path, progress: Callable[[str], None] | None = None) -> DataReport:
    """Read and validate every row of `path`; `progress` hears "Reading NAME: 120,000 lines" about
    twice a second on a long file. Raises DatasetError only for whole-file problems."""
    name = str(path)
    report = DataReport(file=name)
    first_line = None
    said = time.monotonic()
    for item in read_rows(path):
        report.rows += 1
        if progress is not None and report.rows % 1000 == 0 and time.monotonic() - said >= PROGRESS_EVERY_S:
            progress(f"Reading {Path(name).name}: {report.rows:,} lines")
            said = time.monotonic()
        if isinstance(item, Problem):
            report.problems.append(item)
            continue
        assert isinstance(item, Row)
        try:
            fmt = detect_format(item.record)
            if report.format is None:
                report.format, first_line = fmt, item.line
            elif fmt != report.format:
                raise RowError("", f"looks like {FORMAT_LABELS[fmt]}, but this file is "
                                   f"{FORMAT_LABELS[report.format]} (from line {first_line}); "
                                   "use one format per file")
            report.examples.append(normalise(item.record, fmt, item.line))
        except RowError as err:
            report.problems.append(Problem(name, item.line, err.field, str(err)))
    if report.rows == 0:
        raise DatasetError("the file has no rows; add one example per line", file=name)
    return report
