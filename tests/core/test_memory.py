"""The estimator against the real thing: a quantised demo model, PEFT's LoRA, a measured step."""

from __future__ import annotations

from dataclasses import replace

import pytest

from app.core.config import TrainConfig
from app.core.models.architecture import arch_facts
from app.core.models.files import read_config
from app.core.plan.memory import MemorySetup, estimate_memory, lora_parameter_count
from app.core.resources import sample_dataset
from app.core.train.memory_probe import PeakMemory, optimizer_bytes, weight_bytes
from app.core.units import GIB

SEQ = 256


@pytest.fixture(scope="module")
def demo_session(demo_model_path):
    """The demo model loaded in NF4 with LoRA rank 16, as training loads it, and one step taken."""
    from app.core.train.prepare import prepare_training
    from app.core.train.session import QLoraSession

    config = TrainConfig(model="demo", data=str(sample_dataset()), seq_len=SEQ, rank=16, micro_batch=2,
                         grad_accum=1, grad_checkpointing=False, max_steps=3, preset="auto", quantize="4bit")
    prepared = prepare_training(config)
    session = QLoraSession(prepared)
    batch = [prepared.train[i] for i in range(2)]
    session.train_step([batch])
    yield session, prepared, batch
    session.release()


def _estimate(model_dir, **setup) -> object:
    values = dict(rank=16, seq_len=SEQ, micro_batch=2, grad_checkpointing=False, compute_dtype="float32",
                  optimizer="adamw_torch", device="cpu", lora_dropout=True)
    values.update(setup)
    return estimate_memory(arch_facts(read_config(model_dir)), MemorySetup(**values))


def test_weight_bytes_of_the_quantised_model_within_5_percent(demo_session, demo_model_path):
    session, _, _ = demo_session
    measured = weight_bytes(session.model)
    predicted = _estimate(demo_model_path)
    assert abs(measured.quantized - predicted.quantized_weights) <= 0.05 * measured.quantized
    assert abs(measured.kept - predicted.kept_weights) <= 0.05 * measured.kept
    assert measured.lora == predicted.lora_weights


def test_lora_count_equals_what_peft_trains(demo_session, demo_model_path):
    session, _, _ = demo_session
    facts = arch_facts(read_config(demo_model_path))
    assert session.trainable_parameters == lora_parameter_count(facts, 16)
    assert lora_parameter_count(facts, 32) == 2 * lora_parameter_count(facts, 16)


def test_optimizer_state_is_two_fp32_moments_per_lora_weight(demo_session, demo_model_path):
    session, _, _ = demo_session
    state = optimizer_bytes(session.optimizer)
    predicted = _estimate(demo_model_path).optimizer_state
    assert abs(state - predicted) <= 0.01 * predicted  # plus a step counter per tensor


@pytest.mark.slow
def test_a_real_steps_peak_is_not_under_predicted_and_within_12_percent(demo_session, demo_model_path):
    """Measured with the allocator's own events (torch profiler), like max_memory_allocated, on
    the path the plan trains with (packed rows, the fused loss)."""
    from app.core.plan.memory import setup_for

    session, prepared, batch = demo_session
    # the examples fill the row; measure a full one
    full = [type(row)(row.line, (row.input_ids * 8)[:SEQ], (row.labels * 8)[:SEQ]) for row in batch]
    with PeakMemory("cpu") as probe:
        session.train_step([full])
    weights = weight_bytes(session.model)
    measured = weights.quantized + weights.kept + weights.lora + optimizer_bytes(session.optimizer) + probe.peak
    assert session.plan.batching == "packed" and session.plan.loss == "chunked"
    # the tensors only (the allocator's measure): not the process's baseline and heap, which a CPU
    # plan adds for its RSS measure (benchmarks/estimator_rss.py measures those)
    tensors_only = replace(setup_for(session.plan), process_baseline=0)
    predicted = estimate_memory(arch_facts(read_config(demo_model_path)), tensors_only).peak
    assert predicted > 0.25 * GIB
    assert measured <= predicted <= 1.12 * measured, (predicted / GIB, measured / GIB)


def test_checkpointing_and_shorter_sequences_cost_less():
    facts = arch_facts(read_config_from_catalogue("Llama-3.1-8B-Instruct"))
    base = dict(rank=16, seq_len=2048, micro_batch=1)
    full = estimate_memory(facts, MemorySetup(**base))
    ckpt = estimate_memory(facts, MemorySetup(**base, grad_checkpointing=True))
    short = estimate_memory(facts, MemorySetup(**{**base, "seq_len": 1024}))
    assert ckpt.activations < full.activations / 4 and ckpt.peak < full.peak
    assert short.activations == pytest.approx(full.activations / 2, rel=0.01)
    assert short.logits == pytest.approx(full.logits / 2, rel=0.01)
    assert full.peak == sum(v for k, v in full.to_dict().items() if k not in ("peak", "lora_params"))
    # Llama 3.1 8B: 7.0B linear weights at ~0.52 B each, and 1.05B embedding + lm_head in bf16
    assert 3.2 * GIB < full.quantized_weights < 3.6 * GIB and 1.9 * GIB < full.kept_weights < 2.0 * GIB


def read_config_from_catalogue(name: str) -> dict:
    from app.core.models.catalog import find_in_catalog

    return find_in_catalog(name).config()
