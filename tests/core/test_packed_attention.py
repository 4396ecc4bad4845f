"""Packed-row attention: one batched call per layer must give what causal SDPA per example gives."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from app.core.data.packing import collate_packed
from app.core.data.tokenize import IGNORE, Tokenized
from app.core.train.memory_savers import packed_attention
from app.core.train.memory_savers.packed_attention import (PACKED_ATTENTION, batched_path_for, block_causal_mask, packed_loop,
                                             packed_masked_sdpa, packed_torch_flash, register_packed_attention,
                                             torch_flash_available)
from test_packing import session  # noqa: F401 - the tiny 4-bit Llama with LoRA, as a packed run trains it

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def split(tokens: int, count: int, seed: int = 0) -> tuple[tuple[int, int], ...]:
    """`count` examples of uneven lengths filling a row of `tokens`."""
    cuts = sorted(random.Random(seed).sample(range(1, tokens), count - 1))
    bounds = [0, *cuts, tokens]
    return tuple(zip(bounds[:-1], bounds[1:]))


def attention_layer(heads: int, kv_heads: int):
    """The attributes of an attention layer that transformers' SDPA function reads."""
    return SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=False)


def run(function, q, k, v, segments, scaling=None, **kwargs):
    """Output and q/k/v gradients of `function` under a fixed random upstream gradient."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, weights = function(attention_layer(q.shape[1], k.shape[1]), q, k, v, None, dropout=0.0,
                            scaling=scaling, segments=segments, **kwargs)
    assert weights is None
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    (out.float() * upstream.float()).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def largest_error(got, expected) -> float:
    """max |got - expected| as a fraction of max |expected|."""
    return float((got.float() - expected.float()).abs().max() / expected.float().abs().max())


def random_qkv(heads, kv_heads, tokens, dim=16, seed=0, **to):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, tokens, dim, generator=generator).to(**to) for h in (heads, kv_heads, kv_heads)]


@pytest.mark.parametrize("count", [1, 2, 20])
@pytest.mark.parametrize("heads,kv_heads,scaling", [(4, 4, None), (6, 2, None), (6, 3, 0.3)])
def test_masked_call_equals_the_loop_outputs_and_gradients(count, heads, kv_heads, scaling):
    q, k, v = random_qkv(heads, kv_heads, tokens=300)
    segments = split(300, count)
    expected = run(packed_loop, q, k, v, segments, scaling)
    got = run(packed_masked_sdpa, q, k, v, segments, scaling)
    assert got[0].shape == (1, 300, heads, 16)
    for name, g, e in zip(("output", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()), msg=name)


def test_the_comparison_catches_examples_that_see_each_other(monkeypatch):
    """The test above can fail: with a plain causal mask (examples see the ones before them) the
    masked call no longer equals the loop, by far more than its tolerance."""
    def plain_causal(segments, dtype, device):
        tokens = segments[-1][1]
        return torch.full((1, 1, tokens, tokens), float("-inf"), dtype=dtype, device=device).triu_(1)

    monkeypatch.setattr(packed_attention, "_build_block_causal_mask", plain_causal)
    packed_attention.clear_mask_cache()
    q, k, v = random_qkv(6, 2, tokens=300)
    segments = split(300, 20)
    expected = run(packed_loop, q, k, v, segments)
    got = run(packed_masked_sdpa, q, k, v, segments)
    packed_attention.clear_mask_cache()
    assert largest_error(got[0], expected[0]) > 1e-2
    assert largest_error(got[2], expected[2]) > 1e-2


def test_block_causal_mask_lets_each_token_see_its_own_example_up_to_itself():
    segments = ((0, 3), (3, 4), (4, 21))
    mask = block_causal_mask(segments, torch.float16, "cpu")
    assert mask.shape == (1, 1, 21, 21) and mask.dtype == torch.float16
    # rows allocated 32 wide: strides a multiple of 16, so the memory-efficient kernel takes it as is
    assert mask.stride(-1) == 1 and all(s % packed_attention.MASK_ALIGNMENT == 0 for s in mask.stride()[:-1])
    example = torch.tensor([i for i, (s, e) in enumerate(segments) for _ in range(s, e)])
    position = torch.arange(21)
    allowed = (example[:, None] == example[None, :]) & (position[None, :] <= position[:, None])
    assert torch.equal(mask[0, 0] == 0, allowed)
    assert torch.isneginf(mask[0, 0][~allowed]).all()
    assert block_causal_mask(segments, torch.float16, "cpu") is mask
    assert block_causal_mask(segments, torch.float32, "cpu") is not mask
    packed_attention.clear_mask_cache()


def test_boundaries_from_cu_seq_lens_alone_give_the_same_result():
    q, k, v = random_qkv(4, 2, tokens=50)
    segments = ((0, 20), (20, 21), (21, 50))
    bounds = torch.tensor([0, 20, 21, 50], dtype=torch.int32)
    for function in (packed_loop, packed_masked_sdpa, packed_torch_flash):
        from_segments = run(function, q, k, v, segments)[0]
        from_bounds = run(function, q, k, v, (), cu_seq_lens_q=bounds, cu_seq_lens_k=bounds,
                          max_length_q=29, max_length_k=29)[0]
        torch.testing.assert_close(from_bounds, from_segments, rtol=0, atol=0)


def test_without_boundaries_attention_is_plain_causal_sdpa_over_the_row():
    q, k, v = random_qkv(4, 2, tokens=40)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), is_causal=True).transpose(1, 2)
    for function in (packed_loop, packed_masked_sdpa, packed_torch_flash):
        torch.testing.assert_close(run(function, q, k, v, ())[0], expected, rtol=1e-5, atol=1e-6)


def test_segments_that_do_not_tile_the_row_are_refused():
    q, k, v = random_qkv(4, 4, tokens=10)
    for segments in (((0, 4), (5, 10)), ((0, 4), (4, 9)), ((1, 10),)):
        for function in (packed_loop, packed_masked_sdpa):
            with pytest.raises(ValueError, match="do not tile the row of 10 tokens"):
                function(attention_layer(4, 4), q, k, v, None, segments=segments)


def test_torch_flash_takes_what_its_kernel_cannot_to_the_masked_call():
    """On the CPU (and for fp32, dropout, odd head dims on CUDA) the flash function gives the
    masked call's result instead of failing."""
    q, k, v = random_qkv(6, 2, tokens=120)
    segments = split(120, 5)
    expected = run(packed_loop, q, k, v, segments)
    got = run(packed_torch_flash, q, k, v, segments)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))


def test_batched_path_for_each_device(monkeypatch):
    assert batched_path_for("cpu", None) == "loop"
    assert batched_path_for("cuda", (7, 5)) == "masked_sdpa"
    assert batched_path_for("cuda", None) == "masked_sdpa"
    monkeypatch.setattr(packed_attention, "_torch_flash_available", lambda: True)
    assert batched_path_for("cuda", (8, 0)) == batched_path_for("cuda", (9, 0)) == "torch_flash"
    assert batched_path_for("cuda", (7, 0)) == "masked_sdpa"
    monkeypatch.setattr(packed_attention, "_torch_flash_available", lambda: False)
    assert batched_path_for("cuda", (9, 0)) == "masked_sdpa"
    assert set(PACKED_ATTENTION) == {"loop", "masked_sdpa", "torch_flash"}


def test_registration_maps_each_name_to_its_function_and_can_be_repeated():
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION["loop"], lambda *args, **kwargs: None)  # an older one
    register_packed_attention()
    register_packed_attention()
    mapping = AttentionInterface._global_mapping
    assert mapping[PACKED_ATTENTION["loop"]] is packed_loop
    assert mapping[PACKED_ATTENTION["masked_sdpa"]] is packed_masked_sdpa
    assert mapping[PACKED_ATTENTION["torch_flash"]] is packed_torch_flash


# -- end to end: the tiny 4-bit Llama with LoRA -------------------------------------------------
def packed_row(count: int, seed: int = 0):
    """A packed row of `count` random examples of 3-24 tokens, the first tokens of each unlabelled."""
    rng = random.Random(seed)
    examples = []
    for i in range(count):
        ids = [rng.randrange(4, 500) for _ in range(rng.randint(3, 24))]
        prompt = rng.randint(1, len(ids) - 1)
        examples.append(Tokenized(i, ids, [IGNORE] * prompt + ids[prompt:]))
    return collate_packed(examples)


def loss_and_lora_grads(session, batch, short_name: str):
    from app.core.train.loss import loss_sum

    register_packed_attention()
    session.model.get_base_model().set_attn_implementation(PACKED_ATTENTION[short_name])
    session.model.zero_grad(set_to_none=True)
    loss = loss_sum(session.model, batch, "cpu", "chunked")
    loss.backward()
    return float(loss), torch.cat([p.grad.flatten() for p in session.params])


@pytest.mark.parametrize("count", [1, 2, 20])
def test_masked_call_trains_the_tiny_model_exactly_like_the_loop(session, count):  # noqa: F811
    session, _ = session
    batch = packed_row(count)
    assert len(batch.segments) == count
    loop_loss, loop_grads = loss_and_lora_grads(session, batch, "loop")
    masked_loss, masked_grads = loss_and_lora_grads(session, batch, "masked_sdpa")
    assert loop_grads.abs().max() > 0
    assert masked_loss == pytest.approx(loop_loss, rel=1e-5)
    torch.testing.assert_close(masked_grads, loop_grads, rtol=1e-5, atol=1e-5 * float(loop_grads.abs().max()))


def test_the_mask_is_built_once_per_batch_not_per_layer(session, monkeypatch):  # noqa: F811
    session, _ = session
    builds, lookups = [], []
    build, lookup = packed_attention._build_block_causal_mask, packed_attention.block_causal_mask
    monkeypatch.setattr(packed_attention, "_build_block_causal_mask",
                        lambda *args: builds.append(args) or build(*args))
    monkeypatch.setattr(packed_attention, "block_causal_mask",
                        lambda *args: lookups.append(args) or lookup(*args))
    packed_attention.clear_mask_cache()
    layers = session.model.get_base_model().config.num_hidden_layers
    first, second = packed_row(6, seed=1), packed_row(7, seed=2)
    loss_and_lora_grads(session, first, "masked_sdpa")
    assert layers >= 2 and len(lookups) == layers and len(builds) == 1
    loss_and_lora_grads(session, first, "masked_sdpa")
    assert len(builds) == 1
    loss_and_lora_grads(session, second, "masked_sdpa")
    assert len(builds) == 2 and len(packed_attention._latest_mask) == 1
    packed_attention.clear_mask_cache()


# -- CUDA (run by the GPU check) ----------------------------------------------------------------
def cuda_errors(function, dtype, count: int, heads=8, kv_heads=2, tokens=1000, dim=64):
    """Largest error (fraction of the largest value) of `function` in `dtype` and, for scale, of the
    loop in `dtype`, each against the loop in fp32 on the same rounded inputs: output, dq, dk, dv."""
    q, k, v = random_qkv(heads, kv_heads, tokens, dim, device="cuda", dtype=dtype)
    segments = split(tokens, count)
    kwargs = {"scaling": dim ** -0.5}
    reference = run(packed_loop, q.float(), k.float(), v.float(), segments, **kwargs)
    got = run(function, q, k, v, segments, **kwargs)
    loop = run(packed_loop, q, k, v, segments, **kwargs)
    return ([largest_error(g, r) for g, r in zip(got, reference)],
            [largest_error(g, r) for g, r in zip(loop, reference)])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("count", [1, 2, 20])
def test_torch_flash_equals_the_loop_on_cuda(count, dtype, monkeypatch):
    if torch.cuda.get_device_capability() < (8, 0) or not torch_flash_available():
        pytest.skip("torch's varlen flash attention needs an sm80+ card and torch 2.9+")

    def no_fallback(*args, **kwargs):
        raise AssertionError("packed_torch_flash fell back to the masked call")

    monkeypatch.setattr(packed_attention, "packed_masked_sdpa", no_fallback)
    flash, loop = cuda_errors(packed_torch_flash, dtype, count)
    for name, f, l in zip(("output", "dq", "dk", "dv"), flash, loop):
        assert f <= max(2 * l, 1e-2), f"{name}: flash {f:.2e}, loop in the same dtype {l:.2e}"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("count", [2, 20])
def test_masked_call_on_the_memory_efficient_kernel_equals_the_loop(count):
    """The path of Turing/Volta cards: SDPA's memory-efficient kernel with the additive mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        masked, loop = cuda_errors(packed_masked_sdpa, torch.float16, count)
    for name, m, l in zip(("output", "dq", "dk", "dv"), masked, loop):
        assert m <= max(2 * l, 1e-2), f"{name}: masked {m:.2e}, loop in the same dtype {l:.2e}"
    packed_attention.clear_mask_cache()


@pytest.mark.gpu
@needs_cuda
def test_layers_share_one_mask_on_the_memory_efficient_kernel():
    """Four layers' forward keeps one mask's memory for backward, not one per layer (a bool mask,
    or one the kernel must pad, would be copied by every call)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tokens, layers = 8000, 4  # 8000 is not a multiple of 16: the allocation's padding matters
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 2, tokens, 64, device="cuda", dtype=torch.float16))
    segments = split(tokens, 20)
    mask_bytes = tokens * tokens * 2
    packed_attention.clear_mask_cache()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        outs = [packed_masked_sdpa(attention_layer(2, 2), q, k, v, None, segments=segments)[0]
                for _ in range(layers)]
    grown = torch.cuda.max_memory_allocated() - before
    assert grown < 1.5 * mask_bytes, f"{grown / mask_bytes:.2f} masks' worth of memory for {layers} layers"
    sum(o.float().sum() for o in outs).backward()
    packed_attention.clear_mask_cache()
