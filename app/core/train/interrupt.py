"""Inside a step: "stop now", and where a long step is.

A run asked to stop "now" leaves the step in progress within one decoder layer's work (seconds,
where "after this step" can take minutes on a CPU) instead of at its end; and a step that runs
long says where it is (micro-batch, forward or backward, which layer) every second or so.

`StopRequest` is the `stop` event a run is given (`set()`: after this step, with a checkpoint;
`set_now()`: now). `StepWatch` hooks every decoder layer: before its forward and when its output's
gradient arrives in backward it raises `StepInterrupted` once "now" was asked, and reports a
`StepProgress`. The trainer then drops the step (its gradients are discarded before the optimizer
saw them), keeps the last checkpoint and stops: a resume repeats the dropped steps exactly as an
uninterrupted run would have taken them.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from app.core.errors import ConfigError
from app.core.events import StepProgress
from app.core.train.parallel.sharded import decoder_layers

STEP_PROGRESS_AFTER_S = 2.0  # a step shorter than this says nothing (the per-step line is enough)
STEP_PROGRESS_EVERY_S = 1.0


class StepInterrupted(Exception):
    """Raised inside a step (forward or backward) when the user asked to stop now."""


class StopRequest(threading.Event):
    """Set: stop after this step (saving a checkpoint). `set_now()`: stop now, dropping the step."""

    def __init__(self):
        super().__init__()
        self.now = False

    def set_now(self) -> None:
        self.now = True
        self.set()


class StepWatch:
    """Hooks on a model's decoder layers for the step in progress: StepInterrupted once `stop.now`
    (a StopRequest; any other event never stops mid-step), and StepProgress to `report` while a
    step (between begin_step and end_step) runs long. `layers` is 0 when the model's blocks are not
    found: such a run stops after its step and reports per step only."""

    def __init__(self, model, stop, report: Callable[[StepProgress], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stop, self.report, self.clock = stop, report, clock
        self.step = self.total_steps = self.micro_batch = self.micro_batches = self.tokens_done = 0
        self.started: float | None = None
        self.last_report = 0.0
        self.layers = self._hook(model)

    def begin_step(self, step: int, total_steps: int) -> None:
        self.step, self.total_steps, self.started = step, total_steps, self.clock()
        self.micro_batch, self.micro_batches, self.tokens_done, self.last_report = 1, 1, 0, self.started

    def on_pass(self, index: int, passes: int, tokens_before: int) -> None:
        """A micro-batch starts (QLoraSession.on_pass)."""
        self.micro_batch, self.micro_batches, self.tokens_done = index + 1, passes, tokens_before

    def end_step(self) -> None:
        self.started = None

    def _at(self, index: int, phase: str) -> None:
        if getattr(self.stop, "now", False):
            raise StepInterrupted
        if self.started is None or self.report is None:
            return
        now = self.clock()
        if now - self.started < STEP_PROGRESS_AFTER_S or now - self.last_report < STEP_PROGRESS_EVERY_S:
            return
        self.last_report = now
        self.report(StepProgress(self.step, self.total_steps, self.micro_batch, self.micro_batches, phase,
                                 index + 1, self.layers, self.tokens_done, now - self.started))

    def _hook(self, model) -> int:
        import torch

        try:
            layers = decoder_layers(model.get_base_model() if hasattr(model, "get_base_model") else model)
        except ConfigError:  # blocks transformers does not name
            return 0

        def in_backward() -> bool:  # a checkpointed layer's forward again, inside backward
            return torch._C._current_graph_task_id() != -1

        for index, layer in enumerate(layers):
            def before(_module, _args, index=index) -> None:
                self._at(index, "backward" if in_backward() else "forward")

            def after(_module, _args, output, index=index) -> None:
                first = output[0] if isinstance(output, (tuple, list)) else output
                if getattr(first, "requires_grad", False) and not in_backward():
                    first.register_hook(lambda grad: self._at(index, "backward"))  # as its gradient arrives

            layer.register_forward_pre_hook(before)
            layer.register_forward_hook(after)
        return len(layers)
