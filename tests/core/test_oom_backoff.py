"""Out of GPU memory mid-run: the trainer backs off step by step and the run still finishes.

A CPU has no CUDA allocator to exhaust, so the step is wrapped to raise torch's own
OutOfMemoryError while the work it is given is larger than a pretend card holds; everything else
(the real QLoRA step, the run store, the events) is the real code.
"""

from __future__ import annotations

import json

import torch
import pytest

from app.core.config import TrainConfig
from app.core.events import PlanAdjusted, RunFailed
from app.core.runs import open_run
from app.core.train.oom import next_backoff
from app.core.train.session import QLoraSession
from app.core.train.trainer import run_training
from conftest import EXAMPLES


@pytest.fixture
def long_chats(tmp_path):
    rows = (EXAMPLES / "messages.jsonl").read_text().splitlines() * 6
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def numbered(row: dict, number: int) -> dict:
    """The chat with its question numbered, so that each copy asks something of its own."""
    for message in row["messages"]:
        if message["role"] == "user":
            content = message["content"]
            if isinstance(content, str):
                message["content"] = f"{content} ({number})"
            else:
                content[0]["text"] = f"{content[0]['text']} ({number})"
            break
    return row


def pretend_card(monkeypatch, tokens_that_fit: int, needs_checkpointing: bool = True) -> list[tuple]:
    """Make train_step fail like CUDA would while a micro-batch holds more tokens than fit."""
    real_step, seen = QLoraSession.train_step, []

    def step(self, batches):
        widest = self.plan.micro_batch * self.plan.seq_len  # what a (packed or padded) micro-batch may hold
        seen.append((self.plan.grad_checkpointing, self.plan.micro_batch, self.plan.seq_len))
        if (needs_checkpointing and not self.plan.grad_checkpointing) or widest > tokens_that_fit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, batches)

    monkeypatch.setattr(QLoraSession, "train_step", step)
    return seen


def test_the_ladder_keeps_the_examples_per_step_until_it_must_shorten():
    from app.core.config import Plan

    plan = Plan(seq_len=1024, micro_batch=4, grad_accum=2, grad_checkpointing=False)
    changes = []
    while (backoff := next_backoff(plan)) is not None:
        plan, change, _ = backoff
        changes.append((change, plan.micro_batch * plan.grad_accum, plan.seq_len))
    assert changes == [("grad_checkpointing", 8, 1024), ("micro_batch", 8, 1024), ("micro_batch", 8, 1024),
                       ("seq_len", 8, 512), ("seq_len", 8, 256), ("seq_len", 8, 128)]


def test_out_of_memory_backs_off_and_the_run_finishes(tiny_model, long_chats, monkeypatch):
    seen = pretend_card(monkeypatch, tokens_that_fit=128)
    config = TrainConfig(model=str(tiny_model), data=str(long_chats), seq_len=256, micro_batch=4, grad_accum=1,
                         grad_checkpointing=False, max_steps=4, lr=5e-3, lora_dropout=0.0)
    events = []
    result = run_training(config, events.append)
    assert result.status == "finished" and result.step == 4

    adjusted = [e for e in events if isinstance(e, PlanAdjusted)]
    assert [e.change for e in adjusted] == ["grad_checkpointing", "micro_batch", "micro_batch", "seq_len"]
    assert all(e.step == 0 for e in adjusted)  # all before the first step was taken
    assert "Out of GPU memory at step 1: turned gradient checkpointing on" in adjusted[0].message
    assert seen[-1] == (True, 1, 128)

    run = open_run(result.run_id)
    plan = run.plan()  # the run records the plan it really trained with, so a resume uses it
    assert (plan.grad_checkpointing, plan.micro_batch, plan.grad_accum, plan.seq_len) == (True, 1, 4, 128)
    assert [e["change"] for e in run.events() if e["event"] == "PlanAdjusted"] == [e.change for e in adjusted]
    log = (run.dir / "train.log").read_text()
    assert "halved the micro-batch to 1 with accumulation 4" in log and "shortened the sequence length to 128" in log
    assert run.status()["status"] == "finished"


def test_out_of_memory_with_nothing_left_to_try_fails_with_a_reason(tiny_model, long_chats, monkeypatch):
    pretend_card(monkeypatch, tokens_that_fit=16)
    config = TrainConfig(model=str(tiny_model), data=str(long_chats), seq_len=128, micro_batch=2, grad_accum=1,
                         max_steps=2, lora_dropout=0.0)
    events = []
    result = run_training(config, events.append)
    assert result.status == "failed"
    assert "out of GPU memory at step 0 even with checkpointing, micro-batch 1 and 128 tokens" in result.reason
    assert isinstance(events[-1], RunFailed)
    status = open_run(result.run_id).status()
    assert status["status"] == "failed" and status["reason"] == result.reason


def test_out_of_memory_while_evaluating_backs_off_and_training_goes_on(tiny_model, long_chats, monkeypatch):
    """Evaluation fails like CUDA would while checkpointing is off (a pretend card, as above): the
    run backs off, evaluates again, and trains the rest of its steps with the changed plan."""
    real_evaluate, seen = QLoraSession.evaluate, []

    def evaluate(self, examples):
        seen.append(self.plan.grad_checkpointing)
        if not self.plan.grad_checkpointing:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real_evaluate(self, examples)

    monkeypatch.setattr(QLoraSession, "evaluate", evaluate)
    distinct = long_chats.with_name("distinct.jsonl")  # held-out examples need prompts training lacks
    distinct.write_text("".join(json.dumps(numbered(json.loads(row), i)) + "\n"
                                for i, row in enumerate(long_chats.read_text().splitlines())))
    config = TrainConfig(model=str(tiny_model), data=str(distinct), seq_len=256, micro_batch=2, grad_accum=1,
                         grad_checkpointing=False, max_steps=4, eval_every=2, val_split=20, lr=5e-3,
                         lora_dropout=0.0)
    events = []
    result = run_training(config, events.append)
    assert result.status == "finished" and result.step == 4
    adjusted = [e for e in events if isinstance(e, PlanAdjusted)]
    assert [(e.change, e.step) for e in adjusted] == [("grad_checkpointing", 2)]
    assert "Out of GPU memory evaluating at step 2" in adjusted[0].message
    assert seen == [False, True, True]  # failed once, then evaluated at steps 2 and 4
    assert open_run(result.run_id).plan().grad_checkpointing


def test_a_run_on_several_gpus_does_not_back_off_alone_and_says_so():
    """One rank changing its plan alone would leave the others in a collective: no back-off, and
    a reason that says what to change (no GPU here: the error is torch's own OOM type)."""
    import torch

    from app.core.config import Plan
    from app.core.train.failures import failure_reason
    from app.core.train.oom import next_backoff

    plan = Plan(gpus=2, grad_checkpointing=False, micro_batch=4, seq_len=1024)
    assert next_backoff(plan) is None and next_backoff(Plan(gpus=1)) is not None
    reason = failure_reason(torch.OutOfMemoryError("CUDA out of memory"), 3, plan, session=object())
    assert reason.startswith("out of GPU memory at step 3 on one of 2 GPUs") and "--seq-len" in reason
