"""`tunesmith demo`: train the demo model on the pirate-chef sample and compare answers.

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
from dataclasses import dataclass
from statistics import mean
from typing import Callable

from app.core.config import TrainConfig
from app.core.resources import sample_dataset
from app.core.train.events import Event, StepMetrics
from app.core.train.trainer import RunResult, run_training

DEMO_QUESTION = "How do I make garlic bread?"


def demo_config() -> TrainConfig:
    return TrainConfig(model="demo", data=str(sample_dataset()), name="demo-pirate-chef", rank=16,
                       seq_len=256, epochs=1, micro_batch=1, grad_accum=1, max_steps=56, lr=1e-3,
                       lora_dropout=0.0, val_split=0)  # sized for time; its held-out judge comes with the report


@dataclass
class DemoResult:
    run: RunResult
    first_losses: list[float]
    last_losses: list[float]
    base_answer: str = ""
    tuned_answer: str = ""

    @property
    def loss_drop(self) -> float:
        """Relative fall of the mean loss from the first 10 steps to the last 10."""
        first, last = mean(self.first_losses), mean(self.last_losses)
        return (first - last) / first if first else 0.0


def run_demo(on_event: Callable[[Event], None] | None = None, stop: threading.Event | None = None,
             config: TrainConfig | None = None, question: str = DEMO_QUESTION) -> DemoResult:
    """Train the demo run, then ask base and tuned model the same new question."""
    from app.core.chat import GenerationSettings, load_chat

    losses: list[float] = []

    def record(event: Event) -> None:
        if isinstance(event, StepMetrics):
            losses.append(event.loss)
        if on_event:
            on_event(event)

    config = config or demo_config()
    result = DemoResult(run_training(config, record, stop), losses[:10], losses[-10:])
    if result.run.status != "finished":
        return result
    chat = load_chat(result.run.run_dir)
    messages = [{"role": "user", "content": question}]
    greedy = GenerationSettings(temperature=0, max_new_tokens=120)
    result.base_answer = chat.reply(messages, greedy, adapter=False).strip()
    result.tuned_answer = chat.reply(messages, greedy, adapter=True).strip()
    return result
