"""The planner fits the budget, keeps what the user fixed, and more memory never plans less."""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from app.core.config import TrainConfig
from app.core.data.stats import length_stats
from app.core.errors import PlanError
from app.core.models.resolve import model_facts
from app.core.plan.memory import MemorySetup, estimate_memory, setup_for
from app.core.plan.planner import DEFAULT_RANK, plan_run
from app.core.plan.presets import get_preset, resolve_budget
from app.core.units import GIB
from conftest import REPO

LLAMA_8B = model_facts("Llama-3.1-8B-Instruct").arch


def chat_lengths(count: int = 2000, longest: int = 2000, seed: int = 0) -> list[int]:
    """Token lengths of a chat dataset whose longest rows are about `longest` tokens."""
    rng = random.Random(seed)
    return [rng.randint(longest // 6, longest) for _ in range(count)]


def plan_for(lengths, facts=LLAMA_8B, preset="24gb", usable_gib=None, **fixed):
    budget = resolve_budget(get_preset(preset))
    if usable_gib is not None:
        budget = replace(budget, usable_bytes=int(usable_gib * GIB), source=f"test {usable_gib} GiB")
    config = TrainConfig(model="m", data="d", **fixed)
    return plan_run(config, length_stats(lengths), lengths, False, facts, budget), budget


def peak_of(plan, facts=LLAMA_8B, **change) -> int:
    return estimate_memory(facts, replace(setup_for(plan), **change)).peak


def test_llama_8b_with_2k_chats_on_24gb_keeps_rank_and_context():
    lengths = chat_lengths()
    plan, budget = plan_for(lengths, preset="24gb")
    assert plan.rank >= DEFAULT_RANK
    assert plan.seq_len >= length_stats(lengths).p99  # the data's p99 fits: nothing but the tail truncated
    assert plan.predicted_peak_bytes == peak_of(plan) <= budget.usable_bytes
    # checkpointing is on only because the estimate says it must be
    if plan.grad_checkpointing:
        assert peak_of(plan, grad_checkpointing=False, micro_batch=1) > budget.usable_bytes
        assert "on: without it the peak would be" in plan.reasons["grad_checkpointing"]
    assert plan.device == "cuda" and plan.compute_dtype == "bfloat16" and plan.optimizer == "paged_adamw_8bit"
    assert set(plan.breakdown) >= {"quantized_weights", "kept_weights", "activations", "logits", "peak"}


def test_llama_8b_on_8gb_still_plans_with_checkpointing_and_a_shorter_context():
    lengths = chat_lengths()
    plan, budget = plan_for(lengths, preset="8gb")
    assert plan.grad_checkpointing and plan.seq_len < length_stats(lengths).p99
    assert plan.predicted_peak_bytes <= budget.usable_bytes
    assert "would not fit" in plan.reasons["seq_len"] and "will be truncated" in plan.reasons["seq_len"]


def test_without_checkpointing_when_it_fits():
    plan, budget = plan_for(chat_lengths(longest=500), facts=model_facts("Qwen2.5-0.5B-Instruct").arch,
                            preset="24gb")
    assert not plan.grad_checkpointing and plan.reasons["grad_checkpointing"].startswith("off")


def test_large_data_gets_the_presets_preferred_rank_when_it_fits():
    lengths = chat_lengths(count=4000, longest=1000)  # ~2.3M tokens
    plan, _ = plan_for(lengths, preset="48gb")
    assert plan.rank == get_preset("48gb").preferred_rank == 64
    small, _ = plan_for(lengths[:100], preset="48gb")
    assert small.rank == DEFAULT_RANK  # 100 rows cannot use rank 64


@pytest.mark.parametrize("model", ["Llama-3.1-8B-Instruct", "Qwen2.5-0.5B-Instruct", "Llama-3.2-3B-Instruct",
                                   "gemma-2-9b-it"])
@pytest.mark.parametrize("longest,count", [(2000, 2000), (8000, 3000), (300, 500)])
def test_more_memory_never_gives_a_shorter_context_or_a_lower_rank(model, longest, count):
    facts = model_facts(model).arch
    lengths = chat_lengths(count=count, longest=longest)
    previous = None
    for tenths in range(40, 810, 5):  # 4 to 81 GiB usable in 0.5 GiB steps
        try:
            plan, budget = plan_for(lengths, facts=facts, preset="80gb", usable_gib=tenths / 10)
        except PlanError:
            assert previous is None, f"{tenths / 10} GiB fails after a smaller budget planned"
            continue
        assert plan.predicted_peak_bytes <= budget.usable_bytes
        if previous is not None:
            assert plan.seq_len >= previous.seq_len, (tenths / 10, plan.seq_len, previous.seq_len)
            assert plan.rank >= previous.rank, (tenths / 10, plan.rank, previous.rank)
        previous = plan
    assert previous is not None


def test_fixed_fields_are_kept_and_the_rest_planned_around_them():
    lengths = chat_lengths()
    plan, budget = plan_for(lengths, preset="24gb", rank=8, seq_len=1024, grad_checkpointing=True)
    assert (plan.rank, plan.seq_len, plan.grad_checkpointing) == (8, 1024, True)
    assert plan.reasons["rank"] == plan.reasons["seq_len"].split(";")[0] == "set by you"
    assert plan.micro_batch >= 1 and plan.predicted_peak_bytes <= budget.usable_bytes
    fixed, _ = plan_for(lengths, preset="24gb", micro_batch=1, grad_accum=7)
    assert (fixed.micro_batch, fixed.grad_accum) == (1, 7)


def test_fixed_fields_that_cannot_fit_say_what_to_change():
    with pytest.raises(PlanError, match="settings you fixed need at least .*--seq-len"):
        plan_for(chat_lengths(), preset="8gb", seq_len=8192, grad_checkpointing=False)


def test_a_model_too_big_for_the_card_names_a_card_that_fits():
    with pytest.raises(PlanError, match=r"model alone needs .* smaller model or an? (48|80) GB card"):
        plan_for(chat_lengths(), facts=model_facts("Llama-3.1-70B-Instruct").arch, preset="8gb")


def test_the_plan_cli_prints_json_with_total_params_and_peak():
    done = subprocess.run([sys.executable, "-m", "app", "plan", "--model", "Llama-3.1-8B-Instruct",
                           "--preset", "24gb", "--json"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["model"]["total_params"] == LLAMA_8B.total_params
    assert 0 < report["predicted_peak_bytes"] <= report["budget"]["usable_bytes"]
    assert report["plan"]["rank"] >= 16 and report["breakdown"]["peak"] == report["predicted_peak_bytes"]
    assert (report["plan"]["batching"], report["plan"]["loss"]) == ("packed", "chunked")
    done = subprocess.run([sys.executable, "-m", "app", "plan", "--model", "Llama-3.1-8B-Instruct",
                           "--preset", "24gb", "--no-packing", "--json"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["plan"]["batching"] == "grouped"


def test_the_plan_cli_table_fits_the_sample_data_with_the_demo_model(demo_model_path):
    from app.core.resources import sample_dataset

    done = subprocess.run([sys.executable, "-m", "app", "plan", "--model", "demo", "--data", str(sample_dataset()),
                           "--preset", "12gb"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    for text in ("SmolLM2-135M-Instruct", "covers 99% of examples", "base weights (4-bit)", "peak"):
        assert text in done.stdout


def test_packed_batches_and_the_fused_loss_where_the_model_supports_them():
    lengths = chat_lengths(count=500)
    plan, _ = plan_for(lengths, preset="24gb")
    assert (plan.batching, plan.loss) == ("packed", "chunked")
    assert "no padding" in plan.reasons["batching"] and "no full fp32 logits" in plan.reasons["loss"]
    # packing fills rows of micro_batch x seq_len tokens, so an epoch takes fewer micro-batches
    padded, _ = plan_for(lengths, preset="24gb", packing=False, grad_accum=1)
    packed, _ = plan_for(lengths, preset="24gb", grad_accum=1)
    assert padded.batching == "grouped" and "turned off by you" in padded.reasons["batching"]
    assert packed.steps_per_epoch < padded.steps_per_epoch * 0.75


def test_a_model_with_soft_capped_logits_falls_back_to_padded_batches_and_full_logits():
    gemma = model_facts("gemma-2-9b-it").arch
    plan, _ = plan_for(chat_lengths(count=200), facts=gemma, preset="48gb")
    assert (plan.batching, plan.loss) == ("grouped", "plain")
    assert "gemma2" in plan.reasons["batching"] and "soft-cap" in plan.reasons["loss"]
    from app.core.errors import ConfigError

    with pytest.raises(ConfigError, match="--packing is not available for this model"):
        plan_for(chat_lengths(count=200), facts=gemma, preset="48gb", packing=True)


def test_soft_capped_attention_gets_eager_not_sdpa_and_the_estimate_counts_its_scores():
    """transformers refuses SDPA for Gemma 2 (its attention scores are soft-capped): a plan that
    picked it failed when the model loaded."""
    gemma = model_facts("gemma-2-9b-it").arch
    assert gemma.attention_softcap and not LLAMA_8B.attention_softcap
    plan, _ = plan_for(chat_lengths(count=200), facts=gemma, preset="48gb")
    assert plan.attention == "eager"
    assert "soft-caps its attention scores" in plan.reasons["attention"]
    setup = replace(setup_for(plan), grad_checkpointing=False)
    eager = estimate_memory(gemma, setup)
    as_sdpa = estimate_memory(gemma, replace(setup, attention="sdpa"))
    scores = gemma.layers * plan.micro_batch * gemma.heads * plan.seq_len ** 2 * 4  # one fp32 softmax each
    assert eager.activations - as_sdpa.activations >= scores


def test_the_fused_loss_lets_a_large_vocabulary_model_skip_checkpointing():
    """Qwen2.5-0.5B (152k vocabulary): full fp32 logits of 4,096 tokens are ~6 GiB on their own."""
    qwen = model_facts("Qwen2.5-0.5B-Instruct").arch
    lengths = chat_lengths(count=300, longest=1000)
    fused, budget = plan_for(lengths, facts=qwen, usable_gib=9)
    assert fused.loss == "chunked" and not fused.grad_checkpointing
    assert peak_of(fused, facts=qwen, loss="plain") > budget.usable_bytes
    plain = estimate_memory(qwen, MemorySetup(rank=fused.rank, seq_len=fused.seq_len, micro_batch=fused.micro_batch,
                                              grad_checkpointing=False, loss="plain"))
    assert fused.breakdown["logits"] < plain.logits / 10


def test_long_examples_climb_the_long_context_ladder_only_as_far_as_they_must(monkeypatch):
    from app.core import host

    monkeypatch.setattr(host, "available_ram", lambda: 64 * GIB)  # the test's machine, not this one
    for seq, expected in ((12_288, (False, 0, 0)), (32_768, (True, 4096, 0)), (65_536, (True, 0, 2048))):
        lengths = chat_lengths(count=200, longest=seq)  # beyond the preset's context cap: asked for
        plan, budget = plan_for(lengths, preset="24gb", seq_len=seq)
        assert plan.seq_len == seq and plan.grad_checkpointing
        assert (plan.offload_checkpoints, plan.mlp_tile, plan.layer_tile) == expected, seq
        assert plan.predicted_peak_bytes == peak_of(plan) <= budget.usable_bytes
        for key, off in (("offload_checkpoints", False), ("mlp_tile", 0), ("layer_tile", 0)):
            if getattr(plan, key):  # each rung is on because the peak without it is over the budget
                assert peak_of(plan, **{key: off}) > budget.usable_bytes
                assert plan.reasons[key].startswith("on: without it the peak at")
            else:
                assert key not in plan.reasons


def test_offloading_is_not_planned_beyond_this_machines_ram(monkeypatch):
    from app.core import host

    monkeypatch.setattr(host, "available_ram", lambda: 4 * GIB)
    lengths = chat_lengths(count=200, longest=20_000)
    plan, _ = plan_for(lengths, preset="24gb", seq_len=20_480)  # 5 GiB of inputs to offload: more than is free
    assert not plan.offload_checkpoints and plan.breakdown["host_offload"] == 0
    assert plan.layer_tile == 2048  # the tiles still fit it with the inputs on the card
    with pytest.raises(PlanError, match="need 16.00 GiB of RAM for offloaded checkpoints and this machine has 4.00"):
        plan_for(lengths, preset="24gb", seq_len=65_536)


def test_tiles_and_offloading_need_checkpointing():
    with pytest.raises(Exception, match="ways of checkpointing"):
        plan_for(chat_lengths(), grad_checkpointing=False, layer_tile=2048)
    with pytest.raises(Exception, match="--layer-tile is tokens per tile"):
        plan_for(chat_lengths(), layer_tile=8)


def test_the_flag_seq_len_is_read_once_by_the_planner_on_its_way_to_the_batches(tiny_model, chat_data):
    """--seq-len from the flag to the batches: only the planner reads it from the config (its
    validation, and the one decision in plan/seq_len.py); the rest reads the plan."""
    from app.cli.flags import add_config_flags, config_values
    from app.core.data.batches import EpochBatches
    from app.core.train.prepare import prepare_training

    readers = []

    class Watched(TrainConfig):
        def __getattribute__(self, name):
            if name == "seq_len":
                code = sys._getframe(1).f_code
                readers.append((Path(code.co_filename).as_posix(), code.co_name))
            return object.__getattribute__(self, name)

    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(["--model", str(tiny_model), "--data", str(chat_data), "--seq-len", "48",
                              "--max-steps", "2"])
    config = Watched(**config_values(args))
    prepared = prepare_training(config)
    batches = EpochBatches([len(e.input_ids) for e in prepared.train], prepared.plan, prepared.config.seed)
    ours = sorted({(file.split("/app/", 1)[-1], name) for file, name in readers if "/app/" in file})
    assert ours == [("core/plan/planner.py", "validate_config"), ("core/plan/seq_len.py", "choose_seq_len")]
    assert prepared.plan.seq_len == 48 and prepared.plan.reasons["seq_len"].startswith("set by you")
    first = batches.for_step(0)  # the loop's first step: rows of the plan's length at most
    assert first and max(batches.lengths) <= 48 and all(len(e.input_ids) <= 48 for e in prepared.train)


def test_a_preference_plan_has_full_logits_and_counts_two_padded_rows_a_pair():
    lengths = chat_lengths(500, 1000)
    fixed = dict(seq_len=1024, micro_batch=2, rank=16, grad_checkpointing=True, quantize="4bit")
    sft, _ = plan_for(lengths, **fixed)
    dpo, _ = plan_for(lengths, method="dpo", **fixed)
    assert sft.loss != "plain" and dpo.loss == "plain" and "log-probability" in dpo.reasons["loss"]
    assert dpo.batching == "packed" and dpo.predicted_peak_bytes == peak_of(sft, loss="plain")  # a packed pair: one row's share
    padded, _ = plan_for(lengths, method="dpo", packing=False, **fixed)
    assert padded.batching == "grouped"
    assert padded.predicted_peak_bytes == peak_of(padded, micro_batch=4)  # micro-batch 2 pairs: 4 padded rows
