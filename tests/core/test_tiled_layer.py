"""Checkpointed decoder layers over sequence tiles (app/core/train/memory_savers/tiled_layer.py): the same loss and
LoRA gradients as torch's checkpointing on the tiny Llama, Qwen3 (q/k norms), Phi-3 (fused q/k/v
and gate/up) and Gemma 3 (four norms, sliding window), over packed rows, with the input copied
(the path a GPU takes) or kept; LoRA dropout's masks drawn again the same in backward; less on
the card at once; a real QLoRA run. No GPU here: pinned memory and the side stream run in the GPU check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_tiled_mlp import lora_model, loss_and_grads, short_qlora_run

from app.core.train.memory_savers.tiled_layer import NotTileable, tile_layers


@pytest.fixture
def ids():
    torch.manual_seed(0)
    return torch.randint(4, 500, (2, 96))


def assert_same(got, expected, rtol=1e-5, atol=1e-6):
    assert all(expected[n].abs().max() > 0 for n in expected if ".layers.0." in n)  # the first layer learns too
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("to_host", [False, True])
def test_tiled_layers_give_torchs_checkpointing_loss_and_gradients(tiny_model, ids, to_host, monkeypatch):
    from app.core.train.memory_savers import offload

    model = lora_model(tiny_model, dropout=0.0, checkpointing=True)
    plain_loss, plain = loss_and_grads(model, ids)
    assert tile_layers(model, 32, to_host=to_host) == 2
    copies = []  # a spy on the copy (it still copies)
    monkeypatch.setattr(offload, "_to_host", lambda hidden, copy=offload._to_host: copies.append(1) or copy(hidden))
    calls = []  # and on the tiles: 96 tokens in tiles of 32 run 3 captures + 3 replays a layer in forward
    from app.core.train.memory_savers import tiled_layer

    monkeypatch.setattr(tiled_layer._Layer, "_run", lambda self, *a, run=tiled_layer._Layer._run:
                        calls.append(a[1]) or run(self, *a))
    tiled_loss, tiled = loss_and_grads(model, ids)
    assert len(copies) == (2 if to_host else 0)
    assert calls.count(0) == 2 * 5 and calls.count(64) == 2 * 5  # forward 2 passes, backward 3, each tile
    assert tiled_loss == pytest.approx(plain_loss, rel=1e-6)
    assert_same(tiled, plain)


def test_short_sequences_and_eval_run_the_plain_layer(tiny_model, ids):
    model = lora_model(tiny_model, dropout=0.0, checkpointing=True)
    plain_loss, plain = loss_and_grads(model, ids)
    tile_layers(model, 96, to_host=False)  # one tile: offload.py's untiled checkpoint
    loss, grads = loss_and_grads(model, ids)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert_same(grads, plain)
    tile_layers(model, 32, to_host=False)
    with torch.no_grad():
        model.eval()
        logits = model(input_ids=ids).logits
        model.train()
    assert logits.shape == (2, 96, model.config.vocab_size)


def test_with_lora_dropout_backward_draws_the_forwards_masks(tiny_model, ids):
    """Against autograd through the very same passes (the same random draws in the same order): a
    backward that drew new dropout masks would give other gradients."""
    from app.core.train.memory_savers import tiled_layer

    model = lora_model(tiny_model, dropout=0.3, checkpointing=True)
    tile_layers(model, 32, to_host=False)

    def autograd_layers(function, hidden, *args, tile_tokens, to_host):  # the same passes, autograd's backward
        layer = tiled_layer._Layer(function, hidden.shape[-2], tile_tokens)
        parts = [layer.capture(hidden[:, layer.rows(s)], s, args) for s in layer.starts]
        out = layer.attend(*[torch.cat(c, dim=2) for c in zip(*parts)])
        return torch.cat([layer.replay(hidden[:, layer.rows(s)], out[:, layer.rows(s)], s, args)
                          for s in layer.starts], dim=-2)

    layers = [m for m in model.modules() if hasattr(m, "_gradient_checkpointing_func")]
    tiled_funcs = [m._gradient_checkpointing_func for m in layers]
    for module in layers:
        module._gradient_checkpointing_func = lambda f, h, *a: autograd_layers(f, h, *a, tile_tokens=32, to_host=False)
    reference_loss, reference = loss_and_grads(model, ids)
    for module, function in zip(layers, tiled_funcs):
        module._gradient_checkpointing_func = function
    tiled_loss, tiled = loss_and_grads(model, ids)
    assert tiled_loss == pytest.approx(reference_loss, rel=1e-6)
    assert_same(tiled, reference)
    untiled_loss, _ = loss_and_grads(lora_model(tiny_model, dropout=0.3, checkpointing=True), ids)
    assert untiled_loss != pytest.approx(tiled_loss, rel=1e-6)  # the masks are really random


def test_packed_rows_attend_within_each_example_as_untiled(tiny_model):
    from app.core.train.memory_savers.packed_attention import packed_kwargs, register_attention_functions
    from app.core.train.memory_savers.packed_attention import PACKED_ATTENTION

    register_attention_functions()
    model = lora_model(tiny_model, dropout=0.0, checkpointing=True)
    model.get_base_model().set_attn_implementation(PACKED_ATTENTION["loop"])
    torch.manual_seed(3)
    ids = torch.randint(4, 500, (1, 150))
    segments = ((0, 40), (40, 41), (41, 150))  # a tile boundary (32, 64, 96, 128) inside each long one
    position_ids = torch.cat([torch.arange(e - s) for s, e in segments])[None]

    def loss_and_grads_packed():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, position_ids=position_ids, **packed_kwargs(segments, "cpu")).loss
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain = loss_and_grads_packed()
    tile_layers(model, 32, to_host=False)
    tiled_loss, tiled = loss_and_grads_packed()
    assert tiled_loss == pytest.approx(plain_loss, rel=1e-6)
    assert_same(tiled, plain)


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gemma3"])
def test_other_architectures_tile_as_they_checkpoint(family, tmp_path, ids):
    from test_gguf_export import build_tiny_gemma, build_tiny_phi3, build_tiny_qwen2

    build = {"qwen3": lambda p: build_tiny_qwen2(p, "qwen3"), "phi3": build_tiny_phi3,
             "gemma3": lambda p: build_tiny_gemma(p, "gemma3")}[family]
    folder = build(tmp_path / family)
    model = lora_model(folder, dropout=0.0, checkpointing=True)
    ids = ids % model.config.vocab_size
    plain_loss, plain = loss_and_grads(model, ids)
    assert tile_layers(model, 32, to_host=False) == 2
    tiled_loss, tiled = loss_and_grads(model, ids)
    assert tiled_loss == pytest.approx(plain_loss, rel=1e-5)
    assert_same(tiled, plain, rtol=1e-4, atol=1e-5)


def test_eager_attention_and_moe_layers_are_refused_with_the_reason(tiny_model, tmp_path):
    from test_gguf_export import build_tiny_family
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager")
    eager.gradient_checkpointing_enable()
    with pytest.raises(NotTileable, match="eager"):
        tile_layers(eager, 32, to_host=False)
    moe = AutoModelForCausalLM.from_pretrained(build_tiny_family(tmp_path / "mixtral", "mixtral"))
    moe.gradient_checkpointing_enable()
    with pytest.raises(NotTileable, match="MoE"):
        tile_layers(moe, 32, to_host=False)


def test_tiled_layers_hold_less_at_once_than_a_whole_layers_recompute(tiny_model):
    """The peak of the tensors alive in one step of the decoder alone (no logits: the loss is on
    the last hidden state), counted by the CPU allocator through the profiler's memory events, at
    2,048 tokens of the tiny model: tiles of 128 against the whole layer."""
    from app.core.train.memory_probe import PeakMemory

    torch.manual_seed(0)
    ids = torch.randint(4, 500, (1, 2048))
    model = lora_model(tiny_model, dropout=0.1, checkpointing=True)
    decoder = model.get_base_model().model

    def step():
        model.zero_grad(set_to_none=True)
        decoder(input_ids=ids).last_hidden_state.square().mean().backward()

    def peak() -> int:
        step()  # warm: .grad exists from here on
        with PeakMemory("cpu") as probe:
            step()
        return probe.peak

    whole = peak()
    tile_layers(model, 128, to_host=False)
    tiled = peak()
    assert tiled < 0.55 * whole, (tiled, whole)  # measured 0.46


def test_a_qlora_run_with_tiled_layers_trains_as_one_without(tiny_model, chat_data, tunesmith_home):
    losses = {}
    for tile in (0, 32):
        plan, losses[tile], log = short_qlora_run(tiny_model, chat_data, grad_checkpointing=True, layer_tile=tile)
        assert plan.layer_tile == tile
        assert ("layers over tiles of 32 tokens: 2" in log) == bool(tile)
    assert len(losses[0]) == 4 and losses[32] == pytest.approx(losses[0], rel=1e-4)


@pytest.mark.slow
def test_the_estimator_counts_the_layer_tiles_without_under_predicting():
    """A real checkpointed step of the demo's shape (2 layers, 4,096 packed tokens, 4-bit, fp32)
    measured by allocator replay, the layers whole and over tiles of 512 tokens."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from memory_calibration import measure

    rows = {tile: measure("HuggingFaceTB/SmolLM2-135M-Instruct", 4096, 16, True, 1, device="cpu", dtype="float32",
                          warm_steps=1, loss="chunked", layers=2, batching="packed", layer_tile=tile)
            for tile in (0, 512)}
    whole, tiled = rows[0], rows[512]
    assert tiled["step_bytes"] < whole["step_bytes"] and tiled["step_predicted"] < whole["step_predicted"]
    for row in rows.values():
        assert row["step_predicted"] >= row["step_bytes"], row
