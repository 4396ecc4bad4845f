"""Progress events a training run reports: plain frozen dataclasses, no Qt.

The trainer calls `on_event(event)` with these; the run store appends `event_to_dict(event)` to
`metrics.jsonl`, and `event_from_dict` turns such a line back into an event to redraw a past run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class RunCreated:
    """The run's folder and plan exist (plan.json, made for this machine's device); the model is not
    loaded yet. Said to the caller only, not kept in metrics.jsonl."""

    run_id: str
    run_dir: str


@dataclass(frozen=True)
class RunStarted:
    run_id: str
    run_dir: str
    total_steps: int
    start_step: int
    examples: int
    val_examples: int
    truncated: int
    skipped: int
    device: str


@dataclass(frozen=True)
class StepProgress:
    """Where a long step is: said once a step has run STEP_PROGRESS_AFTER_S, then every second or
    so, so that a step of minutes (a CPU, a long row) is never a still screen. To the caller only,
    not kept in metrics.jsonl."""

    step: int  # the step in progress, from 1
    total_steps: int
    micro_batch: int  # from 1, of micro_batches (this process's share of the step)
    micro_batches: int
    phase: str  # "forward" or "backward" (a checkpointed layer's recompute is backward's)
    layer: int  # from 1, of layers
    layers: int
    tokens_done: int  # real tokens of this step's micro-batches already through
    elapsed_s: float  # in this step so far


@dataclass(frozen=True)
class StepMetrics:
    step: int
    total_steps: int
    epoch: float
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    tokens_per_s: float
    elapsed_s: float
    eta_s: float
    memory: tuple = ()  # bytes each process holds (CUDA: its peak so far), by rank (qlora.step_memory)


@dataclass(frozen=True)
class EvalMetrics:
    step: int
    eval_loss: float


@dataclass(frozen=True)
class PreferenceMetrics:
    """A preference run's (dpo, orpo) measures of a step ("train") or of the held-out pairs ("eval"),
    means over the pairs: the chosen and rejected answers' rewards, their margin, and the share of pairs
    whose chosen answer the model prefers (a tie counts half)."""

    step: int
    split: str
    chosen_reward: float
    rejected_reward: float
    margin: float
    accuracy: float


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: str


@dataclass(frozen=True)
class RunFinished:
    status: str  # "finished" or "stopped"
    step: int
    total_steps: int
    final_loss: float | None
    adapter_dir: str


@dataclass(frozen=True)
class RunFailed:
    reason: str
    step: int


@dataclass(frozen=True)
class PlanAdjusted:
    """The trainer changed the plan to recover from running out of GPU memory."""

    step: int
    change: str  # "grad_checkpointing", "micro_batch" or "seq_len"
    message: str


@dataclass(frozen=True)
class LogLine:
    message: str
    level: str = "info"


Event = (RunCreated | RunStarted | StepProgress | StepMetrics | EvalMetrics | PreferenceMetrics | CheckpointSaved
         | RunFinished | RunFailed | PlanAdjusted | LogLine)
_KINDS = {cls.__name__: cls for cls in (RunStarted, StepMetrics, EvalMetrics, PreferenceMetrics, CheckpointSaved,
                                         RunFinished, RunFailed, PlanAdjusted, LogLine)}


def event_to_dict(event: Event) -> dict:
    return {"event": type(event).__name__, **asdict(event)}


def event_from_dict(data: dict) -> Event | None:
    """The event a `metrics.jsonl` row describes, or None for an unknown row."""
    cls = _KINDS.get(data.get("event", ""))
    if cls is None:
        return None
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})
