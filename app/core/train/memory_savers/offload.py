"""Offloaded activation checkpoints: each checkpointed layer's input waits in CPU RAM, not on the card.

With gradient checkpointing a decoder layer keeps only its input for backward (tokens x hidden x
2 bytes: 256 MB a layer for an 8B model at 32k tokens, 8 GB over 32 layers). `offload_checkpoints`
gives each checkpointed layer a checkpoint function of ours instead of torch's: the layer runs
without autograd, its input is copied to pinned host memory on a side stream (so the copy overlaps
the next layers' compute) and freed on the card; in backward it is copied back, the layer runs again
with autograd and backpropagates, the LoRA weights' gradients going into `.grad` (as a reentrant
checkpoint does; Unsloth's offloaded checkpointing works the same way). The random state is kept,
so LoRA dropout draws the same masks in the rerun.

On the CPU there is no card to free: `to_host` is off and the same function keeps the input where
it is, so the path still runs in tests (tests/core/test_offload.py), where `to_host` on the CPU
copies into a separate tensor to exercise the copy.
"""

from __future__ import annotations

import functools
from functools import partial

from app.core.train.memory_savers.tiled_mlp import restored_rng, rng_state


def offload_checkpoints(model, to_host: bool) -> int:
    """Give every checkpointed decoder layer of `model` the offloading checkpoint function;
    returns how many. Checkpointing must be on already."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    count = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = partial(offloaded_checkpoint, to_host=to_host)
            count += 1
    return count


def offloaded_checkpoint(function, hidden, *args, to_host: bool = True):
    """What torch.utils.checkpoint.checkpoint(function, hidden, *args) computes, the input kept
    on the host in between."""
    import torch

    if not torch.is_tensor(hidden) or any(torch.is_tensor(a) and a.requires_grad for a in args):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(function, hidden, *args, use_reentrant=False)
    if not hidden.requires_grad:  # the first layer's input (frozen embeddings): still run backward
        hidden = hidden.detach().requires_grad_(True)
    return _offloaded_layer_function().apply(function, to_host, hidden, *args)


@functools.cache
def _offloaded_layer_function():
    """Built on first use so that importing this module does not import torch."""
    import torch

    class _OffloadedLayer(torch.autograd.Function):
        @staticmethod
        def forward(ctx, function, to_host, hidden, *args):
            ctx.function, ctx.args, ctx.device = function, args, hidden.device
            ctx.rng = rng_state(hidden.device)
            ctx.kept, ctx.copied = to_host_if(to_host, hidden.detach())
            with torch.no_grad():
                return function(hidden, *args)

        @staticmethod
        def backward(ctx, *grads):
            hidden = restored_host_input(ctx).requires_grad_(True)
            with torch.enable_grad(), restored_rng(ctx.rng, ctx.device):
                outputs = ctx.function(hidden, *ctx.args)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            pairs = [(o, g) for o, g in zip(outputs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            return (None, None, hidden.grad) + (None,) * len(ctx.args)

    return _OffloadedLayer


def to_host_if(to_host: bool, hidden):
    """(what a checkpoint keeps of `hidden`, the event its copy to the host ends with or None):
    the host copy when `to_host`, else `hidden` itself."""
    return _to_host(hidden) if to_host else (hidden, None)


def restored_host_input(ctx):
    """The kept input back on its device, detached (`ctx.kept`, `ctx.copied`, `ctx.device` as
    forward left them); the context lets go of it."""
    if ctx.copied is not None:
        ctx.copied.synchronize()  # the copy to the host is done before it is read
    hidden = ctx.kept.to(ctx.device, non_blocking=True).detach()
    ctx.kept = None
    return hidden


def _to_host(hidden):
    """(a host copy of `hidden`, the CUDA event that marks the copy done, or None on the CPU)."""
    import torch

    if hidden.device.type != "cuda":
        return hidden.clone(), None  # the copy path, exercised on the CPU
    stream = _copy_stream(hidden.device)
    stream.wait_stream(torch.cuda.current_stream(hidden.device))  # hidden is written before it is read
    with torch.cuda.stream(stream):
        host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
        host.copy_(hidden, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    hidden.record_stream(stream)  # the allocator must not reuse it before the copy ends
    return host, done


_STREAMS: dict = {}


def _copy_stream(device):
    import torch

    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]
