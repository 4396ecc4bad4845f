"""The outside suite, training: the CLI killed at an exact rename while it writes a checkpoint or its
status, then `resume` from another process: the run ends at its planned step, every step logged once."""

from __future__ import annotations

import json
import signal

import pytest

from test_export_faults import tunesmith


@pytest.mark.parametrize("fault", [
    "kill:replace:1:step-0000004|",  # the second checkpoint complete in its staging folder, not yet in place
    "kill:replace:3:status.json|",  # the run's status being replaced
])
def test_killed_at_a_rename_while_training_the_run_resumes_to_its_planned_step(tiny_model, chat_data, fault,
                                                                               tunesmith_home):
    killed = tunesmith("train", "--model", str(tiny_model), "--data", str(chat_data), "--max-steps", "6",
                       "--save-every", "2", "--name", "faulty", fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    [run_dir] = (tunesmith_home / "data" / "runs").iterdir()
    resumed = tunesmith("resume", run_dir.name)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["status"], status["step"]) == ("finished", 6)
    steps = [row["step"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if row.get("event") == "StepMetrics"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
