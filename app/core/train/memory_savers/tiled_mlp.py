"""The MLP over sequence tiles: one layer's largest tensors no longer grow with the whole length.

At long lengths the biggest tensors a decoder layer makes are its MLP's intermediates (tokens x
intermediate size, several of them: gate, up, the activation, their product, LoRA's inputs), held
for backward, and made again when a checkpointed layer is recomputed. The MLP works on each token
alone, so it can run over tiles of the sequence: the autograd function here runs the module's
own forward tile by tile without keeping anything but its input, and in backward runs each tile
again with autograd and backpropagates through it, tile by tile, adding the LoRA weights' gradients into `.grad` (as
ArcticTraining's and Unsloth's tiled MLPs do). The random state is kept per tile, so LoRA dropout
draws the same masks in the backward's rerun as in the forward.

The result equals the untiled MLP's up to float summation order (tests/core/test_tiled_mlp.py);
the cost is one more MLP forward per layer in backward.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from functools import partial


def tile_mlps(model, tile_tokens: int) -> int:
    """Make every dense decoder-layer MLP of `model` (PEFT-wrapped or not) run over tiles of
    `tile_tokens` tokens when it trains on a longer sequence; returns how many it changed. MoE
    blocks are left alone (their routers see the whole batch)."""
    if tile_tokens <= 0:
        return 0
    changed = 0
    for name, module in model.named_modules():
        if name.endswith(".mlp") and hasattr(module, "down_proj") and not hasattr(module, "experts"):
            if getattr(module, "_tiled_forward_of", None) is None:
                module._tiled_forward_of = module.forward
            module.forward = partial(_tiled, module, module._tiled_forward_of, tile_tokens)
            changed += 1
    return changed


def _tiled(module, forward, tile_tokens: int, hidden):
    import torch

    if not torch.is_grad_enabled() or hidden.shape[-2] <= tile_tokens:
        return forward(hidden)  # generation, eval and short sequences: nothing to gain
    params = [p for p in module.parameters() if p.requires_grad]
    return _tiled_mlp_function().apply(forward, tile_tokens, hidden, *params)


@functools.cache
def _tiled_mlp_function():
    """Built on first use so that importing this module does not import torch."""
    import torch

    class _TiledMLP(torch.autograd.Function):
        @staticmethod
        def forward(ctx, forward, tile_tokens, hidden, *params):
            ctx.forward, ctx.tile_tokens = forward, tile_tokens
            ctx.save_for_backward(hidden)
            ctx.states, outputs = [], []
            with torch.no_grad():
                for part in hidden.split(tile_tokens, dim=-2):
                    ctx.states.append(rng_state(hidden.device))
                    outputs.append(forward(part))
            return torch.cat(outputs, dim=-2)

        @staticmethod
        def backward(ctx, grad):
            (hidden,) = ctx.saved_tensors
            grad_hidden = torch.empty_like(hidden)
            tiles = zip(hidden.split(ctx.tile_tokens, dim=-2), grad.split(ctx.tile_tokens, dim=-2),
                        grad_hidden.split(ctx.tile_tokens, dim=-2), ctx.states)
            for part, part_grad, into, state in tiles:
                part = part.detach().requires_grad_(True)
                with torch.enable_grad(), restored_rng(state, hidden.device):
                    output = ctx.forward(part)
                torch.autograd.backward(output, part_grad)  # the LoRA weights' gradients go into .grad
                into.copy_(part.grad)
            return (None, None, grad_hidden) + (None,) * (len(ctx.needs_input_grad) - 3)

    return _TiledMLP


def rng_state(device):
    import torch

    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextmanager
def restored_rng(state, device):
    import torch

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield
