"""Micro-batches: a deterministic, length-grouped order per epoch, and padding into tensors.

The order of epoch `e` depends only on the seed, the epoch and the lengths, so a resumed run
sees exactly the batches the interrupted one would have. Grouping examples of similar length
inside shuffled windows keeps padding low without sorting the whole epoch.
"""

from __future__ import annotations

from app.core.data.tokenize import IGNORE, Tokenized

GROUP_WINDOW = 32  # micro-batches per window whose examples are sorted by length


def epoch_batches(lengths: list[int], micro_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of the examples in each micro-batch of `epoch`, in training order."""
    import torch

    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = micro_batch * GROUP_WINDOW
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batches += [chunk[k:k + micro_batch] for k in range(0, len(chunk), micro_batch)]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def collate(examples: list[Tokenized], pad_id: int):
    """Right-pad a micro-batch: (input_ids, attention_mask, labels) as long tensors."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return ids, mask, labels
