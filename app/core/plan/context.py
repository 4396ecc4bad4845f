"""The longest sequence a model trains at within a budget, rung by rung of the long-context ladder.

Each rung adds one way of keeping less on the card, in the order they cost: gradient checkpointing
(each layer recomputed in backward), offloaded checkpoints (each layer's input in host RAM; CUDA
only), the MLP over tiles (one more MLP forward per layer), the whole layer but attention over
tiles (one more norm and q/k/v projection per layer; on the CPU the input stays in place). For
each, the longest sequence (a multiple of STEP tokens, one packed row, up to the model's own
context) whose predicted peak fits the budget and whose host RAM fits this machine's, by the same
estimator the planner uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from app.core.models.architecture import ArchFacts
from app.core.plan.memory import MemorySetup, estimate_memory, tiles_layers

STEP = 1024
MLP_TILE = 4096
LAYER_TILE = 2048


@dataclass(frozen=True)
class Saving:
    """One way of keeping less for backward: a rung of the ladder (MemorySetup's fields)."""

    grad_checkpointing: bool = False
    offload_checkpoints: bool = False
    mlp_tile: int = 0
    layer_tile: int = 0


# (name, what the rung sets, what it costs: measured where we have it)
RUNGS = (
    ("checkpointing", Saving(True),
     "recompute each layer in backward (~20-30 % slower than without)"),
    ("+ offloaded checkpoints", Saving(True, True),
     "each layer's input in pinned host RAM (CUDA only; its speed not yet measured on a GPU)"),
    (f"+ MLP tiles of {MLP_TILE:,}", Saving(True, True, mlp_tile=MLP_TILE),
     "one more MLP forward per layer (+8 % step time on the CPU: benchmarks/results/long_context-cpu.md)"),
    (f"+ layer tiles of {LAYER_TILE:,}", Saving(True, True, layer_tile=LAYER_TILE),
     "one more norm and q/k/v per layer (on the CPU 0-6 % slower than checkpointing: "
     "benchmarks/results/long_context-cpu.md)"),
)
LADDER = tuple(saving for _, saving, _ in RUNGS)


def on_device(saving: Saving, device: str) -> Saving | None:
    """`saving` as it applies on `device`: offloading is for CUDA only (None: the rung is
    offloading alone, nothing on the CPU); the tiles still count on the CPU."""
    if device == "cuda" or not saving.offload_checkpoints:
        return saving
    return None if saving == Saving(True, True) else replace(saving, offload_checkpoints=False)


@dataclass(frozen=True)
class ContextRung:
    name: str
    seq_len: int  # the longest that fits; 0 when not even STEP tokens do
    peak: int  # its predicted peak on the card
    host: int  # its host RAM (offloaded checkpoints)
    cost: str
    note: str = ""  # why the rung was not tried, or what stopped it


def longest_context(facts: ArchFacts, setup: MemorySetup, usable: int, host_free: int,
                    limit: int | None = None) -> list[ContextRung]:
    """Each rung's longest sequence for `facts` with `setup` (its rank, dtype, loss, attention,
    device; micro-batch 1) within `usable` bytes on the card and `host_free` bytes of host RAM,
    up to `limit` tokens (default: the model's own context)."""
    limit = limit or facts.max_positions
    rungs = []
    for name, saving, cost in RUNGS:
        saving = on_device(saving, setup.device)
        if saving is None:
            rungs.append(ContextRung(name, 0, 0, 0, cost, "CUDA only: on the CPU there is no card to free"))
            continue
        rung_setup = replace(setup, micro_batch=1, **asdict(saving))
        if rung_setup.layer_tile and not tiles_layers(facts, replace(rung_setup, seq_len=limit)):
            rungs.append(ContextRung(name, 0, 0, 0, cost, "not for this model: MoE layers or eager attention"))
            continue

        def fits(seq: int) -> bool:
            estimate = estimate_memory(facts, replace(rung_setup, seq_len=seq))
            return estimate.peak <= usable and estimate.host_offload <= host_free

        low, high = 0, limit // STEP  # the longest multiple of STEP that fits, by bisection
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(middle * STEP) else (low, middle - 1)
        seq = low * STEP
        estimate = estimate_memory(facts, replace(rung_setup, seq_len=max(seq, STEP)))
        note = "the model's own context" if seq == limit // STEP * STEP else (
            "stopped by this machine's RAM" if _host_bound(facts, rung_setup, seq + STEP, usable, host_free) else "")
        rungs.append(ContextRung(name, seq, estimate.peak if seq else 0, estimate.host_offload if seq else 0,
                                 cost, note))
    return rungs


def _host_bound(facts: ArchFacts, setup: MemorySetup, seq: int, usable: int, host_free: int) -> bool:
    """Whether `seq` tokens would fit the card but not this machine's RAM."""
    estimate = estimate_memory(facts, replace(setup, seq_len=seq))
    return estimate.peak <= usable and estimate.host_offload > host_free


def best(rungs: list[ContextRung]) -> ContextRung | None:
    """The first rung that reaches the longest sequence (the cheapest way there)."""
    longest = max((r.seq_len for r in rungs), default=0)
    return next((r for r in rungs if r.seq_len == longest), None) if longest else None


def to_dicts(rungs: list[ContextRung]) -> list[dict]:
    return [asdict(r) for r in rungs]
