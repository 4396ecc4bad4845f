"""FSDP-QLoRA: a model too big for one card, sharded over the cards of a run (issue 20).

PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) does the sharding: every decoder layer is
a group of its own (its 4-bit weights, stored in the compute dtype so that FSDP can cut them,
its norms and LoRA weights), gathered whole just before it runs and cut again after; the input
embeddings are another (unless tied to the lm_head). The root group is `StepLoss`, a module
around the loss: it holds the final norm and the lm_head, gathered from the start of the loss's
forward to the end of its backward, so that the fused losses, which read the lm_head's weight
directly, see it whole. Each card keeps its share of the LoRA weights, their gradients and the
optimizer state (torch AdamW over the shards: bitsandbytes' 8-bit optimizer does not take
FSDP's sharded tensors). FSDP averages the gradients over the cards; each rank's loss, normalised
by the whole step's target tokens, is multiplied by the number of cards (`gradient_scale`) so that
the average is exactly one process's gradient, as DDP's sum is (gloo has no pre-scaled sum to set
FSDP's divide factor with).

Every rank must run the same collectives: each runs as many forward/backward passes as the rank
with the most micro-batches of the step (a rank short of one adds a pass weighted zero), and each
evaluates every validation example.

Checkpoints: the LoRA weights gathered to rank 0 and written as the adapter, as with one process;
the optimizer state written by every rank into `optimizer/` with torch.distributed.checkpoint
(DCP: its own metadata file, and our MANIFEST over every shard), which loads onto another number
of cards too. rank 0 assembles the folder and renames it into place once every shard is written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from app.core.errors import ConfigError
from app.core.train.loss import loss_sum

OPTIMIZER_DIR = "optimizer"


def gradient_scale(ranks) -> float:
    """What each rank's loss is multiplied by under FSDP, which averages gradients over the ranks."""
    return float(ranks.world)


def StepLoss(model, device, loss: str):  # noqa: N802 - a module class, built lazily (torch imports)
    import torch

    class _StepLoss(torch.nn.Module):
        """The root FSDP module: the summed loss of one micro-batch."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, batch):
            return loss_sum(self.model, batch, device, loss)

    return _StepLoss()


def shard(model, plan, device):
    """`model` (the PEFT model, LoRA weights fp32) sharded over the run's cards; returns the root
    module (a StepLoss) whose forward gives a micro-batch's summed loss."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    base = model.get_base_model()
    for module in base.modules():  # bitsandbytes repacks a CPU weight at its first eval pass; a
        if hasattr(module, "support_avx512bf16_for_cpu"):  # shard's repacking would not last
            module.support_avx512bf16_for_cpu = False
    compute = getattr(torch, plan.compute_dtype)
    options = {"mp_policy": MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
               if device.type == "cuda" else MixedPrecisionPolicy(),
               "offload_policy": CPUOffloadPolicy() if plan.strategy == "fsdp-offload" else OffloadPolicy()}
    layers = decoder_layers(base)
    for layer in layers:
        fully_shard(layer, **options)
    embeddings, head = base.get_input_embeddings(), base.get_output_embeddings()
    if head is None or embeddings.weight is not head.weight:
        fully_shard(embeddings, **options)
    root = StepLoss(model, device, plan.loss)
    fully_shard(root, **options)
    return root, len(layers)


def decoder_layers(base) -> list:
    """The model's repeated blocks: the modules transformers keeps whole across devices."""
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [module for module in base.modules() if type(module).__name__ in names]
    if not layers:
        raise ConfigError(f"{type(base).__name__}: its decoder layers are not known to transformers, so FSDP "
                          "cannot shard it; train it on one card")
    return layers


def full_tensor(value):
    """A DTensor gathered whole (on every rank); any other tensor as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def gathered_lora(named_params: list[tuple[str, object]], main: bool) -> dict | None:
    """The LoRA weights whole, on the CPU, for rank 0 (None elsewhere); a collective."""
    weights = {}
    for name, param in named_params:
        whole = full_tensor(param.detach())
        if main:
            weights[name] = whole.cpu().clone()
    return weights if main else None


def load_lora(named_params: list[tuple[str, object]], weights: dict) -> None:
    """Each rank's shard of the saved whole LoRA weights (`weights`: names as in `named_params`,
    without the adapter name), cut locally."""
    import torch
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for name, param in named_params:
            whole = weights[adapter_key(name)].to(param.dtype)
            if hasattr(param, "device_mesh"):
                whole = distribute_tensor(whole.to(param.device), param.device_mesh, param.placements,
                                          src_data_rank=None)
                param.to_local().copy_(whole.to_local())
            else:
                param.copy_(whole)


def adapter_key(name: str, adapter: str = "default") -> str:
    """A parameter's name as PEFT writes it in adapter_model.safetensors."""
    return name.replace(f".{adapter}.", ".")


def save_optimizer(root, optimizer, ranks, staging: Path) -> None:
    """Every rank's share of the optimizer state into `staging` (a folder rank 0 empties first)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if ranks.main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    ranks.barrier()
    dcp.save({"optimizer": get_optimizer_state_dict(root, optimizer)}, checkpoint_id=os.fspath(staging))
    ranks.barrier()


def load_optimizer(root, optimizer, folder: Path) -> None:
    """The optimizer state saved by `save_optimizer`, resharded to this run's cards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(root, optimizer)}
    dcp.load(state, checkpoint_id=os.fspath(folder))
    set_optimizer_state_dict(root, optimizer, state["optimizer"])


def staging_for(path: Path) -> Path:
    """Where the ranks write a checkpoint's optimizer shards before rank 0 moves them in."""
    return path.parent / f".{path.name}.shards"
