"""Attention over a packed row: several examples in one row, each attending only to itself.

Three implementations with transformers' attention-function signature, registered with its
AttentionInterface by `register_packed_attention` under the names in `PACKED_ATTENTION`:
- `packed_loop`: causal SDPA once per example. No mask and no wasted work, but one kernel launch
  per example per layer; the fastest on the CPU (benchmarks/results/packed_attention-cpu.md).
- `packed_masked_sdpa`: one SDPA call per layer over the whole row with an additive block-diagonal
  causal mask (`block_causal_mask`), built once per batch in the compute dtype and shared by every
  layer. It computes the whole tokens x tokens square, but in one launch; the CUDA path for cards
  older than Ampere and for a torch without varlen attention.
- `packed_torch_flash`: torch's own FlashAttention varlen kernel (torch.nn.attention.varlen), which
  reads the examples' boundaries and needs no mask: one launch, no wasted work; CUDA sm80+ only.
`batched_path_for` says which one a device uses. Each reads `segments` ((start, end) per example)
or else `cu_seq_lens_q` from the forward kwargs (packed_kwargs); without either (not a
packed batch, e.g. generation) it is transformers' plain SDPA over the row.
"""

from __future__ import annotations

import functools

from app.core.plan.kernel_choice import VARLEN_ATTENTION

# Short name (what batched_path_for returns) -> the name registered with transformers.
PACKED_ATTENTION = {
    "loop": "tunesmith_packed_loop",
    "masked_sdpa": "tunesmith_packed_masked",
    "torch_flash": "tunesmith_packed_flash",
}
FLASH_CAPABILITY = (8, 0)  # torch's FlashAttention kernels need Ampere or newer
# Columns of the mask's allocation are a multiple of this, so that the memory-efficient SDPA
# kernel finds its strides aligned and uses the mask as it is instead of padding a copy per call.
MASK_ALIGNMENT = 16
_FLASH_MAX_HEAD_DIM = 256

_latest_mask: dict = {}  # (segments, dtype, device) -> mask; the latest batch's only


def batched_path_for(device_type: str, capability: tuple[int, int] | None) -> str:
    """The packed-row attention ("torch_flash", "masked_sdpa" or "loop") for a device type and,
    on CUDA, the card's compute capability (None when unknown)."""
    if device_type == "cuda":
        if capability is not None and tuple(capability) >= FLASH_CAPABILITY and torch_flash_available():
            return "torch_flash"
        return "masked_sdpa"
    # On the CPU the loop is the faster (benchmarks/results/packed_attention-cpu.md: one layer's
    # forward + backward in fp32, 2-core AVX-512 EPYC, heads 9/3 and 14/2 x 64, rows of 1,024 and
    # 4,096 tokens): the masked call took 1.0x the loop's time for one example and 2.1-6.7x for
    # 4-20 examples, since it computes the whole tokens x tokens square.
    return "loop"


def register_packed_attention() -> None:
    """Register the three functions with transformers' AttentionInterface (again is harmless; a
    different function registered earlier under one of our names is replaced)."""
    from transformers import AttentionInterface

    functions = {"loop": packed_loop, "masked_sdpa": packed_masked_sdpa, "torch_flash": packed_torch_flash}
    for short, name in PACKED_ATTENTION.items():
        current = AttentionInterface._global_mapping.get(name)
        if getattr(current, "__wrapped__", current) is not functions[short]:  # tiled_layer wraps ours
            AttentionInterface.register(name, functions[short])


def register_attention_functions() -> None:
    """Register our packed-row attention functions (packed_attention.py) with transformers, and
    the per-example loop under the name plans of earlier versions recorded."""
    from transformers import AttentionInterface

    register_packed_attention()
    current = AttentionInterface._global_mapping.get(VARLEN_ATTENTION)
    if getattr(current, "__wrapped__", current) is not packed_loop:  # tiled_layer wraps it
        AttentionInterface.register(VARLEN_ATTENTION, packed_loop)


def packed_kwargs(segments: tuple[tuple[int, int], ...], device) -> dict:
    """Forward kwargs telling the attention where each example of a packed row lies: our
    `segments`, and the cumulative lengths flash-attn's varlen kernel reads."""
    import torch

    bounds = torch.tensor([0] + [end for _, end in segments], dtype=torch.int32, device=device)
    longest = max(end - start for start, end in segments)
    return {"segments": segments, "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
            "max_length_q": longest, "max_length_k": longest}


def torch_flash_available() -> bool:
    """True when this torch has `torch.nn.attention.varlen.varlen_attn` and was built with
    FlashAttention (whether the card can run it is batched_path_for's question)."""
    return _torch_flash_available()


def packed_loop(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Causal SDPA within each example of a one-row packed batch, one call per example.

    query: (1, heads, tokens, dim); key/value: (1, kv_heads, tokens, dim). Returns the output as
    (1, tokens, heads, dim), the layout transformers' attention functions return, and None."""
    import torch
    import torch.nn.functional as F

    segments = _segments(query.shape[2], kwargs.pop("segments", ()), kwargs)
    if not segments:
        return _plain_sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    key, value = _repeat_kv(key, value, query.shape[1])
    parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                            dropout_p=dropout, is_causal=True, scale=scaling)
             for s, e in segments]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


def packed_masked_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """One SDPA call over the whole packed row with a block-diagonal causal mask; arguments and
    result as `packed_loop`'s. A row holding one example needs no mask (plain causal SDPA).

    Grouped-query heads are repeated rather than passed with enable_gqa: on CUDA the memory-
    efficient kernel (the one that takes a mask) has no grouped-query support in several torch
    releases, and SDPA would fall back to the math kernel, which materialises every head's
    scores; transformers' own SDPA path repeats them whenever there is a mask for the same reason."""
    import torch.nn.functional as F

    segments = _segments(query.shape[2], kwargs.pop("segments", ()), kwargs)
    if not segments:
        return _plain_sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    key, value = _repeat_kv(key, value, query.shape[1])
    if len(segments) == 1:
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True,
                                             scale=scaling)
    else:
        mask = block_causal_mask(segments, query.dtype, query.device)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                             scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def packed_torch_flash(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """torch's FlashAttention varlen kernel over the packed row, causal within each example;
    arguments and result as `packed_loop`'s. Reads `cu_seq_lens_q` and `max_length_q` when given
    (packed_kwargs puts them on the device once per batch), else derives them.

    Inputs the kernel cannot take go to `packed_masked_sdpa`, which gives the same result: a
    tensor not on CUDA, fp32, attention dropout (the kernel has none), a head dim over 256 or not
    a multiple of 8, or a non-default scale on a torch whose varlen_attn has no `scale`."""
    segments = _segments(query.shape[2], kwargs.pop("segments", ()), kwargs)
    if not segments:
        return _plain_sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    options = _flash_options(query, key, dropout, scaling)
    if options is None:
        return packed_masked_sdpa(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, segments=segments, **kwargs)
    from torch.nn.attention.varlen import varlen_attn

    if "enable_gqa" not in options:
        key, value = _repeat_kv(key, value, query.shape[1])
    bounds, longest = _bounds(segments, kwargs, query.device)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (tokens, heads, dim)
    out = varlen_attn(q, k, v, bounds, bounds, longest, longest, **options)
    return out.unsqueeze(0), None


def block_causal_mask(segments: tuple[tuple[int, int], ...], dtype, device):
    """The additive mask of a packed row, (1, 1, tokens, tokens): 0 where a token may attend (its
    own example, itself and before), -inf elsewhere, in `dtype` (the compute dtype, so SDPA uses
    it as it is). Built once per batch: the latest one is kept and returned to every layer, so
    all layers share one tensor, which autograd saves once. Its rows are allocated MASK_ALIGNMENT-
    padded and sliced back."""
    import torch

    key = (tuple((int(s), int(e)) for s, e in segments), dtype, torch.device(device))
    mask = _latest_mask.get(key)
    if mask is None:
        _latest_mask.clear()  # let the previous batch's mask go before allocating this one
        mask = _latest_mask[key] = _build_block_causal_mask(*key)
    return mask


def clear_mask_cache() -> None:
    """Drop the kept mask (tokens^2 elements of the compute dtype), e.g. when a run ends."""
    _latest_mask.clear()


# -- helpers ----------------------------------------------------------------------------------
def _build_block_causal_mask(segments: tuple[tuple[int, int], ...], dtype, device):
    import torch

    tokens = segments[-1][1]
    padded = -(-tokens // MASK_ALIGNMENT) * MASK_ALIGNMENT
    mask = torch.full((1, 1, tokens, padded), float("-inf"), dtype=dtype, device=device)[..., :tokens]
    for start, end in segments:
        mask[0, 0, start:end, start:end].triu_(1)  # 0 on and below the diagonal, -inf above
    return mask


def _segments(tokens: int, segments, kwargs: dict) -> tuple[tuple[int, int], ...]:
    """The row's examples as (start, end) from `segments` or `cu_seq_lens_q`; () when neither is
    given. Raises ValueError unless they tile the row's `tokens` exactly."""
    if not segments:
        bounds = kwargs.get("cu_seq_lens_q")
        if bounds is None:
            return ()
        bounds = [int(b) for b in (bounds.tolist() if hasattr(bounds, "tolist") else bounds)]
        segments = tuple(zip(bounds[:-1], bounds[1:]))
    at = 0
    for start, end in segments:
        if start != at or end <= start:
            break
        at = end
    else:
        if at == tokens:
            return segments if isinstance(segments, tuple) else tuple(map(tuple, segments))
    raise ValueError(f"packed segments {tuple(segments)[:6]}... do not tile the row of {tokens} tokens: "
                     "each example must start where the previous one ended, from 0 to the row's end")


def _repeat_kv(key, value, heads: int):
    """key/value with each kv head repeated for its group of query heads (as a view when it can)."""
    groups = heads // key.shape[1]
    if groups == 1:
        return key, value
    repeat = lambda t: t[:, :, None].expand(t.shape[0], t.shape[1], groups, *t.shape[2:]).reshape(  # noqa: E731
        t.shape[0], heads, *t.shape[2:])
    return repeat(key), repeat(value)


def _bounds(segments, kwargs: dict, device):
    """(cu_seq_lens as int32 on `device`, the longest example's length) for varlen_attn."""
    import torch

    bounds = kwargs.get("cu_seq_lens_q")
    if not (isinstance(bounds, torch.Tensor) and bounds.device == device and bounds.dtype == torch.int32):
        bounds = torch.tensor([0] + [end for _, end in segments], dtype=torch.int32, device=device)
    longest = kwargs.get("max_length_q")
    if not isinstance(longest, int):
        longest = max(end - start for start, end in segments)
    return bounds, longest


def _flash_options(query, key, dropout: float, scaling) -> dict | None:
    """varlen_attn's keyword arguments for causal attention with these inputs, or None when the
    kernel cannot take them. Written against each signature torch has shipped: 2.9 has
    `is_causal` and no scale or grouped-query support; later ones `window_size`, `scale`, `enable_gqa`."""
    import torch

    head_dim = query.shape[-1]
    if (not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16) or dropout
            or head_dim > _FLASH_MAX_HEAD_DIM or head_dim % 8 or not torch_flash_available()):
        return None
    parameters = _varlen_parameters()
    options = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    if "scale" in parameters:
        options["scale"] = scaling
    elif scaling is not None and abs(scaling - head_dim ** -0.5) > 1e-6 * head_dim ** -0.5:
        return None
    if key.shape[1] != query.shape[1] and "enable_gqa" in parameters:
        options["enable_gqa"] = True
    return options


@functools.cache
def _torch_flash_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    import torch

    built_with_flash = getattr(torch.backends.cuda, "is_flash_attention_available", None)
    return built_with_flash is None or bool(built_with_flash())


@functools.cache
def _varlen_parameters() -> frozenset[str]:
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _plain_sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs: dict):
    """Not a packed batch: transformers' SDPA over the whole row, as the model would run it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)
