"""Everything that must hold before a run folder is made: model, tokenizer, data, plan.

`prepare_training` resolves and checks the model, validates every row of the data, tokenises,
splits off validation rows and plans. Any user error surfaces here, before a run folder exists,
so bad input never leaves a half-made run behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from app.core.adapters import start_point
from app.core.atomic import file_sha256
from app.core.config import PREFERENCE_METHODS, Plan, TrainConfig
from app.core.data.check import DataCheck, check_dataset
from app.core.data.formats import PREFERENCE_FORMAT
from app.core.data.holdout import lines_text, overlap, split_tokenized
from app.core.data.stats import LengthStats, length_stats
from app.core.data.tokenize import Tokenized, ensure_chat_template, truncate
from app.core.data.validate import DataReport
from app.core.errors import DatasetError
from app.core.eval.probes import load_probes
from app.core.eval.report import parse_parts
from app.core.host import reset_peak_ram
from app.core.models.facts import ModelFacts
from app.core.models.load import load_tokenizer
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
    start_adapter: str = ""  # --from: the adapter folder this run starts from


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
    check = DataCheck(config.data, config.model, skip_bad=config.skip_bad)
    rows = check_dataset(check, "rows")
    val_rows = check_dataset(replace(check, path=config.val_data), "rows") if config.val_data else None
    for summary in (rows, val_rows):
        if summary is not None:
            method_fits_data(config.method, summary.report)
    config, start_adapter = start_point(config)
    model = resolve_model(config.model, config.trust_remote_code, config.allow_pickle, progress=log)
    log(f"Data: {rows.report.format_label}, {len(rows.report.examples)} usable rows of {rows.report.rows}")
    tokenizer = load_tokenizer(model, config.trust_remote_code)
    if ensure_chat_template(tokenizer):
        log("The model has no chat template; using the default ChatML template")
    log(f"Measuring {len(rows.report.examples):,} examples with {model.name}'s tokenizer…")
    data = _measured(config, check, rows, val_rows, tokenizer)
    lengths = [len(e.input_ids) for e in data.train]
    stats = length_stats(lengths)
    if plan is None:
        plan = plan_run(config, stats, lengths, bool(data.val), model.arch, budget)  # measures this process
        plan.reasons["held_out"] = data.held_out
    log(f"Eval: {data.held_out}")
    reset_peak_ram()  # the run's measured peak counts from here, as its prediction does
    train, truncated, dropped = truncate(data.train, plan.seq_len)
    val, _, _ = truncate(data.val, plan.seq_len)
    if not train:
        raise DatasetError(f"no example has anything to learn within {plan.seq_len} tokens; "
                           "raise --seq-len", file=config.data)
    skipped = len(data.problems) + dropped
    if skipped:
        log(f"Skipping {skipped} unusable row(s) (--skip-bad)")
    if truncated:
        log(f"{truncated} example(s) longer than {plan.seq_len} tokens will be truncated")
    counts = {"examples": len(train), "val_examples": len(val), "skipped": skipped, "truncated": truncated}
    held = {example.line for example in val}
    val_rows = {row.line: row for row in data.eval_report.examples if row.line in held}
    return Prepared(config, model, tokenizer, train, val, stats, plan, _data_info(config, data, counts, stats),
                    val_rows, start_adapter)


def method_fits_data(method: str, report: DataReport) -> None:
    """Refuse (DatasetError) preference pairs for sft and anything else for dpo/orpo, in one line."""
    pairs = report.format == PREFERENCE_FORMAT
    if method in PREFERENCE_METHODS and not pairs:
        raise DatasetError(f"--method {method} trains on preference pairs, and this file is {report.format_label}; "
                           "give rows with 'prompt', 'chosen' and 'rejected', or train it with --method sft",
                           file=report.file)
    if method not in PREFERENCE_METHODS and pairs:
        raise DatasetError("this file holds preference pairs (chosen and rejected answers): train them with "
                           "--method dpo or --method orpo", file=report.file)


@dataclass(frozen=True)
class _Measured:
    """The rows tokenised as training sees them, split into training and eval examples."""

    report: DataReport  # the training file's check
    eval_report: DataReport  # the eval examples' file: the eval file's check, or the training file's
    problems: list  # the training file's bad rows (left out with --skip-bad)
    train: list[Tokenized]
    val: list[Tokenized]
    held_out: str  # what the run is judged on


def _measured(config: TrainConfig, check: DataCheck, rows, val_rows, tokenizer) -> _Measured:
    report = rows.report
    measured = check_dataset(check, "train", tokenizer=tokenizer, report=report).tokenized
    problems = report.problems + measured.problems
    if val_rows is None:
        train, val, held_out = split_tokenized(report.examples, measured.examples, config.val_split, config.seed)
        return _Measured(report, report, problems, train, val, held_out)
    val = check_dataset(replace(check, path=config.val_data), "train", tokenizer=tokenizer,
                        report=val_rows.report).tokenized.examples
    return _Measured(report, val_rows.report, problems, measured.examples, val,
                     _eval_file_reason(config, report, val_rows.report, len(val)))


def _data_info(config: TrainConfig, data: _Measured, counts: dict, stats: LengthStats) -> dict:
    """The run's data.json: what was trained on and how it was checked (a resume checks the hashes)."""
    return {
        "file": str(Path(config.data).resolve()), "sha256": file_sha256(config.data),
        "format": data.report.format, "rows": data.report.rows, **counts, "length_stats": stats.to_dict(),
        "problems": [str(p) for p in data.problems[:50]],
        "val_file": str(Path(config.val_data).resolve()) if config.val_data else "",
        "val_sha256": file_sha256(config.val_data) if config.val_data else "",
        "held_out": data.held_out,
    }


def _eval_file_reason(config: TrainConfig, report: DataReport, val_report: DataReport, count: int) -> str:
    """What the run is judged on, with eval examples in a file of their own."""
    held_out = f"eval data {Path(config.val_data).name}: {count} examples"
    shared = overlap(report.examples, val_report.examples)
    if shared:
        held_out += (f"; {len(shared)} of them ask what the training data asks ({lines_text(shared)}: eval "
                     "line = training line), so their eval loss flatters the run")
    return held_out
