"""Multiple-choice scoring of the user's own task: a JSONL file of questions, each with its choices
and the index of the right one. Base and tuned each pick the choice whose tokens are likeliest as
the answer: the summed log-likelihood of its tokens per byte of its text (what
lm-evaluation-harness calls acc_norm: without it the shortest choice nearly always wins); the
accuracy comes with a 95 % interval (Wilson's), so 7 of 10 is not read as better than 6 of 10.

    {"question": "Which spice is in a pirate's garlic bread?", "choices": ["garlic", "cinnamon"], "answer": 0}

An optional `system` is put before the question. No download: the user brings the file
(resources/probes/choices_example.jsonl shows the format).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from app.core.eval.ask import Cancelled, choice_logliks
from app.core.eval.lines import read_objects

Z95 = 1.959964


@dataclass(frozen=True)
class Question:
    line: int
    question: str
    choices: tuple[str, ...]
    answer: int
    system: str = ""

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": "user", "content": self.question}]


def load_choices(path: str | Path) -> list[Question]:
    """Every question of the file; a bad line raises one DatasetError naming it (and how many more)."""
    return read_objects(path, _question,
                        "no such file; give a JSONL file of questions with 'question', 'choices' and 'answer'",
                        "cannot read the file ({err})",
                        'no questions in the file; one JSON object a line: {"question": "...", "choices": '
                        '["...", "..."], "answer": 0}')


def wilson(right: int, total: int) -> tuple[float, float]:
    """The 95 % interval of an accuracy of `right` out of `total` (Wilson score interval)."""
    if total <= 0:
        return 0.0, 1.0
    p = right / total
    centre = (p + Z95 ** 2 / (2 * total)) / (1 + Z95 ** 2 / total)
    half = Z95 * math.sqrt(p * (1 - p) / total + Z95 ** 2 / (4 * total ** 2)) / (1 + Z95 ** 2 / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def score_choices(session, questions: list[Question], file: str,
                  cancelled: Callable[[], bool] = lambda: False) -> dict:
    """Base and tuned accuracy on `questions`, each with its interval and the choices picked."""
    picks = {"base": [], "tuned": []}
    for question in questions:
        if cancelled():
            raise Cancelled
        for side, adapter in (("base", False), ("tuned", True)):
            sums = choice_logliks(session, question.messages(), list(question.choices), adapter)
            scores = [total / max(1, len(choice.encode("utf-8"))) for total, choice in zip(sums, question.choices)]
            picks[side].append(max(range(len(scores)), key=scores.__getitem__))
    result = {"file": file, "questions": len(questions)}
    for side, picked in picks.items():
        right = sum(p == q.answer for p, q in zip(picked, questions))
        low, high = wilson(right, len(questions))
        result[side] = {"right": right, "accuracy": right / len(questions), "interval": [low, high]}
    result["items"] = [{"line": q.line, "question": q.question, "choices": list(q.choices), "answer": q.answer,
                        "base": b, "tuned": t} for q, b, t in zip(questions, picks["base"], picks["tuned"])]
    result["line"] = choices_line(result)
    return result


def choices_line(result: dict) -> str:
    def side(name: str) -> str:
        data = result[name]
        low, high = data["interval"]
        return f"{name} {data['accuracy']:.0%} ({data['right']}/{result['questions']}, 95 % {low:.0%}-{high:.0%})"

    return f"multiple choice ({Path(result['file']).name}): {side('base')}, {side('tuned')}"


def _question(record, line: int) -> Question:
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object with 'question', 'choices' and 'answer'")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' must be a non-empty string")
    choices = record.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError("'choices' must be a list of at least two non-empty strings")
    answer = record.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"'answer' must be the index of the right choice, 0 to {len(choices) - 1}")
    system = record.get("system", "")
    if not isinstance(system, str):
        raise ValueError("'system' must be a string")
    return Question(line, question, tuple(choices), answer, system)
