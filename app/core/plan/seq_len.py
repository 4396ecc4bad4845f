"""The sequence length of a plan, decided in one place: `choose_seq_len`.

The user's `--seq-len` is kept as it is. Otherwise the planner aims for p99 of the data's token
lengths within the context cap (the preset's, and the model's own positions), and the fit may fall
back to p95, then to halvings down to SHORTEST_TRIED; with no data, a common chat context. The fit,
the schedule and everything after read the plan's length, never the flag again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.core.config import TrainConfig
from app.core.data.stats import LengthStats, length_stats
from app.core.models.architecture import ArchFacts
from app.core.plan.presets import Budget

SEQ_LEN_LEAST = 16  # the shortest --seq-len a user may set (the plan panel's lowest too)
SHORTEST_TRIED = 128  # the planner tries no shorter length by itself, nor the out-of-memory back-off
NO_DATA_SEQ_LEN = 2048  # planned for when no data is given: a common chat context
DEFAULT_CAP = 2048  # without a budget (no memory check)
SEQ_STEP = 64  # lengths the planner picks are multiples of this


@dataclass(frozen=True)
class SeqChoice:
    """The lengths a fit may give the plan, longest first, and why the first."""

    wanted: int  # what the planner aims for (the user's when `fixed`)
    reason: str
    tries: tuple[int, ...]  # `wanted`, then shorter ones the fit may fall back to
    fixed: bool = False  # set by the user: nothing shorter is tried
    covering: int = 1  # how many of `tries` still cover the data (p99, then p95)
    with_data: bool = True  # False: a plan for the model alone, for `tries[0]` tokens

    @property
    def shortest(self) -> int:
        return self.tries[-1]


@dataclass(frozen=True)
class PlannedData:
    """The token lengths a plan is made for, and their statistics: the data's, or for a plan
    without data the one length the model is planned for."""

    lengths: list[int]
    stats: LengthStats


def round_up(value: int, step: int = SEQ_STEP) -> int:
    return step * max(1, math.ceil(value / step))


def context_cap(facts: ArchFacts | None, budget: Budget | None) -> int:
    """The longest context a plan may aim for: the preset's cap and the model's own positions."""
    max_positions = facts.max_positions if facts else None
    return min(budget.preset.context_cap if budget else DEFAULT_CAP, max_positions or 1 << 30)


def planned_data(config: TrainConfig, stats: LengthStats, lengths: list[int], cap: int,
                 with_data: bool) -> PlannedData:
    """The lengths to plan for: the data's; without data and without --seq-len, one example of a
    common chat context within the cap."""
    if with_data or config.seq_len:
        return PlannedData(lengths, stats)
    one = [min(NO_DATA_SEQ_LEN, cap)]
    return PlannedData(one, length_stats(one))


def choose_seq_len(config: TrainConfig, data: PlannedData, cap: int, with_data: bool = True) -> SeqChoice:
    """The one decision of the plan's sequence length (the fit picks among `tries`)."""
    stats = data.stats
    if config.seq_len:
        return SeqChoice(config.seq_len, "set by you", (config.seq_len,), fixed=True, with_data=with_data)
    wanted = max(64, min(cap, round_up(stats.p99)))
    if wanted < round_up(stats.p99):
        reason = f"the context cap {cap} (p99 of the data is {stats.p99} tokens)"
    else:
        reason = f"covers 99% of examples (p99 {stats.p99} tokens)"
    tries = _shorter_seqs(wanted, stats)
    covering = 2 if len(tries) > 1 and tries[1] == round_up(stats.p95) else 1  # p99 and p95
    return SeqChoice(wanted, reason, tuple(tries), covering=covering, with_data=with_data)


def _shorter_seqs(wanted: int, stats: LengthStats) -> list[int]:
    """`wanted`, then p95, then halvings: the lengths to try, longest first."""
    seqs = [wanted]
    p95 = round_up(stats.p95)
    if SHORTEST_TRIED <= p95 < wanted:
        seqs.append(p95)
    length = seqs[-1]
    while length // 2 >= SHORTEST_TRIED:
        length = round_up(length // 2)
        if length < seqs[-1]:
            seqs.append(length)
    return seqs
