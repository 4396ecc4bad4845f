"""Models bigger than one card (app/core/plan/sharding.py): the planner gives every card a replica
(DDP) while the 4-bit model fits one, shards it (FSDP-QLoRA) when it does not, and keeps the shards
in host RAM as the last rung; a one-card refusal says how many cards would hold it; --strategy
forces either. FSDP training itself is tested in test_distributed.py (gloo processes); the FSDP
terms of the estimate are not measured (no GPU run yet)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from app.core.config import TrainConfig
from app.core.errors import ConfigError, PlanError
from app.core.models.resolve import model_facts
from app.core.plan.memory import MemorySetup, estimate_memory
from app.core.plan.preview import preview_plan
from app.core.units import GIB

LLAMA_70B = model_facts("Llama-3.1-70B-Instruct").arch


def test_llama_70b_on_two_3090s_is_planned_as_fsdp_qlora_under_24_gb_a_card():
    preview = preview_plan(TrainConfig(model="Llama-3.1-70B-Instruct", gpus=2, gpu="RTX 3090"))
    plan = preview.plan
    assert plan.gpus == 2 and plan.strategy.startswith("fsdp")
    assert plan.predicted_peak_bytes <= preview.budget.usable_bytes < 24 * GIB
    assert plan.reasons["gpus"].startswith("FSDP-QLoRA over 2 cards: one card does not hold")
    assert plan.optimizer == "adamw_torch" and "sharded by FSDP" in plan.reasons["optimizer"]
    assert plan.breakdown["gathered"] > 0


def test_on_one_3090_it_does_not_fit_and_the_refusal_says_what_would():
    with pytest.raises(PlanError, match=r"2 such cards would hold it sharded \(--gpus 2: FSDP-QLoRA"):
        preview_plan(TrainConfig(model="Llama-3.1-70B-Instruct", gpu="RTX 3090"))


def test_a_model_that_fits_one_card_gets_a_replica_on_each():
    one = preview_plan(TrainConfig(model="Llama-3.1-8B-Instruct", gpu="RTX 4090")).plan
    two = preview_plan(TrainConfig(model="Llama-3.1-8B-Instruct", gpu="RTX 4090", gpus=2)).plan
    assert (one.strategy, two.strategy) == ("", "ddp") and two.reasons["gpus"].startswith("DDP over 2 GPUs")
    assert two.breakdown["gathered"] == 0 and two.breakdown["quantized_weights"] == one.breakdown["quantized_weights"]


def test_sharding_divides_what_is_not_per_token_and_offload_moves_it_to_host_ram():
    setup = MemorySetup(seq_len=1024, grad_checkpointing=True, loss="chunked", attention="tunesmith_packed_flash")
    whole, halves = estimate_memory(LLAMA_70B, setup), estimate_memory(LLAMA_70B, replace(setup, shards=2))
    for part in ("quantized_weights", "kept_weights", "lora_weights", "lora_gradients", "optimizer_state"):
        assert abs(getattr(halves, part) - getattr(whole, part) / 2) <= 1, part
    assert halves.activations == whole.activations and halves.gathered > 0 == whole.gathered
    offloaded = estimate_memory(LLAMA_70B, replace(setup, shards=2, offload_params=True))
    static = (whole.quantized_weights + whole.kept_weights + whole.lora_weights + whole.lora_gradients
              + whole.optimizer_state)
    assert offloaded.quantized_weights == offloaded.optimizer_state == 0
    assert abs(offloaded.host_offload - static) <= 8  # the whole machine's RAM holds every card's share


def test_the_strategy_can_be_chosen_and_a_choice_that_cannot_work_is_refused_in_one_line():
    ddp = TrainConfig(model="Llama-3.1-70B-Instruct", gpus=2, gpu="RTX 3090", strategy="ddp")
    with pytest.raises(PlanError, match="--strategy fsdp would shard it over the cards"):
        preview_plan(ddp)
    forced = preview_plan(TrainConfig(model="Llama-3.1-8B-Instruct", gpu="RTX 4090", gpus=2, strategy="fsdp")).plan
    assert forced.strategy == "fsdp" and "set by you" in forced.reasons["gpus"] and forced.quantize == "4bit"
    for config, message in ((TrainConfig(model="demo", strategy="fsdp"), "--strategy fsdp is for several GPUs"),
                            (TrainConfig(model="demo", gpus=2, strategy="zero3"), "--strategy zero3: choose one of"),
                            (TrainConfig(model="demo", gpus=2, strategy="fsdp", quantize="none"),
                             "--strategy fsdp shards the 4-bit base")):
        with pytest.raises(ConfigError, match=message):
            preview_plan(config)
