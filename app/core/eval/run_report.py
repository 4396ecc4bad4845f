"""The report of a run, a checkpoint or any PEFT adapter, end to end: load it as chat does, find
the examples to judge it on (the run's own held-out examples, found again from its data file, seed
and split; or a file the user gives), build the report and write it where it belongs.

`report_after_run` is what the trainer calls once a run has finished or stopped; `make_report` is
`tunesmith eval` and the Runs tab's Make report.
"""

from __future__ import annotations

import gc
import json
import traceback
from pathlib import Path
from typing import Callable

from app.core.adapters import find_adapter
from app.core.atomic import file_sha256, read_jsonl
from app.core.chat import load_chat
from app.core.data.holdout import split_tokenized
from app.core.data.tokenize import answers_of, tokenize_examples, truncate
from app.core.data.validate import check_file
from app.core.errors import UserError
from app.core.eval.choices import load_choices
from app.core.eval.probes import load_probes
from app.core.eval.report import REPORT_PARTS, HeldOut, ReportRequest, build_report, parse_parts, write_report
from app.core.host import trim_heap
from app.core.run_lock import RunLock
from app.core.runs import open_run


def make_report(ref: str, request: ReportRequest, progress: Callable[[str], None] = lambda m: None,
                cancelled: Callable[[], bool] = lambda: False, lock: bool = True,
                held: HeldOut | None = None) -> tuple[dict, Path, Path]:
    """Judge the adapter `ref` names (adapters.find_adapter) and write report.json and report.md:
    into the request's `out` when given, else the run's folder (report-CHECKPOINT for a checkpoint), else the
    adapter's own folder. Writing into a run, it holds the run's lock (`lock`; the trainer, which
    holds it already, says False): a run being trained, resumed or deleted is refused in one line.
    `held`: the examples to judge on when the caller has them (the trainer: its own eval examples,
    not the data file tokenised again)."""
    if request.probes:  # a bad file is said before minutes of loading
        load_probes(request.probes)
    if request.choices:
        load_choices(request.choices)
    source = find_adapter(ref)
    folder, stem = _where(source, request.out)
    held_lock = None
    if lock and source.run_dir is not None and folder.resolve() == source.run_dir.resolve():
        held_lock = RunLock(source.run_dir, "judging").acquire()  # RunError naming the holder when in use
    try:
        _free()  # what the training session let go of goes back to the system before the model loads again
        session = load_chat(ref, request.trust_remote_code, progress=progress, download=request.download)
        try:
            if held is None:
                held = held_out_of(session, request.data) if {"loss", "answers"} & set(request.parts) else HeldOut()
            report = build_report(session, request, held, progress, cancelled, alarm=_alarm(source.run_dir))
        finally:
            del session
            _free()
        paths = write_report(folder, report, stem)
    finally:
        if held_lock is not None:
            held_lock.release()
    return report, *paths


def report_after_run(run, config, say: Callable[[str, str], None], cancelled: Callable[[], bool],
                     questions: tuple[str, ...] = (), held: HeldOut | None = None) -> dict | None:
    """The run's report at its end (finished or stopped), its lines said; None when it is off or
    failed (a failure is only warned of: the run itself is kept either way, and `tunesmith eval
    RUN` tries again). `questions` are asked first in the answers part (which they turn on)."""
    parts = parse_parts(config.report)
    if questions:
        parts = tuple(p for p in REPORT_PARTS if p in parts or p == "answers")
    if not parts:
        return None
    say(f"Judging the run against the base model ({', '.join(parts)}); Stop now skips it", "info")
    try:
        request = ReportRequest(parts, config.probes, questions=questions, trust_remote_code=config.trust_remote_code)
        report, _, md_path = make_report(str(run.dir), request, progress=lambda m: say(m, "info"),
                                         cancelled=cancelled, lock=run.lock is None, held=held)
    except Exception as err:  # noqa: BLE001 - a report must never cost the run
        run.log(traceback.format_exc())
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        say(f"The report could not be made ({first}); Make report in the Runs tab (tunesmith eval {run.id}) tries "
            "again", "warning")
        return None
    forgotten = any(p.get("verdict") == "forgotten" for p in report.get("probes", []))
    for line in report["lines"]:
        say(line[:1].upper() + line[1:], "warning" if forgotten and "forgotten" in line else "info")
    for note in report["notes"]:
        say(f"Report: {note}", "info")
    say(f"Report: {md_path} ({report['seconds']['total']:.1f} s)", "info")
    return report


def report_summary(run_dir) -> str:
    """The run's report in a few words ("held-out loss 3.76 -> 1.72; general questions 23/50 -> 11/50,
    forgotten"), "" when it has none."""
    try:
        report = json.loads(Path(run_dir, "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    words = []
    held = report.get("held_out")
    if held:
        words.append(f"held-out loss {held['base_loss']:.2f} -> {held['tuned_loss']:.2f}")
    for probes in report.get("probes", []):
        words.append(f"{probes['name']} {probes['base']}/{probes['total']} -> {probes['tuned']}/{probes['total']}, "
                     f"{probes['verdict']}")
    return "; ".join(words)


def held_out_of(session, data: str = "") -> HeldOut:
    """The examples to judge `session`'s adapter on: every example of `data`, else its run's eval
    file or held-out slice (the run's seed and split on the same file, cut to its sequence length),
    else none (with the reason)."""
    if data:
        return _examples(session.tokenizer, data, f"every example of {Path(data).name}")
    if session.source.run_dir is None:
        return HeldOut(where="an adapter outside a run has no held-out examples; pass --data FILE to judge it on "
                             "examples of yours")
    run = open_run(str(session.source.run_dir))
    config, info, seq_len = run.config(), run.data_info(), run.plan().seq_len
    file, key = (config.val_data, "val_sha256") if config.val_data else (config.data, "sha256")
    if not Path(file).is_file() or (info.get(key) and file_sha256(file) != info[key]):
        return HeldOut(where=f"{file} is gone or changed since the run, so its held-out examples cannot be found "
                             "again; pass --data FILE")
    if config.val_data:
        return _examples(session.tokenizer, file, f"the run's eval file {Path(file).name}", seq_len)
    return _examples(session.tokenizer, file, "", seq_len, split=(config.val_split, config.seed))


def _examples(tokenizer, file: str, where: str, seq_len: int | None = None, split=None) -> HeldOut:
    checked = check_file(file)
    if not checked.examples:
        raise UserError(f"{file}: no usable rows to judge on; see `tunesmith check-data {file}`")
    examples = tokenize_examples(tokenizer, checked.examples, checked.file).examples
    if split is not None:
        _, examples, why = split_tokenized(checked.examples, examples, *split)
        where = f"held out of {Path(file).name}: {why}"
        if not examples:
            return HeldOut(where=why)
    if seq_len:
        examples = truncate(examples, seq_len)[0]
    examples = answers_of(examples)
    return HeldOut(examples, {row.line: row for row in checked.examples}, where)


def _where(source, out: str) -> tuple[Path, str]:
    if out:
        return Path(out).expanduser(), "report"
    if source.run_dir is None:
        return source.adapter_dir, "report"
    if source.adapter_dir.resolve() == (source.run_dir / "adapter").resolve():
        return source.run_dir, "report"
    return source.run_dir, f"report-{source.adapter_dir.name}"


def _alarm(run_dir) -> str:
    """The run's overfitting alarm, if it raised one (a LogLine of its metrics.jsonl)."""
    if run_dir is None:
        return ""

    return next((e.get("message", "") for e in read_jsonl(Path(run_dir) / "metrics.jsonl")
                 if e.get("event") == "LogLine" and str(e.get("message", "")).startswith("Overfitting")), "")


def _free() -> None:
    gc.collect()
    trim_heap()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
