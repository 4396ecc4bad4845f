"""What the app shows about a dataset before training: the check, token lengths and a preview of
one example with the tokens the model will learn from marked.

The check and the lengths need no model weights and are fast (see `data/fast_lengths.py`); the
preview uses the model's real tokenizer, exactly as training does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app.core.data.read import Problem
from app.core.data.stats import LengthStats, length_stats
from app.core.data.validate import DataReport, check_file


@dataclass
class DatasetSummary:
    report: DataReport
    lengths: list[int] = field(default_factory=list)
    stats: LengthStats | None = None
    preview: list[tuple[str, bool]] = field(default_factory=list)  # (token text, trained on)
    preview_line: int | None = None
    tokenizer_of: str = ""

    @property
    def problems(self) -> list[Problem]:
        return sorted(self.report.problems, key=lambda p: p.line or 0)

    @property
    def usable_rows(self) -> int:
        return len(self.report.examples)


def summarise_dataset(path: str, model: str = "demo") -> DatasetSummary:
    """Check `path`, measure its token lengths with `model`'s tokenizer and preview one example.
    Raises DatasetError only for whole-file problems (missing, empty, unreadable)."""
    from app.core.catalog import model_facts
    from app.core.config import TrainConfig
    from app.core.plan_preview import measure_lengths

    report = check_file(path)
    summary = DatasetSummary(report)
    if not report.examples:
        return summary
    facts = model_facts(model)
    config = TrainConfig(model=model, data=path, skip_bad=True)
    summary.lengths = measure_lengths(config, facts, report)
    summary.stats = length_stats(summary.lengths)
    summary.tokenizer_of = "the demo model" if facts.source in ("demo", "catalogue") else facts.name
    summary.preview, summary.preview_line = _preview(report, "demo" if facts.source == "catalogue" else model)
    return summary


def _preview(report: DataReport, model: str) -> tuple[list[tuple[str, bool]], int | None]:
    from app.core.data.tokenize import IGNORE, TemplateError, ensure_chat_template, tokenize_example
    from app.core.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(model))
    ensure_chat_template(tokenizer)
    for example in report.examples[:20]:
        try:
            ids, labels = tokenize_example(tokenizer, example)
        except TemplateError:
            continue
        pieces = [(tokenizer.decode([token]), label != IGNORE) for token, label in zip(ids, labels)]
        return pieces, example.line
    return [], None
