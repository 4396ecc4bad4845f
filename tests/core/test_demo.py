"""`tunesmith demo` end to end: the loss falls, and the tuned answer has the sample data's voice."""

from __future__ import annotations

import json
import re

import pytest

from app.core.resources import sample_dataset

PIRATE_WORDS = ("arr", "matey", "ahoy", "hearty", "ye ", "galley", "landlubber", "shiver me timbers")


def _pirate_score(text: str) -> int:
    lower = text.lower()
    return sum(lower.count(word) for word in PIRATE_WORDS)


def test_sample_dataset_is_large_valid_and_in_one_voice():
    from app.core.data.validate import check_file

    report = check_file(sample_dataset())
    assert report.ok and report.format == "messages" and len(report.examples) >= 150
    answers = [m["content"] for e in report.examples for m in e.messages if m["role"] == "assistant"]
    assert sum(_pirate_score(a) > 0 for a in answers) >= 0.95 * len(answers)


def test_demo_question_is_not_in_the_sample_data():
    from app.core.demo import DEMO_QUESTION

    assert DEMO_QUESTION.lower() not in sample_dataset().read_text().lower()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~1.5 min alone on 2 cores; more on a busy machine
def test_demo_trains_and_changes_the_models_voice(demo_cli):
    home, proc = demo_cli  # `python -m app demo`, run once for the session (conftest.py)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Loading weights" not in proc.stderr and "it/s]" not in proc.stderr  # no library progress bars
    assert "unquantised (float32)" in proc.stderr  # the planner's fast base on a CPU
    out = proc.stdout
    drop = int(re.search(r"\((-?\d+)% lower\)", out).group(1))
    assert drop >= 30, out
    base = out.split("Base model:", 1)[1].split("Tuned adapter:", 1)[0]
    tuned = out.split("Tuned adapter:", 1)[1].split("Adapter saved in", 1)[0]
    assert _pirate_score(tuned) >= 2, tuned
    assert _pirate_score(base) == 0, base
    assert re.search(r"Held-out loss: base \d\.\d+, tuned \d\.\d+ \(-\d+%\) on 9 examples", proc.stderr), proc.stderr[-2000:]
    assert re.search(r"General questions: base \d+/50, tuned \d+/50 — ", proc.stderr)
    assert "(then judged in " in out and "Before/after report: " in out
    runs = list((home / "data" / "runs").iterdir())
    status = json.loads((runs[0] / "status.json").read_text())
    assert status["status"] == "finished" and status["step"] == status["total_steps"]
