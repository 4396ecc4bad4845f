"""Several processes training one run: the pieces each worker process uses (issue 20).

torchrun (torch.distributed.run, started by launch.py) starts one worker per GPU (gloo processes
on a machine without one) and torch.distributed joins them: `join` sets up the process group from
torchrun's environment (NCCL on CUDA, gloo on the CPU) with a timeout on every collective, so a
worker that dies ends the others' wait instead of hanging them. Each optimizer step's micro-batches
are shared out by `Ranks.share` (rank r takes every world-th one); every rank normalises its loss by
the whole step's target tokens, so `sum_gradients` (one all-reduce of the LoRA gradients, summed)
gives each rank exactly the gradient one process accumulating all the micro-batches would have:
the same clipping, the same optimizer step, the same adapter on every rank.

Rank 0 owns the run folder: the other ranks see it through `ReadOnlyRun`, whose writes go nowhere,
and wait at a barrier while rank 0 writes a checkpoint or the adapter. A stop request (a file the
launcher writes in the run folder) is read by rank 0 and shared by `StopFlag` at every step, so all
ranks stop after the same step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

COLLECTIVE_TIMEOUT_S = 120
STOP_FILE = "stop.request"


@dataclass(frozen=True)
class Ranks:
    """This process's place among the workers of a run."""

    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's part of a step's micro-batches."""
        return items[self.rank::self.world]

    def sum_gradients(self, params) -> None:
        """Sum every rank's gradients of `params` (a rank with no micro-batch this step adds zeros)."""
        import torch
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for param, grad in zip(params, grads):
            param.grad = flat[offset:offset + grad.numel()].view_as(grad).clone()
            offset += grad.numel()

    def sum(self, *values: float) -> tuple[float, ...]:
        """Each value summed over the ranks."""
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device())
        dist.all_reduce(tensor)
        return tuple(float(v) for v in tensor.tolist())

    def gather(self, value: float) -> list[float]:
        """`value` from every rank, in rank order."""
        import torch
        import torch.distributed as dist

        mine = torch.tensor([value], dtype=torch.float64, device=self.device())
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        return [float(v) for v in torch.cat(every).tolist()]

    def any(self, flag: bool) -> bool:
        return self.sum(1.0 if flag else 0.0)[0] > 0

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def device(self):
        import torch
        import torch.distributed as dist

        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def join() -> Ranks:
    """Join the run's process group from torchrun's environment."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(ranks.local_rank)  # "cuda" in the plan means this worker's card
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return ranks


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class StopFlag:
    """The training loop's stop event for a worker: set for every rank once rank 0 sees the
    launcher's stop request (one tiny all-reduce per step)."""

    def __init__(self, ranks: Ranks, run_dir: Path):
        self.ranks, self.request = ranks, Path(run_dir) / STOP_FILE

    def is_set(self) -> bool:
        return self.ranks.any(self.ranks.main and self.request.exists())


class ReadOnlyRun:
    """A run folder as ranks other than 0 see it: read as usual, written only by rank 0."""

    lock = None

    def __init__(self, run):
        self._run = run

    def __getattr__(self, name):
        return getattr(self._run, name)

    def append_event(self, event) -> None:
        pass

    def log(self, message: str) -> None:
        pass

    def write_status(self, *args, **kwargs) -> None:
        pass

    def write_plan(self, plan) -> None:
        pass

    def rewind_metrics(self, step: int) -> None:
        pass

    def prune_checkpoints(self) -> None:
        pass
