"""How the processes of a run on several share it: DDP over the GPUs, gloo processes on the CPU,
several machines; a ConfigError when this machine cannot run them."""

from __future__ import annotations

import os

from app.core import host
from app.core.config import TrainConfig
from app.core.errors import ConfigError
from app.core.plan.presets import Budget


def gpus_reason(gpus: int, device: str, budget: Budget | None) -> str:
    """Why and how `gpus` processes train; ConfigError when this machine cannot run them."""
    from app.core.portable import on_windows  # at call time: tests replace on_windows there

    if on_windows():
        raise ConfigError("several processes (--gpus, --nodes) need Linux: PyTorch for Windows has no NCCL, and "
                          "Tunesmith's multi-process runs are not tried on Windows; train with --gpus 1, or run "
                          "Tunesmith in WSL2 or on Linux for several GPUs")
    if device != "cuda":
        cores = os.cpu_count() or 1
        if gpus > cores:
            raise ConfigError(f"--gpus {gpus}: no GPU here, and this CPU has {cores} cores for {gpus} processes; "
                              f"use --gpus {cores} or fewer")
        return (f"{gpus} process{'es' * (gpus != 1)} on the CPU (gloo): the multi-GPU code path, to try it; "
                "not faster than one process here")
    if budget is not None and budget.card is None:  # this machine's cards, not a card named for planning
        found = len(host.gpus().gpus)
        if 0 < found < gpus:
            raise ConfigError(f"--gpus {gpus}: this machine has {found} GPU{'s' * (found != 1)}; "
                              f"use --gpus {found} or fewer")
    return (f"DDP over {gpus} GPU{'s' * (gpus != 1)}: each card holds the whole model and adapter (the memory "
            "plan is per card), each step's micro-batches are shared out")


def nodes_reason(config: TrainConfig) -> str:
    """How the machines of a run on several share it ("" on one)."""
    if config.nodes <= 1:
        return ""
    world = max(1, config.gpus) * config.nodes
    return (f"; on {config.nodes} machines, {world} processes in all (this one: node {config.node_rank}"
            f"{', which keeps the run' if config.node_rank == 0 else f', rank 0 at {config.master_addr}'})")
