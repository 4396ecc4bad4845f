"""The MLP over sequence tiles (app/core/train/memory_savers/tiled_mlp.py): the same loss and LoRA gradients as
the plain MLP, with and without checkpointing, the same dropout masks in backward's rerun, and
less kept for backward. Real training steps of the tiny Llama with LoRA on every linear layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.core.train.memory_savers.tiled_mlp import tile_mlps


def lora_model(tiny_model, dropout: float, checkpointing: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the MLP's LoRA something to pass gradients through
            torch.nn.init.normal_(param, std=0.3)
    return model.train()


def loss_and_grads(model, ids, seed: int = 7):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def ids():
    torch.manual_seed(0)
    return torch.randint(4, 500, (2, 96))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlp_gives_the_plain_mlps_loss_and_lora_gradients(tiny_model, ids, checkpointing):
    model = lora_model(tiny_model, dropout=0.0, checkpointing=checkpointing)
    plain_loss, plain = loss_and_grads(model, ids)
    assert tile_mlps(model, 32) == 2  # both layers, three tiles of 32 tokens each
    tiled_loss, tiled = loss_and_grads(model, ids)
    assert tiled_loss == pytest.approx(plain_loss, rel=1e-6)
    mlp_grads = [n for n in plain if ".mlp." in n]
    assert len(mlp_grads) == 12 and all(plain[n].abs().max() > 0 for n in mlp_grads)
    for name in plain:
        torch.testing.assert_close(tiled[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_with_lora_dropout_the_rerun_in_backward_draws_the_forwards_masks(tiny_model, ids):
    """Against autograd through the same tiles (the same random draws, in the same order): a rerun
    that drew new dropout masks would give other gradients."""
    model = lora_model(tiny_model, dropout=0.3)
    mlps = [m for n, m in model.named_modules() if n.endswith(".mlp")]
    originals = [m.forward for m in mlps]
    for mlp, forward in zip(mlps, originals):
        mlp.forward = lambda x, f=forward: torch.cat([f(part) for part in x.split(32, dim=-2)], dim=-2)
    reference_loss, reference = loss_and_grads(model, ids)
    for mlp, forward in zip(mlps, originals):
        mlp.forward = forward
    tile_mlps(model, 32)
    tiled_loss, tiled = loss_and_grads(model, ids)
    assert tiled_loss == pytest.approx(reference_loss, rel=1e-6)
    for name in reference:
        torch.testing.assert_close(tiled[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
    plain_loss, _ = loss_and_grads(lora_model(tiny_model, dropout=0.3), ids)
    assert plain_loss != pytest.approx(tiled_loss, rel=1e-6)  # the masks are really random per tile


def test_tiled_mlp_keeps_less_for_backward_and_leaves_short_sequences_and_eval_alone(tiny_model, ids):
    def saved_bytes(model) -> int:
        total = [0]

        def pack(tensor):
            total[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(input_ids=ids, labels=ids).loss  # what the forward keeps for backward
        loss.backward()  # (the backward's rerun keeps one tile's at a time, freed tile by tile)
        return total[0]

    model = lora_model(tiny_model, dropout=0.0)
    plain = saved_bytes(model)
    tile_mlps(model, 32)
    tiled = saved_bytes(model)
    # per token per layer the plain MLP keeps gate, up, act, product and the LoRA inputs (~6 x 128
    # floats); the tiled one its input (64 floats)
    assert plain - tiled > 2 * 96 * 2 * 4 * 4 * 128
    assert saved_bytes(model) == tiled  # the same on every step
    tile_mlps(model, 128)  # patched again: the new tile size replaces the old, never wraps twice
    assert saved_bytes(model) == plain  # 96 tokens fit one tile: the plain MLP runs


def short_qlora_run(tiny_model, chat_data, **setting):
    """Four real steps of the 4-bit tiny model at 128 tokens with `setting`: (plan, losses, train.log)."""
    from app.core.config import TrainConfig
    from app.core.runs import Run, read_history
    from app.core.train.trainer import run_training

    result = run_training(TrainConfig(model=str(tiny_model), data=str(chat_data), seq_len=128, micro_batch=4,
                                      grad_accum=1, lr=5e-3, max_steps=4, save_every=100, lora_dropout=0.0,
                                      quantize="4bit", **setting))
    assert result.status == "finished", result.reason
    run = Run(result.run_dir)
    return run.plan(), read_history(run).losses, (Path(result.run_dir) / "train.log").read_text()


def test_a_qlora_run_with_a_tiled_mlp_trains_as_one_without(tiny_model, chat_data, tunesmith_home):
    """Four real steps on the 4-bit tiny model at 128 tokens, the MLP whole and over tiles of 32."""
    losses = {}
    for tile in (0, 32):
        plan, losses[tile], log = short_qlora_run(tiny_model, chat_data, mlp_tile=tile)
        assert plan.mlp_tile == tile
        assert ("MLP over tiles of 32 tokens in 2 layers" in log) == bool(tile)
    assert len(losses[0]) == 4 and losses[32] == pytest.approx(losses[0], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_estimator_counts_the_tiles_saving_without_under_predicting(checkpointing):
    """A real step of the demo's shape (2 layers, 4,096 packed tokens, 4-bit, fp32) measured by
    allocator replay, with the MLP whole and over tiles of 512 tokens."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from memory_calibration import measure

    rows = {tile: measure("HuggingFaceTB/SmolLM2-135M-Instruct", 4096, 16, checkpointing, 1, device="cpu",
                          dtype="float32", warm_steps=1, loss="chunked", layers=2, batching="packed", mlp_tile=tile)
            for tile in (0, 512)}
    whole, tiled = rows[0], rows[512]
    assert tiled["step_bytes"] < 0.9 * whole["step_bytes"]
    assert tiled["step_predicted"] < whole["step_predicted"]
    for row in rows.values():
        assert row["step_predicted"] >= row["step_bytes"], row
