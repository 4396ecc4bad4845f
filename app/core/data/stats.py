"""Token-length statistics of a dataset: what the planner and `check-data` report."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LengthStats:
    count: int
    min: int
    median: int
    p95: int
    p99: int
    max: int
    total: int

    def to_dict(self) -> dict:
        return asdict(self)


def length_stats(lengths: list[int]) -> LengthStats:
    """Min, median, p95, p99, max and total of token lengths (all 0 for no lengths)."""
    if not lengths:
        return LengthStats(0, 0, 0, 0, 0, 0, 0)
    ordered = sorted(lengths)

    def pct(p: float) -> int:
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]

    return LengthStats(len(ordered), ordered[0], pct(50), pct(95), pct(99), ordered[-1], sum(ordered))


def count_over(lengths: list[int], seq_len: int) -> int:
    """How many of `lengths` exceed `seq_len` (and would be truncated)."""
    return sum(1 for n in lengths if n > seq_len)
