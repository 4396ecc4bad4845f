"""Did training help? The before/after report of a run (or of any checkpoint or PEFT adapter):
base and tuned side by side on the run's held-out examples (each example's loss; the 5 most
improved and the 5 most worsened with their text; greedy answers to up to 8 of their prompts), on
the forgetting probes (probes.py), on the user's multiple-choice file when given (choices.py), and
the overfitting alarm if the run raised one. Written as report.json and report.md, each in one
piece (atomic), into the run folder at the end of every finished or stopped run and by
`tunesmith eval`.

The model is loaded the way chat and export load it (`chat.load_chat`): the report judges the
adapter a user gets, after the training session has let go of its memory.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from app.core.atomic import write_json, write_text
from app.core.errors import ConfigError
from app.core.eval.ask import Cancelled, example_losses, greedy_answers
from app.core.eval.choices import load_choices, score_choices
from app.core.eval.probes import PROBE_TOKENS, SetScore, probe_sets
from app.core.eval.report_text import report_markdown

REPORT_PARTS = ("loss", "answers", "probes")
ANSWERS = 8
ANSWER_TOKENS = 48  # enough to hear the voice; a long answer is marked cut
ANSWER_REPETITION = 1.1  # as the chat tab's default: a small model's greedy answer loops without it
SHOWN = 5  # most improved, most worsened
HELD_OUT_LIMIT = 200


@dataclass(frozen=True)
class ReportRequest:
    """What a report holds: `parts` of REPORT_PARTS, the user's probe and multiple-choice files, an
    eval file to use instead of the run's held-out examples, and questions of the user's own; and
    where it goes and what loading the models may do."""

    parts: tuple[str, ...] = REPORT_PARTS
    probes: str = ""
    choices: str = ""
    data: str = ""
    questions: tuple[str, ...] = ()  # asked first in the answers part (the demo's own question)
    out: str = ""  # the folder for report.json and report.md ("": the run's or the adapter's)
    trust_remote_code: bool = False
    download: bool = False  # a base model that is not on this machine may be downloaded


def parse_parts(text: str, flag: str = "--report") -> tuple[str, ...]:
    """'loss,answers,probes' (any of them), 'all' or 'off' -> the parts; a wrong name is a ConfigError."""
    words = [w.strip().lower() for w in text.replace(" ", ",").split(",") if w.strip()]
    if words in (["all"], []):
        return REPORT_PARTS
    if words in (["off"], ["none"]):
        return ()
    wrong = [w for w in words if w not in REPORT_PARTS]
    if wrong:
        raise ConfigError(f"{flag} {text!r}: {', '.join(wrong)} is not a part of the report; use any of "
                          f"{', '.join(REPORT_PARTS)} (comma-separated), all, or off")
    return tuple(p for p in REPORT_PARTS if p in words)


@dataclass
class HeldOut:
    """The examples a report judges on: tokenised (`examples`), their rows by line, and where from."""

    examples: list = field(default_factory=list)
    rows: dict = field(default_factory=dict)
    where: str = ""


def build_report(session, request: ReportRequest, held: HeldOut, progress: Callable[[str], None] = lambda m: None,
                 cancelled: Callable[[], bool] = lambda: False, alarm: str = "") -> dict:
    """The report as a dict (report.json's content). A part the user stops is missing, and said so."""
    source = session.source
    report: dict = {"adapter": str(source.adapter_dir), "label": source.label, "base": source.base,
                    "made": datetime.now().isoformat(timespec="seconds"), "parts": list(request.parts),
                    "seconds": {}, "notes": [], "lines": []}
    if alarm:
        report["alarm"] = alarm
    steps = [("loss", _loss_part), ("answers", _answers_part), ("probes", _probes_part)]
    if request.choices:
        steps.append(("choices", _choices_part))
    if not held.examples and {"loss", "answers"} & set(request.parts):
        report["notes"].append(f"no held-out loss or side-by-side answers: {held.where or 'no eval examples'}")
    for name, part in steps:
        if name != "choices" and name not in request.parts:
            continue
        if not held.examples and (name == "loss" or name == "answers" and not request.questions):
            continue
        started = time.monotonic()
        try:
            part(session, request, held, report, progress, cancelled)
        except Cancelled:
            report["notes"].append(f"stopped by the user before the {name} part finished; making the report again "
                                   "(Runs tab ▸ Report, or tunesmith eval) makes the whole of it")
            break
        finally:
            report["seconds"][name] = round(time.monotonic() - started, 2)
    report["seconds"]["total"] = round(sum(report["seconds"].values()), 2)
    return report


def write_report(folder: Path, report: dict, stem: str = "report") -> tuple[Path, Path]:
    """report.json and report.md in `folder`, each written whole."""
    folder = Path(folder)
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    write_json(json_path, report)
    write_text(md_path, report_markdown(report))
    return json_path, md_path


def prompt_of(row) -> tuple[object, str] | None:
    """(what to ask, the example's own answer) of a data row: the conversation up to its last
    assistant turn, or a prompt/completion's prompt; None for plain text (no prompt to answer)."""
    if row.is_pair:  # a preference pair: the shared conversation, and the chosen answer
        answer = next(m["content"] for m in row.chosen if m["role"] == "assistant")
        return row.messages, str(answer)
    if row.messages:
        last = max((i for i, m in enumerate(row.messages) if m.get("role") == "assistant"), default=None)
        if not last:
            return None
        return row.messages[:last], str(row.messages[last].get("content", ""))
    if row.format == "prompt_completion" and row.prompt.strip():
        return row.prompt, row.completion
    return None


def asked_text(prompt) -> str:
    """The prompt as a reader sees it: the last user turn, or the plain prompt."""
    if isinstance(prompt, str):
        return prompt
    users = [str(m.get("content", "")) for m in prompt if m.get("role") == "user"]
    return users[-1] if users else str(prompt[-1].get("content", "")) if prompt else ""


def _loss_part(session, request, held: HeldOut, report, progress, cancelled) -> None:
    if not held.examples:
        report["notes"].append(f"no held-out loss: {held.where or 'no eval examples'}")
        return
    examples = held.examples[:HELD_OUT_LIMIT]
    progress(f"Report: held-out loss of {len(examples)} examples, base and tuned")
    base = example_losses(session, examples, adapter=False, cancelled=cancelled)
    tuned = example_losses(session, examples, adapter=True, cancelled=cancelled)
    rows = []
    for example, b, t in zip(examples, base, tuned):
        if math.isnan(b) or math.isnan(t):
            continue
        row = held.rows.get(example.line)
        asked = prompt_of(row) if row is not None else None
        rows.append({"line": example.line, "base": b, "tuned": t, "tokens": sum(label != -100 for label in example.labels[1:]),
                     "prompt": _short(asked_text(asked[0])) if asked else _short(_row_text(row)),
                     "answer": _short(asked[1]) if asked else ""})
    if not rows:
        report["notes"].append("no held-out loss: no held-out example has a token to learn")
        return
    total = sum(r["tokens"] for r in rows)  # token-weighted, as the run's eval loss is
    base_mean = sum(r["tokens"] * r["base"] for r in rows) / total
    tuned_mean = sum(r["tokens"] * r["tuned"] for r in rows) / total
    by_change = sorted(rows, key=lambda r: r["tuned"] - r["base"])
    report["held_out"] = {"where": held.where, "examples": len(rows), "base_loss": base_mean, "tuned_loss": tuned_mean,
                          "improved": [r for r in by_change[:SHOWN] if r["tuned"] < r["base"]],
                          "worsened": [r for r in reversed(by_change[-SHOWN:]) if r["tuned"] > r["base"]],
                          "all": rows}
    change = (tuned_mean - base_mean) / base_mean if base_mean else 0.0
    report["lines"].append(f"held-out loss: base {base_mean:.3f}, tuned {tuned_mean:.3f} ({change:+.0%}) on "
                           f"{len(rows)} examples; {sum(r['tuned'] < r['base'] for r in rows)} improved, "
                           f"{sum(r['tuned'] > r['base'] for r in rows)} worsened")


def _answers_part(session, request, held: HeldOut, report, progress, cancelled) -> None:
    asks = [(0, [{"role": "user", "content": question}], "") for question in request.questions]
    for example in held.examples:
        row = held.rows.get(example.line)
        asked = prompt_of(row) if row is not None else None
        if asked:
            asks.append((example.line, *asked))
        if len(asks) == ANSWERS + len(request.questions):
            break
    if not asks:
        report["notes"].append("no side-by-side answers: " + (held.where if not held.examples else
                                                               "the held-out examples have no prompt to answer"))
        return
    progress(f"Report: {len(asks)} prompts answered by base and tuned (greedy)")
    prompts = [prompt for _, prompt, _ in asks]
    base = greedy_answers(session, prompts, ANSWER_TOKENS, False, ANSWER_REPETITION, cancelled)
    tuned = greedy_answers(session, prompts, ANSWER_TOKENS, True, ANSWER_REPETITION, cancelled)
    report["answers"] = [{"line": line, "prompt": asked_text(prompt), "reference": reference, "base": b.text,
                          "tuned": t.text, "base_cut": not b.ended, "tuned_cut": not t.ended}
                         for (line, prompt, reference), b, t in zip(asks, base, tuned)]


def _probes_part(session, request, held, report, progress, cancelled) -> None:
    report["probes"] = []
    for probe_set in probe_sets(request.probes):
        progress(f"Report: {len(probe_set.probes)} {probe_set.name}, base and tuned (greedy)")
        prompts = [[{"role": "user", "content": p.prompt}] for p in probe_set.probes]
        base = greedy_answers(session, prompts, PROBE_TOKENS, False, cancelled=cancelled)
        tuned = greedy_answers(session, prompts, PROBE_TOKENS, True, cancelled=cancelled)
        score = SetScore(probe_set.name, probe_set.file, probe_set.probes, [a.text for a in base],
                         [a.text for a in tuned])
        report["probes"].append(score.to_dict())
        report["lines"].append(score.line())


def _choices_part(session, request, held, report, progress, cancelled) -> None:
    questions = load_choices(request.choices)
    progress(f"Report: {len(questions)} multiple-choice questions, base and tuned")
    report["choices"] = score_choices(session, questions, str(Path(request.choices).resolve()), cancelled)
    report["lines"].append(report["choices"]["line"])


def _row_text(row) -> str:
    if row is None:
        return ""
    return row.text or row.prompt or row.completion


def _short(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"
