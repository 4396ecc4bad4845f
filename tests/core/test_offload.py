"""Offloaded activation checkpoints (app/core/train/memory_savers/offload.py): the same loss and LoRA gradients
as torch's checkpointing, LoRA dropout included, with the input kept in place (the CPU's path) or
copied (the path a GPU takes, into pinned memory there); and a real QLoRA run trains the same.
No GPU here: the side stream and pinned memory are CUDA-only and run in the GPU check."""

from __future__ import annotations


import pytest
import torch

from app.core.train.memory_savers.offload import offload_checkpoints
from test_tiled_mlp import loss_and_grads, lora_model, short_qlora_run


@pytest.fixture
def ids():
    torch.manual_seed(0)
    return torch.randint(4, 500, (2, 96))


@pytest.mark.parametrize("to_host", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_offloaded_checkpoints_give_torchs_checkpointing_loss_and_gradients(tiny_model, ids, to_host, dropout,
                                                                           monkeypatch):
    from app.core.train.memory_savers import offload

    model = lora_model(tiny_model, dropout=dropout, checkpointing=True)
    plain_loss, plain = loss_and_grads(model, ids)
    assert offload_checkpoints(model, to_host=to_host) == 2
    copies = []  # a spy on the copy (it still copies), so a silent fall-back to torch's checkpoint fails
    monkeypatch.setattr(offload, "_to_host", lambda hidden, copy=offload._to_host: copies.append(1) or copy(hidden))
    offloaded_loss, offloaded = loss_and_grads(model, ids)
    assert len(copies) == (2 if to_host else 0)
    assert offloaded_loss == pytest.approx(plain_loss, rel=1e-6)
    assert all(plain[n].abs().max() > 0 for n in plain if ".layers.0." in n)  # the first layer learns too
    for name in plain:
        torch.testing.assert_close(offloaded[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_offloaded_checkpoints_and_tiled_mlp_together(tiny_model, ids):
    from app.core.train.memory_savers.tiled_mlp import tile_mlps

    model = lora_model(tiny_model, dropout=0.0, checkpointing=True)
    plain_loss, plain = loss_and_grads(model, ids)
    offload_checkpoints(model, to_host=True)
    tile_mlps(model, 32)
    both_loss, both = loss_and_grads(model, ids)
    assert both_loss == pytest.approx(plain_loss, rel=1e-6)
    for name in plain:
        torch.testing.assert_close(both[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_qlora_run_with_offloaded_checkpoints_trains_as_one_with_plain_checkpoints(tiny_model, chat_data,
                                                                                     tunesmith_home):
    losses = {}
    for offload in (False, True):
        plan, losses[offload], log = short_qlora_run(tiny_model, chat_data, grad_checkpointing=True,
                                                     offload_checkpoints=offload)
        assert plan.offload_checkpoints == offload and plan.grad_checkpointing
        assert ("checkpoints offloaded: 2 layers (kept in place on the CPU)" in log) == offload
    assert len(losses[False]) == 4 and losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_the_estimator_moves_offloaded_inputs_to_host_ram_on_cuda_only():
    from dataclasses import replace

    from app.core.models.architecture import arch_facts
    from app.core.models.catalog import find_in_catalog
    from app.core.plan.memory import MemorySetup, estimate_memory

    facts = arch_facts(find_in_catalog("Llama-3.1-8B-Instruct").config())
    setup = MemorySetup(seq_len=32768, grad_checkpointing=True, loss="chunked", device="cuda")
    plain, offloaded = estimate_memory(facts, setup), estimate_memory(facts, replace(setup, offload_checkpoints=True))
    layer_input = 32768 * 4096 * 2  # tokens x hidden x bf16
    assert offloaded.host_offload == 32 * layer_input and plain.host_offload == 0
    assert plain.peak - offloaded.peak >= 30 * 2 * layer_input  # two layers' stay on the card
    cpu = replace(setup, device="cpu", compute_dtype="float32")
    assert estimate_memory(facts, replace(cpu, offload_checkpoints=True)).peak == estimate_memory(facts, cpu).peak


def test_the_plan_for_an_8b_model_at_32k_fits_24gb_only_with_offloaded_checkpoints_and_tiles(capsys):
    from app import cli

    base = ["plan", "--model", "Llama-3.1-8B-Instruct", "--preset", "24gb", "--seq-len", "32768"]
    assert cli.main(base + ["--no-grad-checkpointing"]) == 2
    assert "need at least" in capsys.readouterr().err
    assert cli.main(base + ["--offload-checkpoints", "--mlp-tile", "4096"]) == 0
    out = capsys.readouterr().out
    assert "on: offloaded checkpoints need it" in out and "in host RAM              8.00 GiB" in out
    assert "set by you: checkpointed layers' inputs wait in CPU RAM" in out
