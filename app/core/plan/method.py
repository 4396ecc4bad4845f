"""What a run's method changes in its plan: a preference run (dpo, orpo) needs each answer token's
log-probability, which the fused losses do not give, and padded, a pair takes two rows (each side a
row of its own); packed, a pair is one row's share, the sequence length of a preference run being
the pair's: both answers with their prompt."""

from __future__ import annotations

from app.core.config import PREFERENCE_METHODS, TrainConfig
from app.core.models.architecture import ArchFacts
from app.core.models.support import fused_loss_support


def fused_why_not(config: TrainConfig, facts: ArchFacts | None) -> str:
    """Why the run cannot use a fused loss, or "": the model's logits, or a preference method."""
    if config.method in PREFERENCE_METHODS:
        return (f"{config.method} needs each answer token's log-probability, and the fused losses give only their "
                "sum")
    return fused_loss_support(facts)


def rows_per_example(method: str, packed: bool) -> int:
    """Padded rows an example takes: a preference pair padded is two, anything else (or packed) one."""
    return 2 if method in PREFERENCE_METHODS and not packed else 1
