"""Everything that must hold before a run folder is made: model, tokenizer, data, plan.

`prepare_training` resolves and checks the model, validates every row of the data, tokenises,
splits off validation rows and plans. Any user error surfaces here, before a run folder exists,
so bad input never leaves a half-made run behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from app.core.atomic import file_sha256
from app.core.config import Plan, TrainConfig
from app.core.data.check import check_dataset
from app.core.data.holdout import lines_text, overlap, split_tokenized
from app.core.data.stats import LengthStats, length_stats
from app.core.data.tokenize import Tokenized, TokenizedSet, ensure_chat_template, truncate
from app.core.data.validate import DataReport, check_file
from app.core.errors import DatasetError
from app.core.eval.probes import load_probes
from app.core.eval.report import parse_parts
from app.core.host import reset_peak_ram
from app.core.models.load import load_tokenizer
from app.core.models.facts import ModelFacts
from app.core.models.resolve import resolve_model
from app.core.plan.planner import plan_run, validate_config
from app.core.plan.presets import training_budget


@dataclass
class Prepared:
    """A checked model and tokenised data with the plan to train them."""

    config: TrainConfig
    model: ModelFacts
    tokenizer: object
    train: list[Tokenized]
    val: list[Tokenized]
    stats: LengthStats
    plan: Plan
    data_info: dict
    val_rows: dict = field(default_factory=dict)  # line -> Example of each eval example (the report's text)


def prepare_training(config: TrainConfig, log: Callable[[str], None] = lambda m: None,
                     plan: Plan | None = None) -> Prepared:
    """Check and tokenise everything for `config`; with `plan` (a resume) keep that plan."""
    if not config.data:
        raise DatasetError("no training data given; pass --data FILE (.jsonl, .json or .parquet)")
    validate_config(config)  # cheap checks first: settings, then data, then the model
    parse_parts(config.report)  # the report's settings and probe file, before any minute is spent
    if config.probes:
        load_probes(config.probes)
    budget = training_budget(config.preset, config.gpu) if plan is None else None  # a bad preset fails early
    report = check_file(config.data)
    report.raise_if_unusable(config.skip_bad)
    val_report = None
    if config.val_data:
        val_report = check_file(config.val_data)
        val_report.raise_if_unusable(config.skip_bad)
    model = resolve_model(config.model, config.trust_remote_code, config.allow_pickle, progress=log)
    log(f"Data: {report.format_label}, {len(report.examples)} usable rows of {report.rows}")

    tokenizer = load_tokenizer(model, config.trust_remote_code)
    if ensure_chat_template(tokenizer):
        log("The model has no chat template; using the default ChatML template")
    log(f"Measuring {len(report.examples):,} examples with {model.name}'s tokenizer…")
    measured = _tokenize(tokenizer, report, config.skip_bad)
    if val_report is not None:
        val_measured = _tokenize(tokenizer, val_report, config.skip_bad)
        train_set, val_set = measured.examples, val_measured.examples
        shared = overlap(report.examples, val_report.examples)
        held_out = f"eval data {Path(config.val_data).name}: {len(val_set)} examples"
        if shared:
            held_out += (f"; {len(shared)} of them ask what the training data asks ({lines_text(shared)}: eval "
                         "line = training line), so their eval loss flatters the run")
    else:
        train_set, val_set, held_out = split_tokenized(report.examples, measured.examples, config.val_split,
                                                        config.seed)
    lengths = [len(e.input_ids) for e in train_set]
    stats = length_stats(lengths)
    if plan is None:
        plan = plan_run(config, stats, lengths, bool(val_set), model.arch, budget)  # measures this process
        plan.reasons["held_out"] = held_out
    log(f"Eval: {held_out}")
    reset_peak_ram()  # the run's measured peak counts from here, as its prediction does
    train, truncated, dropped = truncate(train_set, plan.seq_len)
    val, _, _ = truncate(val_set, plan.seq_len)
    if not train:
        raise DatasetError(f"no example has anything to learn within {plan.seq_len} tokens; "
                           "raise --seq-len", file=config.data)
    skipped = len(report.problems) + len(measured.problems) + dropped
    if skipped:
        log(f"Skipping {skipped} unusable row(s) (--skip-bad)")
    if truncated:
        log(f"{truncated} example(s) longer than {plan.seq_len} tokens will be truncated")
    data_info = {
        "file": str(Path(config.data).resolve()), "sha256": file_sha256(config.data),
        "format": report.format, "rows": report.rows, "examples": len(train), "val_examples": len(val),
        "skipped": skipped, "truncated": truncated, "length_stats": stats.to_dict(),
        "problems": [str(p) for p in (report.problems + measured.problems)[:50]],
        "val_file": str(Path(config.val_data).resolve()) if config.val_data else "",
        "val_sha256": file_sha256(config.val_data) if config.val_data else "",
        "held_out": held_out,
    }
    held = {example.line for example in val}
    val_rows = {row.line: row for row in (val_report or report).examples if row.line in held}
    return Prepared(config, model, tokenizer, train, val, stats, plan, data_info, val_rows)


def _tokenize(tokenizer, report: DataReport, skip_bad: bool) -> TokenizedSet:
    """The rows as training sees them, by the one dataset check with the model's own tokenizer."""
    result = check_dataset(report.file, tokenizer=tokenizer, report=report).tokenized
    if result.problems and not skip_bad:
        more = len(result.problems) - 1
        tail = f" (and {more} more)" if more else ""
        raise DatasetError(f"{result.problems[0]}{tail}; fix the rows or pass --skip-bad")
    if not result.examples:
        raise DatasetError("no usable rows after tokenising", file=report.file)
    return result
