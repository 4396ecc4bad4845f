"""The command line: exit codes, one-line errors, check-data output, the demo model end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import EXAMPLES, REPO


def tunesmith(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=REPO, env=os.environ.copy(),
                          capture_output=True, text=True, timeout=timeout)


def test_check_data_reports_stats_for_a_good_file(tiny_model):
    proc = tunesmith("check-data", str(EXAMPLES / "sharegpt.jsonl"), "--model", str(tiny_model), "--seq-len", "40")
    assert proc.returncode == 0, proc.stderr
    assert "ShareGPT conversations" in proc.stdout
    assert "3 usable, 0 with problems" in proc.stdout
    assert "tokens     min " in proc.stdout and "p95" in proc.stdout
    assert "longer than 40 tokens" in proc.stdout


def test_check_data_lists_every_bad_line_and_exits_2(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": ""}\n{oops\n{"text": 3}\n')
    proc = tunesmith("check-data", str(bad), "--model", str(tiny_model))
    assert proc.returncode == 2
    for line, reason in ((2, "text: is empty"), (3, "bad JSON"), (4, "text: expected a string")):
        assert f"{bad}:{line}: {reason}" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["train", "--data", "missing.jsonl"], "missing.jsonl: no such file"),
    (["train", "--data", str(EXAMPLES / "messages.jsonl"), "--lr", "5"], "--lr must be between 0 and 1"),
    (["train", "--data", str(EXAMPLES / "messages.jsonl"), "--model", "./nowhere"], "./nowhere: no such folder"),
    (["resume", "no-such-run"], "no run 'no-such-run'"),
    (["check-data", str(REPO / "README.md")], "unsupported file type '.md'"),
])
def test_user_errors_are_one_line_with_exit_2(args, message, tunesmith_home):
    proc = tunesmith(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"tunesmith: error: {proc.stderr.split('error: ', 1)[1].strip()}"]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tunesmith_home / "data" / "runs").exists()


def test_bad_rows_stop_training_unless_skipped(tiny_model, tmp_path):
    data = tmp_path / "mixed.jsonl"
    good = (EXAMPLES / "messages.jsonl").read_text()
    data.write_text(good + '{"messages": []}\n' + good)
    refused = tunesmith("train", "--model", str(tiny_model), "--data", str(data), "--max-steps", "1")
    assert refused.returncode == 2 and f"{data}:5: messages: is empty" in refused.stderr
    skipped = tunesmith("train", "--model", str(tiny_model), "--data", str(data), "--max-steps", "1", "--skip-bad")
    assert skipped.returncode == 0, skipped.stderr
    assert "Skipping 1 unusable row(s)" in skipped.stderr


def test_runs_lists_status_steps_and_loss(tiny_model):
    assert tunesmith("train", "--model", str(tiny_model), "--data", str(EXAMPLES / "text.jsonl"),
                     "--max-steps", "2", "--name", "listed").returncode == 0
    proc = tunesmith("runs")
    row = next(line for line in proc.stdout.splitlines() if "listed" in line)
    assert "finished" in row and "2/2" in row and "text.jsonl" in row


@pytest.mark.slow
def test_demo_model_trains_through_the_cli_and_its_adapter_loads(demo_model_path, tunesmith_home):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    proc = tunesmith("train", "--model", "demo", "--data", str(EXAMPLES / "messages.jsonl"),
                     "--max-steps", "3", "--batch", "2", "--val-split", "25", "--report", "off")
    assert proc.returncode == 0, proc.stderr
    assert "eval loss" in proc.stderr
    adapter = next((tunesmith_home / "data" / "runs").glob("*/adapter"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model_path), adapter)
    assert model.peft_config["default"].r == 16
    models = tunesmith("models")
    assert "demo" in models.stdout and "LlamaForCausalLM" in models.stdout and "135M" in models.stdout
