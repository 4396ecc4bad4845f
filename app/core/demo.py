"""`tunesmith demo`: train the demo model on the pirate-chef sample and compare answers.

The demo ends with the run's before/after report (eval/report.py), which also asks base and tuned
the demo's own question: held-out loss, answers side by side, the forgetting probes.

The demo is sized for a slow 2-core laptop: about 1.3 minutes of work on a 2-core AVX-512 CPU,
so that a CPU three times slower still finishes well within 6 minutes. It trains 56 packed rows
of 256 tokens (~14,000 tokens, three quarters of the 189 chats; many small steps learn more from
the same tokens than a few large ones) on the unquantised base the planner picks for a CPU,
without LoRA dropout (drawing its random masks was 14 % of a CPU step), at a learning rate above
the 2e-4 recipe because a 135M model and a few dozen steps need a stronger push to show a
visible change of voice.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from statistics import mean
from typing import Callable

from app.core.chat import GenerationSettings, load_chat
from app.core.config import TrainConfig
from app.core.eval.run_report import report_after_run
from app.core.events import Event, LogLine, StepMetrics
from app.core.resources import sample_dataset
from app.core.runs import open_run
from app.core.train.trainer import RunResult, run_training

DEMO_QUESTION = "How do I make garlic bread?"


def demo_config() -> TrainConfig:
    return TrainConfig(model="demo", data=str(sample_dataset()), name="demo-pirate-chef", rank=16,
                       seq_len=256, epochs=1, micro_batch=1, grad_accum=1, max_steps=56, lr=1e-3,
                       lora_dropout=0.0)


@dataclass
class DemoResult:
    run: RunResult
    first_losses: list[float]
    last_losses: list[float]
    base_answer: str = ""
    tuned_answer: str = ""
    report: dict = field(default_factory=dict)  # the before/after report (eval/report.py), once judged
    seconds: float = 0.0  # from the start to the end of training (the report's own time is in `report`)

    @property
    def loss_drop(self) -> float:
        """Relative fall of the mean loss from the first 10 steps to the last 10."""
        first, last = mean(self.first_losses), mean(self.last_losses)
        return (first - last) / first if first else 0.0


def run_demo(on_event: Callable[[Event], None] | None = None, stop: threading.Event | None = None,
             config: TrainConfig | None = None, question: str = DEMO_QUESTION) -> DemoResult:
    """Train the demo run, then judge it (the before/after report), which asks base and tuned
    model the same new question too: the demo's one comparison."""
    losses: list[float] = []

    def record(event: Event) -> None:
        if isinstance(event, StepMetrics):
            losses.append(event.loss)
        if on_event:
            on_event(event)

    config = config or demo_config()
    stop = stop or threading.Event()
    started = time.monotonic()
    result = DemoResult(run_training(replace(config, report="off"), record, stop), losses[:10], losses[-10:])
    result.seconds = time.monotonic() - started
    if result.run.status != "finished":
        return result
    run = open_run(result.run.run_dir)

    def say(message: str, level: str) -> None:  # into the run's train.log too, as a trained run's report is
        run.log(message)
        record(LogLine(message, level))

    report = report_after_run(run, config, say, lambda: stop.is_set(), questions=(question,))
    answers = (report or {}).get("answers") or []
    if answers and not answers[0]["line"]:
        first = answers[0]
        result.base_answer = first["base"] + (" …" if first["base_cut"] else "")
        result.tuned_answer = first["tuned"] + (" …" if first["tuned_cut"] else "")
        result.report = report
    elif not stop.is_set():  # no report (it failed, or its answers were cut short): ask them here
        result.base_answer, result.tuned_answer = _ask_both(result.run.run_dir, question)
    return result


def _ask_both(run_dir: str, question: str) -> tuple[str, str]:
    chat = load_chat(run_dir)
    messages = [{"role": "user", "content": question}]
    greedy = GenerationSettings(temperature=0, max_new_tokens=120)
    return (chat.reply(messages, greedy, adapter=False).strip(), chat.reply(messages, greedy, adapter=True).strip())
