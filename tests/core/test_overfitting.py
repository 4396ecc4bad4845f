"""The overfitting alarm and early stop, on real runs of a tiny model that is made to learn its
examples by heart: answers of random words it can only memorise, few examples (32 trained on, 8 held
out) and 15 passes over them. The kept adapter is measured again from its files.

The recipe's learning rate is what makes the memorising certain: at 1e-2 the training loss falls
smoothly to ~0.2 and the held-out loss bottoms out (~2.3-2.9, steps 32-48) and then climbs 20-50 %
by the end, on each of 13 seeds tried, with torch's AVX-512 kernels and with its AVX2 and
unvectorised ones (ATEN_CPU_CAPABILITY). At 3e-2 (the old recipe) this random-weight model never
memorised: the training loss hovered around 2, the eval loss plateaued at the words' entropy
(~2.1), and whether the alarm fired hung on an early bump of noise, so on the CPU's numerics."""

from __future__ import annotations

import json
import random

import pytest

from app.core.config import TrainConfig
from app.core.train.overfit import EvalJudge


def style_set(path, rows: int = 40):
    """Answers of random cooking words: the format can be learnt, the words only memorised."""
    rng = random.Random(0)
    words = "salt pepper bread cheese garlic onion butter flour sugar oil lemon herb".split()
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Recipe {i}?"},
                                      {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(12))}]})
             for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def overtrained(model, data, early_stop: str, steps: int = 120, seed: int = 42) -> TrainConfig:
    """8 steps a pass over the 32 training examples; no before/after report (test_report.py's)."""
    return TrainConfig(model=str(model), data=str(data), seq_len=64, micro_batch=4, grad_accum=1, lr=1e-2,
                       max_steps=steps, lora_dropout=0.0, quantize="none", val_split=20, eval_every=4, rank=16,
                       early_stop=early_stop, save_every=1000, seed=seed, report="off")


def eval_loss(model_dir, adapter_dir, examples) -> float:
    """Mean token loss of base + adapter over `examples`, by transformers and PEFT alone."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      str(adapter_dir)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example.input_ids])
            labels = torch.tensor([example.labels])
            logits = model(input_ids=ids).logits[0, :-1]
            target = labels[0, 1:]
            keep = target != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def alarms(events) -> list[str]:
    from app.core.events import LogLine

    return [e.message for e in events if isinstance(e, LogLine) and e.message.startswith("Overfitting")]


def test_early_stop_ends_an_overtrained_run_and_keeps_the_best_eval_adapter(tiny_model, tmp_path):
    from app.core.runs import open_run, read_history
    from app.core.train.prepare import prepare_training
    from app.core.train.trainer import run_training

    config = overtrained(tiny_model, style_set(tmp_path / "style.jsonl"), "stop")
    events = []
    result = run_training(config, events.append)
    assert result.status == "finished" and result.step < config.max_steps, result  # stopped early
    assert len(alarms(events)) == 1 and "stopping early" in alarms(events)[0]
    run = open_run(result.run_dir)
    history = read_history(run)
    best = min(zip(history.eval_losses, history.eval_steps))
    assert history.eval_steps[-1] == result.step and history.eval_losses[-1] > best[0]
    assert f"the adapter is step {best[1]}'s, the best eval" in result.reason
    assert json.loads((run.adapter_dir / "tunesmith.json").read_text())["step"] == best[1]  # which step it is
    assert run.raw_status()["reason"] == result.reason and "Overfitting" in run.log_file.read_text()
    val = prepare_training(config).val  # the same held-out examples (the seed's)
    kept, last = eval_loss(tiny_model, run.adapter_dir, val), eval_loss(tiny_model, run.last_adapter_dir, val)
    assert kept < last
    assert kept == pytest.approx(best[0], rel=0.02) and last == pytest.approx(history.eval_losses[-1], rel=0.02)
    assert not run.best_adapter_dir.exists()


def test_warn_raises_the_alarm_before_the_run_ends_and_trains_on(tiny_model, tmp_path):
    from app.core.runs import open_run, read_history
    from app.core.events import EvalMetrics
    from app.core.train.trainer import run_training

    config = overtrained(tiny_model, style_set(tmp_path / "style.jsonl"), "warn")
    events = []
    result = run_training(config, events.append)
    assert result.step == config.max_steps and len(alarms(events)) == 1  # once, and the run went on
    alarm_at = next(i for i, e in enumerate(events) if getattr(e, "message", "").startswith("Overfitting"))
    assert any(isinstance(e, EvalMetrics) for e in events[alarm_at:])  # before the end
    run = open_run(result.run_dir)
    history = read_history(run)
    best, best_step = min(zip(history.eval_losses, history.eval_steps))
    train_end = sum(history.losses[-8:]) / 8  # the last pass over the training examples
    assert history.eval_losses[-1] > 1.1 * best and train_end < history.eval_losses[-1] / 2, history  # memorised
    assert run.last_adapter_dir.is_dir() and f"the adapter is step {best_step}'s" in result.reason
    assert not run.best_adapter_dir.exists()


def test_no_alarm_when_the_eval_examples_are_the_learnt_ones(tiny_model, tmp_path):
    """The same recipe memorises just as hard, but judged on its own training examples its eval loss
    only falls: what raises the alarm is the held-out loss rising, not the high learning rate."""
    from dataclasses import replace

    from app.core.runs import open_run, read_history
    from app.core.train.trainer import run_training

    data = style_set(tmp_path / "style.jsonl")
    config = replace(overtrained(tiny_model, data, "warn"), val_data=str(data), val_split=None)
    events = []
    result = run_training(config, events.append)
    history = read_history(open_run(result.run_dir))
    assert result.step == config.max_steps and len(history.eval_losses) == config.max_steps // 4
    assert alarms(events) == [] and result.reason == ""
    # never risen, and memorised: below the ~2.1 the random words allow a model that has not
    assert history.eval_losses[-1] < min(history.eval_losses) * 1.02 and history.eval_losses[-1] < 1.5, history


def test_off_says_nothing_and_keeps_the_last_adapter(tiny_model, tmp_path):
    from app.core.runs import open_run
    from app.core.train.trainer import run_training

    config = overtrained(tiny_model, style_set(tmp_path / "style.jsonl"), "off", steps=60)
    events = []
    result = run_training(config, events.append)
    run = open_run(result.run_dir)
    assert alarms(events) == [] and result.reason == ""
    assert not run.last_adapter_dir.exists() and not run.best_adapter_dir.exists()


@pytest.mark.parametrize("evals,alarm_at", [
    ([(4, 3.0), (8, 2.5), (12, 2.6), (16, 2.7)], 16),      # risen twice since the best
    ([(4, 3.0), (8, 2.5), (12, 2.6), (16, 2.4)], None),    # a bump, then a new best
    ([(4, 3.0), (8, 2.5), (12, 2.51), (16, 2.52)], None),  # within 2 %: noise
])
def test_the_judge_waits_for_patience_and_a_real_rise(evals, alarm_at):
    judge = EvalJudge(patience=2)
    raised = None
    for step, loss in evals:
        for _ in range(4):
            judge.add_step(3.0 - step / 10)  # the training loss keeps falling
        if judge.add_eval(step, loss).alarm:
            raised = step
    assert raised == alarm_at


def test_no_alarm_while_the_training_loss_rises_too():
    judge = EvalJudge(patience=2)
    verdicts = []
    for step, (train, loss) in enumerate([(2.0, 2.0), (2.5, 2.3), (2.8, 2.6)], start=1):
        judge.add_step(train)
        verdicts.append(judge.add_eval(step, loss).alarm)
    assert verdicts == ["", "", ""]  # a diverging run, not an overfitting one


def test_a_resumed_run_remembers_its_evals():
    judge = EvalJudge.from_history(2, [1, 2, 3, 4], [3.0, 2.0, 1.5, 1.0], [2, 4], [2.2, 2.4], up_to=4)
    assert judge.best == (2, 2.2)
    judge.add_step(0.8)
    assert judge.add_eval(6, 2.5).alarm.startswith("Overfitting: the eval loss has risen for 2 evals")
