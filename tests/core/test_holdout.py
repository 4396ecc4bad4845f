"""Held-out examples by default: how many, never a prompt on both sides, the same with the same
seed, and the duplicates and overlaps the check reports. Real files, the real tokenizer and split
of prepare_training, the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from app.core.config import TrainConfig
from app.core.data.formats import Example
from app.core.data.holdout import auto_count, exact_duplicates, hold_out, overlap, prompt_key
from conftest import REPO


def chats(prompts: list[str]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": f"Answer {i}."}]}
            for i, p in enumerate(prompts)]


def write(path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def rows(prompts: list[str], answer: str | None = None) -> list[Example]:
    return [Example(line=i + 1, format="messages", messages=[{"role": "user", "content": p},
                                                             {"role": "assistant", "content": answer or f"Answer {i}."}])
            for i, p in enumerate(prompts)]


@pytest.mark.parametrize("examples,held", [(39, 0), (40, 8), (189, 9), (1000, 50), (10_000, 200)])
def test_the_automatic_share_is_5_percent_between_8_and_200_and_none_for_a_small_set(examples, held):
    count, why = auto_count(examples)
    assert count == held
    assert ("too few to spare 8" in why) == (held == 0)


def test_a_repeated_prompt_is_never_on_both_sides_of_the_split(tiny_model, tmp_path):
    from app.core.train.prepare import prepare_training

    # 60 distinct prompts, and 12 of them again: 6 copied exactly, 6 retyped (case, spacing, punctuation)
    prompts = [f"How do I cook dish number {i}?" for i in range(60)]
    prompts += prompts[:6] + [f"how do i  COOK dish number {i}" for i in range(6, 12)]
    data = write(tmp_path / "repeats.jsonl", chats(prompts))
    by_line = {e.line: e for e in rows(prompts)}
    for seed in range(8):  # whichever examples the seed holds out
        prepared = prepare_training(TrainConfig(model=str(tiny_model), data=str(data), seed=seed, max_steps=1))
        held = {prompt_key(by_line[e.line]) for e in prepared.val}
        trained = {prompt_key(by_line[e.line]) for e in prepared.train}
        assert held and not held & trained, seed
        assert len(prepared.val) >= 8 and len(prepared.val) + len(prepared.train) == len(prompts)
    assert prepared.plan.eval_every and "held out" in prepared.plan.reasons["held_out"]


def test_the_same_seed_holds_out_the_same_examples_whatever_the_file_order():
    examples = rows([f"question {i}" for i in range(100)])
    first = hold_out(examples, None, 7)
    again = hold_out(list(reversed(examples)), None, 7)
    lines = {examples[i].line for i in first.held}
    assert lines == {list(reversed(examples))[i].line for i in again.held}
    assert lines != {examples[i].line for i in hold_out(examples, None, 8).held}


def test_zero_holds_nothing_out_a_share_holds_that_share_and_a_prompt_repeated_everywhere_none():
    examples = rows([f"question {i}" for i in range(100)])
    assert hold_out(examples, 0, 1).held == frozenset()
    assert len(hold_out(examples, 25, 1).held) == 25
    same = rows(["the one question"] * 50)
    choice = hold_out(same, None, 1)
    assert choice.held == frozenset() and "without its twin in training" in choice.reason


def test_exact_duplicates_and_eval_overlap_are_found_by_line():
    examples = rows(["a", "b", "a", "c", "b"], answer="Same.")
    assert exact_duplicates(examples) == [(3, 1), (5, 2)]
    assert exact_duplicates(rows(["a", "b", "a"])) == []  # the same question answered otherwise is no copy
    evals = rows(["z", "B!", "y"])
    assert overlap(examples, evals) == [(2, 2)]  # eval line 2 asks what training line 2 asks


def tunesmith(*args):
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=REPO, env=os.environ.copy(),
                          capture_output=True, text=True, timeout=600)


def test_check_data_reports_exact_duplicates_and_plan_says_what_is_held_out(tiny_model, tmp_path):
    prompts = [f"How do I cook dish number {i}?" for i in range(50)]
    data = write(tmp_path / "dupes.jsonl", chats(prompts) + chats(prompts)[:2])
    checked = tunesmith("check-data", str(data), "--model", str(tiny_model))
    assert checked.returncode == 0, checked.stderr
    assert "repeats    2 exact duplicates (line 51 = line 1, line 52 = line 2)" in checked.stdout
    planned = tunesmith("plan", "--model", str(tiny_model), "--data", str(data))
    assert planned.returncode == 0, planned.stderr
    assert "held out: 5 % of the examples (at least 8, at most 200)" in planned.stdout
    none = tunesmith("plan", "--model", str(tiny_model), "--data", str(data), "--eval-split", "0")
    assert "held out" not in none.stdout and "no held-out examples (set by you)" in none.stdout


def test_eval_data_that_repeats_training_prompts_is_said_when_training_starts(tiny_model, tmp_path):
    prompts = [f"How do I cook dish number {i}?" for i in range(12)]
    data = write(tmp_path / "train.jsonl", chats(prompts))
    evals = write(tmp_path / "eval.jsonl", chats(["Something new?", prompts[3]]))
    proc = tunesmith("train", "--model", str(tiny_model), "--data", str(data), "--eval-data", str(evals),
                     "--max-steps", "1")
    assert proc.returncode == 0, proc.stderr
    assert "1 of them ask what the training data asks (line 2 = line 4" in proc.stdout + proc.stderr


def test_evals_come_every_n_steps_and_also_when_too_long_has_passed_since_the_last(tiny_model, tmp_path,
                                                                                   monkeypatch):
    from app.core.events import EvalMetrics
    from app.core.train import loop, trainer

    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                     {"role": "assistant", "content": f"Answer {i}."}]}) + "\n"
                            for i in range(48)))
    config = TrainConfig(model=str(tiny_model), data=str(data), seq_len=64, micro_batch=4, max_steps=16,
                         quantize="none", report="off")
    steps = []
    trainer.run_training(config, lambda e: steps.append(e.step) if isinstance(e, EvalMetrics) else None)
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16]  # 8 a run: every 2 of 16 steps
    monkeypatch.setattr(loop, "EVAL_AT_LEAST_EVERY_S", 0.0)  # a machine so slow that every step is overdue
    steps.clear()
    trainer.run_training(config, lambda e: steps.append(e.step) if isinstance(e, EvalMetrics) else None)
    assert steps == list(range(1, 17))
