"""Which examples go into each micro-batch of an epoch, and which micro-batches into each step.

Three ways to batch, named by `Plan.batching`:
- "packed": whole examples packed into padding-free rows of `micro_batch x seq_len` tokens
  (`packing.pack_examples`), the bins visited in a seeded order per epoch;
- "grouped": `micro_batch` examples of similar length per padded batch (for models whose
  attention cannot keep packed examples apart);
- "random": `micro_batch` examples in plain shuffled order, padded to the longest (the standard
  recipe; only the throughput benchmark's baseline uses it).
The order of epoch `e` depends only on the seed, the epoch and the lengths, so a resumed run sees
exactly the batches the interrupted one would have.
"""

from __future__ import annotations

from app.core.config import Plan
from app.core.data.packing import epoch_bins, pack_examples

GROUP_WINDOW = 32  # micro-batches per window whose examples are sorted by length


def epoch_batches(lengths: list[int], micro_batch: int, seed: int, epoch: int,
                  group: bool = True) -> list[list[int]]:
    """Indices of the examples in each padded micro-batch of `epoch`, in training order."""
    import torch

    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not group:
        return [order[k:k + micro_batch] for k in range(0, len(order), micro_batch)]
    window = micro_batch * GROUP_WINDOW
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batches += [chunk[k:k + micro_batch] for k in range(0, len(chunk), micro_batch)]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


class EpochBatches:
    """The micro-batches of each epoch for one plan; packing is done once and kept."""

    def __init__(self, lengths: list[int], plan: Plan, seed: int | None):
        self.lengths, self.plan, self.seed = [min(n, plan.seq_len) for n in lengths], plan, seed
        self.bins = pack_examples(self.lengths, plan.micro_batch * plan.seq_len, seed) \
            if plan.batching == "packed" else None
        self._epoch, self._batches = -1, []

    def __len__(self) -> int:
        """Micro-batches per epoch."""
        if self.bins is not None:
            return len(self.bins)
        return -(-len(self.lengths) // self.plan.micro_batch)

    def for_step(self, step: int) -> list[list[int]]:
        """The micro-batches (lists of example indices) of optimizer step `step` (0-based)."""
        per_epoch = self.plan.steps_per_epoch
        epoch, index = divmod(step, per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
        return self._batches[slice(*step_bounds(len(self._batches), per_epoch, index))]

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self.bins is not None:
            return epoch_bins(self.bins, self.seed, epoch)
        return epoch_batches(self.lengths, self.plan.micro_batch, self.seed, epoch,
                             group=self.plan.batching != "random")


def step_bounds(batches: int, steps: int, index: int) -> tuple[int, int]:
    """[start, end) of step `index`'s micro-batches when `batches` are shared out over `steps`
    as evenly as possible (at least one each, so a back-off that changes the count is safe)."""
    if batches <= steps:
        at = min(index, batches - 1)
        return at, at + 1
    return index * batches // steps, (index + 1) * batches // steps


def micro_batches_per_epoch(lengths: list[int], plan: Plan, seed: int) -> int:
    """How many micro-batches one epoch of `lengths` makes under `plan` (packing counts bins;
    their number does not depend on the seed, so they are counted without torch)."""
    return len(EpochBatches(lengths, plan, None))
