"""Padding-free micro-batches: whole examples packed into rows of at most `budget` tokens.

`pack_examples` bins the examples once per run (best-fit decreasing, ties broken by a seeded
shuffle), so every bin is nearly full and the number of bins, hence the steps of an epoch, is
known before training starts. Each epoch visits the same bins in a seeded order of its own
(`epoch_bins`), so a resumed run sees exactly the batches the interrupted one would have.

A packed row keeps its examples apart: positions restart at 0 for each example, the attention
kernel is told where each example starts (`cu_seqlens`), and the last token of an example never
learns to predict the first token of the next one (`Batch.targets`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from app.core.data.tokenize import IGNORE, Tokenized


@dataclass
class Batch:
    """One micro-batch as tensors. `targets[t]` is the token position t must predict (or IGNORE).

    Packed: one row, `position_ids` restart per example and `segments` lists each example's
    (start, end). Padded: `attention_mask` marks the real tokens and `segments` is empty. With
    `pairs`, the sequences (segments, or rows) are preference pairs' sides: chosen, rejected, chosen, ..."""

    input_ids: object
    targets: object
    attention_mask: object | None = None
    position_ids: object | None = None
    segments: tuple[tuple[int, int], ...] = ()
    pairs: bool = False
    reference: object | None = None  # DPO: (pairs, 2) reference log-probs of each side (train/preference.py)

    def sequence_of(self):
        """For each position of `targets`, the index of its sequence (segment or row), as a flat tensor."""
        import torch

        if self.packed:
            index = torch.zeros(self.targets.shape[-1], dtype=torch.long)
            for number, (start, end) in enumerate(self.segments):
                index[start:end] = number
            return index
        rows, width = self.targets.shape
        return torch.arange(rows).repeat_interleave(width)

    @property
    def sequences(self) -> int:
        return len(self.segments) if self.packed else int(self.targets.shape[0])

    @property
    def packed(self) -> bool:
        return bool(self.segments)

    @property
    def real_tokens(self) -> int:
        if self.attention_mask is not None:
            return int(self.attention_mask.sum())
        return int(self.input_ids.numel())

    @property
    def trained_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())


def pack_examples(lengths: list[int], budget: int, seed: int | None) -> list[list[int]]:
    """Indices of the examples in each bin; no bin holds more than `budget` tokens.

    Best-fit decreasing: the longest example first, each into the bin whose free space fits it
    most tightly, a new bin when none does. Examples longer than `budget` get a bin of their own
    (the trainer truncates to the sequence length first, so that does not happen in training).
    `seed` None keeps ties in index order: the same number and fill of bins (examples of equal
    length are interchangeable), without importing torch, for counting steps in a plan."""
    if seed is None:
        tie = list(range(len(lengths)))
    else:
        import torch

        tie = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], tie[i]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, bin index), sorted
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            room = budget - lengths[i]
            if room > 0:
                bisect.insort(free, (room, len(bins) - 1))
            continue
        room, index = free.pop(at)
        bins[index].append(i)
        room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, index))
    return bins


def epoch_bins(bins: list[list[int]], seed: int, epoch: int) -> list[list[int]]:
    """The bins in the order epoch `epoch` trains them."""
    import torch

    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return [bins[i] for i in torch.randperm(len(bins), generator=generator).tolist()]


def next_token_targets(labels: list[int]) -> list[int]:
    """What each position learns to predict: the next label, and nothing at the last position."""
    return labels[1:] + [IGNORE]


def collate_packed(examples: list[Tokenized]) -> Batch:
    """One row of concatenated examples with per-example positions and targets; no padding."""
    import torch

    ids, targets, positions, segments, start = [], [], [], [], 0
    for sequence in _sequences(examples):
        n = len(sequence.input_ids)
        ids += sequence.input_ids
        targets += next_token_targets(sequence.labels)
        positions += range(n)
        segments.append((start, start + n))
        start += n
    row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
    return Batch(row(ids), row(targets), position_ids=row(positions), segments=tuple(segments),
                 pairs=bool(examples[0].split))


def _sequences(examples: list[Tokenized]) -> list[Tokenized]:
    """The sequences of a micro-batch: each example, or each pair's chosen and rejected side."""
    return [example.side(i) for example in examples for i in range(len(example.sides()))]


def collate_padded(examples: list[Tokenized], pad_id: int) -> Batch:
    """Right-padded rows, as wide as the longest example (a pair: two rows), with an attention mask."""
    import torch

    pairs = bool(examples[0].split)
    examples = _sequences(examples)
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        targets[row, :n] = torch.tensor(next_token_targets(example.labels))
    return Batch(ids, targets, attention_mask=mask, pairs=pairs)
