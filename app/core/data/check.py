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

from dataclasses import dataclass, field

from app.core.data.read import Problem
from app.core.data.stats import LengthStats, count_over, length_stats
from app.core.data.tokenize import TokenizedSet
from app.core.data.validate import DataReport, check_file

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
    tokenizer_of: str = ""  # the model whose tokenizer measured the lengths
    over_seq_len: int = 0  # rows longer than the seq_len asked about
    tokenized: TokenizedSet | None = None  # ids and labels, when the caller asked for them

    @property
    def problems(self) -> list[Problem]:
        return sorted(self.report.problems + self.tokenizer_problems, key=lambda p: p.line or 0)

    @property
    def duplicates(self) -> list[tuple[int, int]]:
        """(line, line of its first copy) of every example repeated exactly (each trains twice)."""
        from app.core.data.holdout import exact_duplicates

        return exact_duplicates(self.report.examples)

    @property
    def usable_rows(self) -> int:
        return len(self.report.examples) - len({p.line for p in self.tokenizer_problems})

    @property
    def bad_lines(self) -> int:
        return len({(p.line, p.file) for p in self.report.problems + self.tokenizer_problems})


def check_dataset(path: str, model: str = "demo", seq_len: int | None = None, *, preview: bool = False,
                  tokenizer=None, report: DataReport | None = None, trust_remote_code: bool = False,
                  allow_pickle: bool = False, progress=lambda message: None,
                  doing=lambda message: None) -> DatasetSummary:
    """Check `path` and measure its rows with `model`'s tokenizer (or `tokenizer`, which also keeps
    the tokenised examples in `.tokenized`); with `preview`, render one example. `report` is the
    file's check when the caller made it already. `progress` hears what a download or conversion of
    the model says; `doing` where the check is (lines read, the tokenizer loading: the window's).
    Raises DatasetError only for whole-file problems (missing, empty, unreadable) and ModelError for
    a model that cannot be used."""
    report = report if report is not None else check_file(path, doing)
    summary = DatasetSummary(report)
    if not report.examples:
        return summary
    exact = tokenizer is not None  # the caller's tokenizer: the lengths training will use
    if not exact:
        doing(f"Read {report.rows:,} lines; loading the tokenizer to measure them…")
        info = _measuring_model(model, trust_remote_code, allow_pickle, progress)
        summary.tokenizer_of = info.name
        doing(f"Measuring {len(report.examples):,} examples with {info.name}'s tokenizer…")
        fast = _fast_lengths(info, report)
        summary.lengths, exact = fast or [], fast is None
        if exact or preview:
            tokenizer = _load_tokenizer(info, trust_remote_code)
    if exact:
        from app.core.data.tokenize import tokenize_examples

        doing(f"Measuring {len(report.examples):,} examples with the chat template…")
        summary.tokenized = tokenize_examples(tokenizer, report.examples, report.file)
        summary.lengths = [len(example.input_ids) for example in summary.tokenized.examples]
        summary.tokenizer_problems = summary.tokenized.problems
    if preview:
        summary.preview, summary.preview_line = _preview(tokenizer, report)
    summary.stats = length_stats(summary.lengths) if summary.lengths else None
    if seq_len:
        summary.over_seq_len = count_over(summary.lengths, seq_len)
    return summary


def _measuring_model(model: str, trust_remote_code: bool, allow_pickle: bool, progress):
    """The model whose tokenizer measures: `model` when it is on disk, the demo model for a
    catalogued one that is not (its own tokenizer may count 10-20 % differently), and where the
    demo's weights are not installed, the demo's tokenizer that Tunesmith ships."""
    from app.core.models import demo_model
    from app.core.models.resolve import model_facts
    from app.core.models.resolve import resolve_model

    facts = model_facts(model)  # no download: a hub id that is neither cached nor catalogued is refused
    ref = "demo" if facts.kind == "catalogue" else model
    if ref.strip().lower() == "demo" and not demo_model.is_converted() and not demo_model.is_installed():
        return demo_model.tokenizer_stand_in()  # the same counts without the demo's weights
    return resolve_model(ref, trust_remote_code, allow_pickle, progress=progress)


def _fast_lengths(info, report: DataReport) -> list[int] | None:
    from pathlib import Path

    from app.core.data.fast_lengths import fast_lengths

    return fast_lengths(Path(info.path), report.examples)


def _load_tokenizer(info, trust_remote_code: bool):
    from app.core.data.tokenize import ensure_chat_template
    from app.core.models.load import load_tokenizer

    tokenizer = load_tokenizer(info, trust_remote_code)
    ensure_chat_template(tokenizer)
    return tokenizer


def _preview(tokenizer, report: DataReport) -> tuple[list[tuple[str, bool]], int | None]:
    from app.core.data.tokenize import IGNORE, TemplateError, tokenize_example

    for example in report.examples[:PREVIEW_ROWS]:
        try:
            ids, labels = tokenize_example(tokenizer, example)
        except TemplateError:
            continue
        return [(tokenizer.decode([token]), label != IGNORE) for token, label in zip(ids, labels)], example.line
    return [], None
