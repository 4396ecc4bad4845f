"""Checkpointed decoder layers over sequence tiles: all of a layer but attention itself, tile by tile.

With checkpoints offloaded and the MLP over tiles, what is left of a long sequence on the card is
the recompute of one layer in backward: its norms (kept in fp32), the q/k/v/o projections' inputs
and their LoRA dropout copies, the residual stream, each the full length. Everything in a decoder
layer works on each token alone except the attention core, so `tile_layers` gives each
checkpointed layer a checkpoint function of ours that runs the layer in three kinds of pass over
tiles of the sequence, meeting the attention function (transformers' AttentionInterface, which we
wrap) in the middle:

- *capture*: the layer runs up to its attention call for one tile, the tile's query, key and
  value (after the norms, projections and RoPE) are kept and the rest is skipped;
- the attention core runs once over the whole sequence (the real attention function, with the
  real mask and packing arguments);
- *replay*: the layer runs for one tile again, the attention call answering with that tile's
  rows of the whole sequence's attention output, and the rest of the layer (o_proj, the
  residual, the second norm, the MLP) follows.

Forward: capture every tile, attend, replay every tile, all without autograd; the input is kept
(in host RAM when offloaded, as in offload.py). Backward: capture again, attend with autograd,
replay each tile with autograd and backpropagate it (the gradient of the layer's input through the
residual and of the attention output), backpropagate the attention core, then capture each tile
with autograd and backpropagate the query, key and value gradients into it. The LoRA weights'
gradients go into `.grad`, as a reentrant checkpoint does. The random state is kept per tile and
pass, so LoRA dropout draws the forward's masks. Full-length tensors on the card at once: the
query, key and value, the attention output, their gradients and the input's: about 20 bytes per
token per hidden unit in 16-bit, not the ~57 of a whole layer's recompute.

The cost: the tiles' norms and q/k/v projections run twice more per layer in backward and once
more in forward (~10 % of a Llama layer's compute; benchmarks/results/long_context-cpu.md).
Results equal the untiled layer's up to float summation order (tests/core/test_tiled_layer.py).
"""

from __future__ import annotations

import functools
from contextvars import ContextVar
from functools import partial

from app.core.train.memory_savers.offload import offloaded_checkpoint, restored_host_input, to_host_if
from app.core.train.memory_savers.tiled_mlp import restored_rng, rng_state

_PASS: ContextVar = ContextVar("tiled_layer_pass", default=None)


class NotTileable(Exception):
    """Why a model's layers cannot run over tiles (the note says it; the layers stay untiled)."""


def tile_layers(model, tile_tokens: int, to_host: bool) -> int:
    """Give every checkpointed dense decoder layer of `model` the tiled checkpoint function
    (`tile_tokens` per tile, the input in host RAM when `to_host`); returns how many. Raises
    NotTileable with the reason when this model's attention cannot be met tile by tile."""
    from transformers import AttentionInterface
    from transformers.modeling_layers import GradientCheckpointingLayer

    config = getattr(model, "config", None)
    name = getattr(config, "_attn_implementation", None)
    if not name or name == "eager" or name not in AttentionInterface._global_mapping:
        raise NotTileable(f"the {name or 'default'} attention is not a registered attention function we can meet "
                          "(eager attention, e.g. Gemma 2's soft-capping, is called directly)")
    layers = [m for m in model.modules()
              if isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False)]
    if any(hasattr(getattr(m, "mlp", None), "experts") or hasattr(m, "block_sparse_moe") for m in layers):
        raise NotTileable("MoE layers are not tiled yet (their routers are untested over tiles)")
    for module in layers:
        module._gradient_checkpointing_func = partial(tiled_checkpoint, tile_tokens=tile_tokens, to_host=to_host)
    if layers:
        wrap_attention_function(name)
    return len(layers)


def wrap_attention_function(name: str) -> None:
    """Register our wrapper around the attention function `name` (once): outside a tiled pass it
    only calls the function."""
    from transformers import AttentionInterface

    function = AttentionInterface._global_mapping[name]
    if getattr(function, "_meets_tiles", False):
        return

    @functools.wraps(function)
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        tiles = _PASS.get()
        if tiles is None:
            return function(module, query, key, value, attention_mask, *args, **kwargs)
        return tiles.meet(function, module, query, key, value, attention_mask, args, kwargs)

    attention._meets_tiles = True
    AttentionInterface.register(name, attention)


def tiled_checkpoint(function, hidden, *args, tile_tokens: int, to_host: bool):
    """What torch.utils.checkpoint.checkpoint(function, hidden, *args) computes, over tiles of
    `tile_tokens` tokens but for attention. Falls back to offload.py's untiled checkpoint for
    sequences of one tile and layers called in a way we do not know."""
    import torch

    keywords = getattr(function, "keywords", None)
    if (not torch.is_tensor(hidden) or hidden.dim() != 3 or hidden.shape[-2] <= tile_tokens
            or not isinstance(keywords, dict) or keywords.get("position_embeddings") is None
            or any(torch.is_tensor(a) for a in args)):
        return offloaded_checkpoint(function, hidden, *args, to_host=to_host)
    if not hidden.requires_grad:  # the first layer's input (frozen embeddings): still run backward
        hidden = hidden.detach().requires_grad_(True)
    return _tiled_layer_function().apply(_Layer(function, hidden.shape[-2], tile_tokens), to_host, hidden, *args)


class _Captured(Exception):
    """Raised by the attention wrapper once a tile's query, key and value are kept."""


class _Capture:
    """A capture pass: the tile's query, key and value are kept and the layer stops there."""

    def __init__(self):
        self.qkv = None
        self.call = None  # (function, module, mask, args, kwargs) of the whole sequence's attention

    def meet(self, function, module, query, key, value, mask, args, kwargs):
        self.qkv, self.call = (query, key, value), (function, module, mask, args, kwargs)
        raise _Captured


class _Replay:
    """A replay pass: the attention call answers with the tile's rows of the whole output."""

    def __init__(self, out):
        self.out = out

    def meet(self, function, module, query, key, value, mask, args, kwargs):
        return self.out, None


class _Layer:
    """One decoder layer's forward (transformers' partial of it, keywords bound), cut at its attention."""

    def __init__(self, function, tokens: int, tile_tokens: int):
        self.function, self.tokens, self.tile_tokens = function, tokens, tile_tokens
        self.starts = list(range(0, tokens, tile_tokens))
        self.call = None

    def rows(self, start: int) -> slice:
        return slice(start, min(start + self.tile_tokens, self.tokens))

    def _run(self, part, start: int, meeting, args):
        """The layer's forward on `part`, the tile at `start`: position embeddings cut to the tile;
        masks and packing arguments stay whole (only attention reads them, over the whole sequence)."""
        rows = self.rows(start)
        keywords = dict(self.function.keywords)
        keywords["position_embeddings"] = _cut(keywords["position_embeddings"], rows.start, rows.stop, self.tokens)
        token = _PASS.set(meeting)
        try:
            return self.function.func(*self.function.args, part, *args, **keywords)
        finally:
            _PASS.reset(token)

    def capture(self, part, start: int, args):
        """(query, key, value) of the tile `part` at `start` (with autograd if it is on)."""
        probe = _Capture()
        try:
            self._run(part, start, probe, args)
        except _Captured:
            pass
        if probe.qkv is None:
            raise RuntimeError("tiled layer: the attention function was not met (was it registered again "
                               "after tile_layers?); train without --layer-tile")
        self.call = probe.call
        return probe.qkv

    def attend(self, query, key, value):
        """The attention core over the whole sequence, as the layer called it."""
        function, module, mask, args, kwargs = self.call
        return function(module, query, key, value, mask, *args, **kwargs)[0]

    def replay(self, part, out, start: int, args):
        """The layer's output for the tile `part` at `start`, `out` answering its attention call.
        Where the attention module ends the way transformers' do (o_proj of the output, returned
        with the weights), it is skipped to that end: the tile's norm and q/k/v would be wasted."""
        attention = getattr(self.function.args[0] if self.function.args else None, "self_attn", None)
        if attention is not None and _ends_in_o_proj(type(attention)):
            attention.forward = lambda hidden_states, *a, **k: (
                attention.o_proj(out.reshape(*hidden_states.shape[:-1], -1)), None)
        try:
            output = self._run(part, start, _Replay(out), args)
        finally:
            if attention is not None:
                attention.__dict__.pop("forward", None)
        return output[0] if isinstance(output, tuple) else output


@functools.cache
def _ends_in_o_proj(attention_class) -> bool:
    """Whether `attention_class.forward` ends `attn_output = self.o_proj(attn_output); return
    attn_output, attn_weights` after the attention call, as transformers' Llama-family modules do."""
    import inspect

    try:
        source = inspect.getsource(attention_class.forward)
    except (OSError, TypeError):
        return False
    tail = source[source.rfind("attention_interface("):]
    return (source.count("attention_interface(") == 1 and "attn_output = self.o_proj(attn_output)" in tail
            and tail.rstrip().endswith("return attn_output, attn_weights"))


def _cut(embeddings, start: int, end: int, tokens: int):
    """The rows start:end of position embeddings (a tensor or a tuple of them, tokens on dim -2)."""
    if isinstance(embeddings, (tuple, list)):
        return type(embeddings)(_cut(e, start, end, tokens) for e in embeddings)
    if embeddings.dim() >= 2 and embeddings.shape[-2] == tokens:
        return embeddings[..., start:end, :]
    return embeddings


def _gather(layer, hidden, args, states):
    """Capture every tile: in forward (`states` empty) keeping the random state each starts
    from, in backward from the state kept."""
    import torch

    parts, recording = [], not states
    for index, start in enumerate(layer.starts):
        part = hidden[:, layer.rows(start)]
        if recording:
            states.append(rng_state(hidden.device))
            parts.append(layer.capture(part, start, args))
        else:
            with restored_rng(states[index], hidden.device):
                parts.append(layer.capture(part, start, args))
    return [torch.cat(column, dim=2) for column in zip(*parts)]  # (batch, heads, tokens, dim)


def _replay_backward(ctx, hidden, out, grad):
    """Backward of o_proj, the residual, the norm and the MLP, tile by tile: (the gradient of the
    layer's input so far, the gradient of the attention output)."""
    import torch

    layer, args = ctx.layer, ctx.args
    grad_out, grad_hidden = torch.empty_like(out), torch.empty_like(hidden)
    for start, state in zip(layer.starts, ctx.replays):
        rows = layer.rows(start)
        part = hidden[:, rows].detach().requires_grad_(True)
        part_out = out[:, rows].detach().requires_grad_(True)
        with torch.enable_grad(), restored_rng(state, ctx.device):
            output = layer.replay(part, part_out, start, args)
        torch.autograd.backward(output, grad[:, rows])
        grad_hidden[:, rows].copy_(part.grad)
        grad_out[:, rows].copy_(part_out.grad)
        del output, part, part_out
    return grad_hidden, grad_out


def _capture_backward(ctx, hidden, grads, grad_hidden) -> None:
    """Backward of the norm, the q/k/v projections and RoPE, tile by tile, added into `grad_hidden`."""
    import torch

    layer, args = ctx.layer, ctx.args
    for start, state in zip(layer.starts, ctx.captures):
        rows = layer.rows(start)
        part = hidden[:, rows].detach().requires_grad_(True)
        with torch.enable_grad(), restored_rng(state, ctx.device):
            tile_qkv = layer.capture(part, start, args)
        torch.autograd.backward(list(tile_qkv), [g[:, :, rows] for g in grads])
        grad_hidden[:, rows].add_(part.grad)
        del tile_qkv, part


@functools.cache
def _tiled_layer_function():
    """Built on first use so that importing this module does not import torch."""
    import torch

    class _TiledLayer(torch.autograd.Function):
        @staticmethod
        def forward(ctx, layer, to_host, hidden, *args):
            ctx.layer, ctx.args, ctx.device = layer, args, hidden.device
            ctx.captures, ctx.replays = [], []
            with torch.no_grad():
                query, key, value = _gather(layer, hidden, args, ctx.captures)
                ctx.attention = rng_state(hidden.device)
                out = layer.attend(query, key, value)
                del query, key, value
                outputs = []
                for start in layer.starts:
                    ctx.replays.append(rng_state(hidden.device))
                    rows = layer.rows(start)
                    outputs.append(layer.replay(hidden[:, rows], out[:, rows], start, args))
            ctx.kept, ctx.copied = to_host_if(to_host, hidden.detach())
            return torch.cat(outputs, dim=-2)

        @staticmethod
        def backward(ctx, grad):
            hidden = restored_host_input(ctx)
            with torch.no_grad():
                qkv = _gather(ctx.layer, hidden, ctx.args, ctx.captures)
            qkv = [t.detach().requires_grad_(True) for t in qkv]
            with torch.enable_grad(), restored_rng(ctx.attention, ctx.device):
                out = ctx.layer.attend(*qkv)
            grad_hidden, grad_out = _replay_backward(ctx, hidden, out, grad)
            torch.autograd.backward(out, grad_out)  # the attention core, over the whole sequence
            grads = [t.grad for t in qkv]
            del out, grad_out, qkv
            _capture_backward(ctx, hidden, grads, grad_hidden)
            return (None, None, grad_hidden) + (None,) * len(ctx.args)

    return _TiledLayer
