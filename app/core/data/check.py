"""One check of a dataset file for every face: `tunesmith check-data`, the Train tab's report,
`plan --data` and training itself call `check_dataset`.

It reads and validates every row (`validate.check_file`: every bad line, with where and why),
measures each usable row's token length with the model's tokenizer (the demo model's for a
catalogued model that is not downloaded), and can preview one example with the tokens the model
learns from marked. Lengths come from the `tokenizers` fast path when it can read the model's
folder (`fast_lengths`); otherwise, or when the caller asks for the tokenised examples (training),
from the real tokenizer, whose template failures become problems on their lines. The tokenizer is
loaded at most once. A model folder that needs its own code is refused here unless allowed, as
everywhere else. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from app.core.data.fast_lengths import fast_lengths
from app.core.data.holdout import exact_duplicates
from app.core.data.read import Problem
from app.core.data.stats import LengthStats, count_over, length_stats
from app.core.data.tokenize import IGNORE, TemplateError, TokenizedSet, ensure_chat_template, tokenize_examples, tokenize_one
from app.core.data.validate import DataReport, check_file
from app.core.errors import DatasetError
from app.core.models import demo_model
from app.core.models.resolve import model_facts, resolve_model

PREVIEW_ROWS = 20  # the first row among these that renders is previewed


@dataclass
class DatasetSummary:
    """What a dataset check found."""

    report: DataReport
    lengths: list[int] = field(default_factory=list)  # token length of each usable row, untruncated
    stats: LengthStats | None = None
    tokenizer_problems: list[Problem] = field(default_factory=list)  # rows the chat template rejects
    preview: list[tuple[str, bool]] = field(default_factory=list)  # (token text, trained on)
    preview_line: int | None = None
    preview_split: int = 0  # a preference pair's preview: the index of its rejected side's first token
    tokenizer_of: str = ""  # the model whose tokenizer measured the lengths
    over_seq_len: int = 0  # rows longer than the seq_len asked about
    tokenized: TokenizedSet | None = None  # ids and labels, when the caller asked for them

    @property
    def problems(self) -> list[Problem]:
        return sorted(self.report.problems + self.tokenizer_problems, key=lambda p: p.line or 0)

    @property
    def duplicates(self) -> list[tuple[int, int]]:
        """(line, line of its first copy) of every example repeated exactly (each trains twice)."""
        return exact_duplicates(self.report.examples)

    def lines_over(self, seq_len: int) -> list[int]:
        """The lines of the rows longer than `seq_len` tokens (training cuts them to fit)."""
        if len(self.lengths) != len(self.report.examples):  # a row the template rejected: no line for each length
            return []
        return [example.line for example, n in zip(self.report.examples, self.lengths) if n > seq_len]

    @property
    def usable_rows(self) -> int:
        return len(self.report.examples) - len({p.line for p in self.tokenizer_problems})

    @property
    def bad_lines(self) -> int:
        return len({(p.line, p.file) for p in self.report.problems + self.tokenizer_problems})


MODES = ("report", "preview", "rows", "plan", "train")


@dataclass(frozen=True)
class DataCheck:
    """What a dataset check is asked about."""

    path: str
    model: str = "demo"  # whose tokenizer measures the rows
    seq_len: int | None = None  # count the rows longer than this
    skip_bad: bool = False  # the strict modes: bad rows are left out instead of refused
    trust_remote_code: bool = False
    allow_pickle: bool = False


def _quiet(message: str) -> None:
    return None


def check_dataset(check: DataCheck, mode: str = "report", *, tokenizer=None, report: DataReport | None = None,
                  progress: Callable[[str], None] = _quiet, doing: Callable[[str], None] = _quiet) -> DatasetSummary:
    """The one check of a dataset file, in the mode its caller needs:

    - "report": every bad line listed, the rows measured (`tunesmith check-data`);
    - "preview": the same, and one example rendered with the tokens it trains on marked (the Train tab);
    - "rows": the file read and validated only, refused (DatasetError) unless it can be trained on
      as asked: training's first, cheap check, before the model loads;
    - "plan": refused the same way, then measured (`tunesmith plan --data`);
    - "train": refused the same way (or the `report` of its "rows" check), then tokenised with the
      `tokenizer` training uses, and refused for rows its chat template rejects, unless skip_bad.

    `progress` hears what a download or conversion of the model says; `doing` where the check is
    (lines read, the tokenizer loading: the window's). Whole-file problems (missing, empty,
    unreadable) raise DatasetError in every mode, a model that cannot be used ModelError."""
    if mode not in MODES:
        raise ValueError(f"check_dataset mode {mode!r}: one of {', '.join(MODES)}")
    report = report if report is not None else check_file(check.path, doing)
    if mode in ("rows", "plan", "train"):
        report.raise_if_unusable(check.skip_bad)
    summary = DatasetSummary(report)
    if mode == "rows" or not report.examples:
        return summary
    if mode == "train":
        _tokenize_into(summary, tokenizer, doing)
        _refuse_untokenizable(summary, check.skip_bad)
    else:
        _measure(summary, check, mode == "preview", progress, doing)
    summary.stats = length_stats(summary.lengths) if summary.lengths else None
    if check.seq_len:
        summary.over_seq_len = count_over(summary.lengths, check.seq_len)
    return summary


def _measure(summary: DatasetSummary, check: DataCheck, preview: bool, progress, doing) -> None:
    """The rows' token lengths with the measuring model's tokenizer (its fast path where it reads
    the folder), and with `preview` one example rendered."""
    report = summary.report
    doing(f"Read {report.rows:,} lines; loading the tokenizer to measure them…")
    info = _measuring_model(check.model, check.trust_remote_code, check.allow_pickle, progress)
    summary.tokenizer_of = info.name
    doing(f"Measuring {len(report.examples):,} examples with {info.name}'s tokenizer…")
    fast = _fast_lengths(info, report)
    summary.lengths = fast or []
    tokenizer = _load_tokenizer(info, check.trust_remote_code) if fast is None or preview else None
    if fast is None:
        _tokenize_into(summary, tokenizer, doing)
    if preview:
        summary.preview, summary.preview_line, summary.preview_split = _preview(tokenizer, report)


def _tokenize_into(summary: DatasetSummary, tokenizer, doing) -> None:
    """The rows as training sees them: ids and labels by the chat template, their lengths, and
    the rows the template rejects as problems on their lines."""
    report = summary.report
    doing(f"Measuring {len(report.examples):,} examples with the chat template…")
    summary.tokenized = tokenize_examples(tokenizer, report.examples, report.file)
    summary.lengths = [len(example.input_ids) for example in summary.tokenized.examples]
    summary.tokenizer_problems = summary.tokenized.problems


def _refuse_untokenizable(summary: DatasetSummary, skip_bad: bool) -> None:
    result = summary.tokenized
    if result.problems and not skip_bad:
        more = len(result.problems) - 1
        tail = f" (and {more} more)" if more else ""
        raise DatasetError(f"{result.problems[0]}{tail}; fix the rows or pass --skip-bad")
    if not result.examples:
        raise DatasetError("no usable rows after tokenising", file=summary.report.file)


def _measuring_model(model: str, trust_remote_code: bool, allow_pickle: bool, progress):
    """The model whose tokenizer measures: `model` when it is on disk, the demo model for a
    catalogued one that is not (its own tokenizer may count 10-20 % differently), and where the
    demo's weights are not installed, the demo's tokenizer that Tunesmith ships."""
    facts = model_facts(model)  # no download: a hub id that is neither cached nor catalogued is refused
    ref = "demo" if facts.kind == "catalogue" else model
    if ref.strip().lower() == "demo" and not demo_model.is_converted() and not demo_model.is_installed():
        return demo_model.tokenizer_stand_in()  # the same counts without the demo's weights
    return resolve_model(ref, trust_remote_code, allow_pickle, progress=progress)


def _fast_lengths(info, report: DataReport) -> list[int] | None:
    from pathlib import Path

    return fast_lengths(Path(info.path), report.examples)


def _load_tokenizer(info, trust_remote_code: bool):
    from app.core.models.load import load_tokenizer  # at call time: tests replace load_tokenizer there

    tokenizer = load_tokenizer(info, trust_remote_code)
    ensure_chat_template(tokenizer)
    return tokenizer


def _preview(tokenizer, report: DataReport) -> tuple[list[tuple[str, bool]], int | None, int]:
    """The first example that renders, token by token with what it learns marked, its line, and
    (a preference pair) where its rejected side starts."""
    for example in report.examples[:PREVIEW_ROWS]:
        try:
            tokenized = tokenize_one(tokenizer, example)
        except TemplateError:
            continue
        tokens = [(tokenizer.decode([token]), label != IGNORE)
                  for token, label in zip(tokenized.input_ids, tokenized.labels)]
        return tokens, example.line, tokenized.split
    return [], None, 0
