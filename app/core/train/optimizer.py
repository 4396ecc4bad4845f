"""The optimizer a plan names, over the LoRA weights: bitsandbytes' paged 8-bit AdamW on CUDA,
torch's AdamW otherwise (and under FSDP, whose sharded weights the 8-bit one does not take)."""

from __future__ import annotations


def make_optimizer(name: str, params, lr: float, weight_decay: float):
    """The optimizer called `name` (Plan.optimizer) over `params`."""
    import torch

    if name == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
