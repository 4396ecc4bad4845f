"""On the CPU the plan takes the cores other programs leave free: a real busy process beside the
plan is seen, a thread count given is kept, and training computes with the plan's threads (the
window's own count given back after)."""

from __future__ import annotations

import subprocess
import sys
import time

import torch

from app.core import host
from app.core.config import TrainConfig
from app.core.events import StepMetrics
from app.core.plan.planner import cpu_threads
from app.core.train.trainer import run_training


def test_a_busy_program_beside_the_plan_keeps_its_core(monkeypatch):
    cores, _ = host.cpu_cores()
    spinner = subprocess.Popen([sys.executable, "-c", "while True:\n    pass\n"])
    try:
        time.sleep(0.5)
        monkeypatch.setattr(host, "_cores_seen", None)  # measured again now, not the measure of 0.5 s ago
        _, busy = host.cpu_cores()
        threads, reason = cpu_threads(TrainConfig())
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and busy >= 0.8, busy  # the spinner's core, whatever else runs
    assert threads == max(1, min(threads, cores - 1)) and "busy" in reason and "measured" in reason, (threads, reason)


def test_a_thread_count_given_is_kept_and_several_processes_share_the_cores():
    assert cpu_threads(TrainConfig(threads=3)) == (3, "set by you")
    threads, reason = cpu_threads(TrainConfig(gpus=2))
    assert threads == max(1, threads) and "shared by 2 processes" in reason


def test_training_computes_with_the_plans_threads_and_gives_the_count_back(tiny_model, chat_data):
    before = torch.get_num_threads()
    seen = []
    config = TrainConfig(model=str(tiny_model), data=str(chat_data), seq_len=128, micro_batch=4, grad_accum=1,
                         max_steps=2, save_every=100, threads=1)
    result = run_training(config, lambda event: seen.append(torch.get_num_threads())
                          if isinstance(event, StepMetrics) else None)
    assert result.status == "finished" and seen == [1, 1]
    assert torch.get_num_threads() == before


def test_a_plan_says_how_long_from_the_speed_the_last_run_like_it_measured(tiny_model, chat_data):
    """Before any run: 'measured from the first steps'. After one: its tokens at that run's speed."""
    from app.core.data.stats import length_stats
    from app.core.plan.planner import plan_run
    from app.core.plan.presets import training_budget
    from app.core.speeds import known_speed
    from app.core.train.prepare import prepare_training

    config = TrainConfig(model=str(tiny_model), data=str(chat_data), seq_len=128, micro_batch=4, grad_accum=1,
                         max_steps=40, save_every=100, threads=1)
    before = prepare_training(config).plan
    assert before.estimated_s == 0 and "measured from the first steps" in before.reasons["time"]
    result = run_training(config)
    speed = known_speed(config.model, before)
    assert speed and speed["run"] == result.run_id and speed["tokens_per_s"] > 0
    again = prepare_training(config)
    lengths = [len(e.input_ids) for e in again.train]
    tokens = sum(min(n, again.plan.seq_len) for n in lengths) * again.plan.total_steps / again.plan.steps_per_epoch
    assert again.plan.estimated_s == tokens / speed["tokens_per_s"]
    assert f"the speed of run {result.run_id} here" in again.plan.reasons["time"]
    assert plan_run(config, length_stats(lengths), lengths, True, again.model.arch,
                    training_budget("auto", "")).estimated_s == again.plan.estimated_s
