"""Real QLoRA training on a tiny random Llama: loss falls, stop/resume and kill/resume are exact."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app.core.config import TrainConfig
from app.core.events import CheckpointSaved, RunFailed, RunFinished, RunStarted, StepMetrics, StepProgress
from app.core.runs import list_runs, open_run
from app.core.train.trainer import resume_training, run_training
from conftest import REPO


def _config(model, data, **overrides) -> TrainConfig:
    values = dict(model=str(model), data=str(data), seq_len=128, micro_batch=4, grad_accum=1, lr=5e-3,
                  max_steps=12, save_every=100, lora_dropout=0.0, quantize="4bit")
    values.update(overrides)
    return TrainConfig(**values)


def test_tiny_llama_trains_in_4bit_and_its_loss_falls(tiny_model, chat_data):
    events = []
    result = run_training(_config(tiny_model, chat_data, max_steps=30), events.append)
    assert result.status == "finished" and result.step == 30
    losses = [e.loss for e in events if isinstance(e, StepMetrics)]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    run = open_run(result.run_id)
    assert run.status()["status"] == "finished"
    assert run.plan().compute_dtype == "float32" and run.plan().device == "cpu"
    assert [e["step"] for e in run.events() if e["event"] == "StepMetrics"] == list(range(1, 31))


def test_the_base_is_nf4_double_quantised_with_lora_on_every_linear(tiny_model, chat_data):
    import bitsandbytes as bnb

    from app.core.train.prepare import prepare_training
    from app.core.train.session import QLoraSession

    session = QLoraSession(prepare_training(_config(tiny_model, chat_data)))
    quantised = [m for m in session.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert all(m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested for m in quantised)
    lora_targets = {name.split(".")[-1] for name, m in session.model.named_modules() if hasattr(m, "lora_A")}
    assert lora_targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    session.release()


def test_adapter_loads_with_peft(tiny_model, chat_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = run_training(_config(tiny_model, chat_data, max_steps=2))
    adapter = Path(result.adapter_dir)
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


def test_stop_then_resume_matches_an_uninterrupted_run(tiny_model, chat_data):
    straight = []
    run_training(_config(tiny_model, chat_data, lora_dropout=0.1), straight.append)

    stop, first = threading.Event(), []

    def on_event(event):
        first.append(event)
        if isinstance(event, StepMetrics) and event.step == 5:
            stop.set()

    stopped = run_training(_config(tiny_model, chat_data, lora_dropout=0.1), on_event, stop)
    assert (stopped.status, stopped.step) == ("stopped", 5)
    assert any(isinstance(e, CheckpointSaved) and e.step == 5 for e in first)
    assert [r.status for r in list_runs() if r.id == stopped.run_id] == ["stopped"]

    second = []
    resumed = resume_training(stopped.run_id, second.append)
    assert (resumed.status, resumed.step, resumed.total_steps) == ("finished", 12, 12)
    assert next(e for e in second if isinstance(e, RunStarted)).start_step == 5
    expected = [e.loss for e in straight if isinstance(e, StepMetrics)]
    got = [e.loss for e in first + second if isinstance(e, StepMetrics)]
    assert got == pytest.approx(expected, rel=1e-3)


def test_stop_now_leaves_a_long_step_within_seconds_and_resume_matches_an_uninterrupted_run(tiny_model, chat_data,
                                                                                           monkeypatch):
    """A long step is made by a pause in each layer's forward once step 3 is done (a slow machine,
    which this one is not: a step of 3 micro-batches x 2 layers x 1.5 s = 9 s)."""
    from app.core.train import loop as trainer  # where the loop makes its StepWatch
    from app.core.train.interrupt import StopRequest
    from app.core.train.parallel.sharded import decoder_layers

    settings = dict(lora_dropout=0.1, grad_accum=8, max_steps=6, save_every=2)
    straight = []
    run_training(_config(tiny_model, chat_data, **settings), straight.append)
    slow = threading.Event()

    class SlowWatch(trainer.StepWatch):
        def _hook(self, model):
            watched = super()._hook(model)
            for layer in decoder_layers(model.get_base_model()):
                layer.register_forward_pre_hook(lambda module, args: time.sleep(1.5) if slow.is_set() else None)
            return watched

    monkeypatch.setattr(trainer, "StepWatch", SlowWatch)
    stop, first, result = StopRequest(), [], []

    def on_event(event):
        first.append(event)
        if isinstance(event, StepMetrics) and event.step == 3:
            slow.set()

    worker = threading.Thread(target=lambda: result.append(run_training(_config(tiny_model, chat_data, **settings),
                                                                        on_event, stop)))
    worker.start()
    assert slow.wait(120)
    time.sleep(5)  # well inside step 4 (9 s)
    asked = time.monotonic()
    stop.set_now()
    worker.join(60)
    assert time.monotonic() - asked < 5, "stop now took as long as a step"
    [stopped] = result
    assert (stopped.status, stopped.step) == ("stopped", 2)  # step 4 dropped, step 3 not saved: from 2
    assert "during step 4; the step was dropped and resume continues from step 2" in stopped.reason
    assert open_run(stopped.run_id).status()["step"] == 2
    assert not any(isinstance(e, StepMetrics) and e.step == 4 for e in first)
    # the long step said where it was, from 2 s into it, about every second; to the caller only
    where = [e for e in first if isinstance(e, StepProgress)]
    assert where and all((e.step, e.total_steps, e.layers) == (4, 6, 2) and e.micro_batches >= 2 for e in where), where
    assert all(e.elapsed_s >= 2 for e in where) and len(where) <= 5
    assert {e.phase for e in where} <= {"forward", "backward"} and where[-1].micro_batch >= 2
    assert where[-1].tokens_done > 0 and [e.tokens_done for e in where] == sorted(e.tokens_done for e in where)
    assert "StepProgress" not in (open_run(stopped.run_id).dir / "metrics.jsonl").read_text()

    slow.clear()
    second = []
    resumed = resume_training(stopped.run_id, second.append)
    assert (resumed.status, resumed.step) == ("finished", 6)
    assert next(e for e in second if isinstance(e, RunStarted)).start_step == 2
    expected = [e.loss for e in straight if isinstance(e, StepMetrics)]
    got = [e.loss for e in first if isinstance(e, StepMetrics) and e.step <= 2] + [
        e.loss for e in second if isinstance(e, StepMetrics)]
    assert got == pytest.approx(expected, rel=1e-3)


def test_resume_refuses_a_finished_run_and_changed_data(tiny_model, chat_data):
    from app.core.errors import RunError

    done = run_training(_config(tiny_model, chat_data, max_steps=1))
    with pytest.raises(RunError, match="already finished"):
        resume_training(done.run_id)
    stop = threading.Event()
    stop.set()
    stopped = run_training(_config(tiny_model, chat_data), stop=stop)
    chat_data.write_text(chat_data.read_text() + chat_data.read_text().splitlines()[0] + "\n")
    with pytest.raises(RunError, match="changed since run"):
        resume_training(stopped.run_id)


def test_a_failing_run_says_why_and_keeps_its_folder(tiny_model, chat_data, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    config = json.loads((broken / "config.json").read_text())
    config["hidden_size"] = 128  # the weights no longer fit the config: loading fails
    (broken / "config.json").write_text(json.dumps(config))
    events = []
    result = run_training(_config(broken, chat_data), events.append)
    assert result.status == "failed" and "cannot load the model" in result.reason
    assert isinstance(events[-1], RunFailed) and events[-1].reason == result.reason
    status = open_run(result.run_id).status()
    assert status["status"] == "failed" and status["reason"] == result.reason
    assert not any(isinstance(e, RunFinished) for e in events)


def _wait_for(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_sigkill_then_resume_finishes_at_the_planned_step(tiny_model, chat_data, tunesmith_home):
    env = os.environ.copy()
    cmd = [sys.executable, "-m", "app", "train", "--model", str(tiny_model), "--data", str(chat_data),
           "--max-steps", "60", "--save-every", "3", "--batch", "2", "--seq-len", "96", "--lr", "1e-3"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs_root = tunesmith_home / "data" / "runs"
    try:
        checkpoint = _wait_for(lambda: next(runs_root.glob("*/checkpoints/step-*/state.json"), None), 240)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    run_dir = checkpoint.parents[2]
    listing = subprocess.run([sys.executable, "-m", "app", "runs"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120)
    assert run_dir.name in listing.stdout and "interrupted" in listing.stdout
    killed_at = open_run(run_dir.name).status()["step"]
    assert killed_at < 60
    resumed = subprocess.run([sys.executable, "-m", "app", "resume", run_dir.name], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    status = open_run(run_dir.name).status()
    assert (status["status"], status["step"], status["total_steps"]) == ("finished", 60, 60)
    steps = [e["step"] for e in open_run(run_dir.name).events() if e["event"] == "StepMetrics"]
    assert steps == list(range(1, 61))  # steps redone after the kill are logged once


def test_an_unquantised_base_trains_resumes_and_is_chosen_where_it_fits(tiny_model, chat_data):
    """LoRA on the base as it is (fp32 on the CPU): no 4-bit layers, the loss falls, a stopped run
    resumes to the same losses, and `auto` picks it for a model this small."""
    import threading

    import bitsandbytes as bnb

    from app.core.train.prepare import prepare_training
    from app.core.train.session import QLoraSession

    auto = prepare_training(_config(tiny_model, chat_data, quantize="auto")).plan
    assert auto.quantize == "none" and "skips dequantising" in auto.reasons["quantize"]
    session = QLoraSession(prepare_training(_config(tiny_model, chat_data, quantize="none")))
    assert not [m for m in session.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    session.release()

    whole = []
    result = run_training(_config(tiny_model, chat_data, quantize="none", max_steps=8),
                          lambda e: whole.append(e.loss) if isinstance(e, StepMetrics) else None)
    assert result.status == "finished" and whole[-1] < whole[0]
    stop, resumed = threading.Event(), []

    def on_event(event):
        if isinstance(event, StepMetrics):
            resumed.append(event.loss)
            if event.step >= 3:
                stop.set()

    first = run_training(_config(tiny_model, chat_data, quantize="none", max_steps=8), on_event, stop)
    assert first.status == "stopped"
    assert resume_training(first.run_id, on_event).status == "finished"
    assert resumed == whole
    assert open_run(first.run_id).plan().quantize == "none"

    from app.core.chat import GenerationSettings, load_chat

    chat = load_chat(result.run_dir)  # the base loads as the adapter was trained on it
    assert not [m for m in chat.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert chat.reply([{"role": "user", "content": "Hi"}], GenerationSettings(temperature=0, max_new_tokens=4))
