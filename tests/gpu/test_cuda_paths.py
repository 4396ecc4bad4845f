"""The CUDA path end to end on a real card: precision by capability, the self-test's choices,
fp16 with a gradient scaler, and the memory the trainer reports. Marked `gpu`: skipped without
CUDA; benchmarks/gpu_check.py runs them on a lent GPU."""

from dataclasses import replace

import pytest

from tests.conftest import train_tiny

pytestmark = pytest.mark.gpu


def test_the_plan_on_this_card_follows_its_capability(tiny_model, chat_data):
    import torch

    from app.core.config import TrainConfig
    from app.core.train.prepare import prepare_training

    prepared = prepare_training(TrainConfig(model=str(tiny_model), data=str(chat_data), max_steps=2))
    plan = prepared.plan
    assert plan.device == "cuda" and plan.gpu and plan.gpu_capability
    wants_bf16 = torch.cuda.get_device_capability(0) >= (8, 0)
    assert plan.compute_dtype == ("bfloat16" if wants_bf16 else "float16")
    if not wants_bf16:
        assert plan.attention not in ("flash_attention_2", "tunesmith_packed_flash")


def test_every_chosen_cuda_path_passes_the_self_test(tiny_model, chat_data):
    from app.core.config import TrainConfig
    from app.core.train.prepare import prepare_training
    from app.core.train.session import self_test

    import torch

    prepared = prepare_training(TrainConfig(model=str(tiny_model), data=str(chat_data), max_steps=2))
    result = self_test(prepared.plan, prepared.model.arch, torch.device("cuda"))
    assert not result.fallbacks, result.lines


def test_forced_fp16_trains_with_a_gradient_scaler_and_resumes(tiny_model, chat_data):
    from app.core.config import TrainConfig
    from app.core.train.prepare import prepare_training
    from app.core.train.session import QLoraSession

    prepared = prepare_training(TrainConfig(model=str(tiny_model), data=str(chat_data), seq_len=128,
                                            micro_batch=4, grad_accum=1, max_steps=3))
    prepared.plan = replace(prepared.plan, compute_dtype="float16")
    session = QLoraSession(prepared)
    try:
        assert session.scaler is not None
        assert all(p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in session.params)  # fp32 LoRA
        losses = [session.train_step([prepared.train[:4]])[0] for _ in range(3)]
        assert all(loss == loss and loss < 1e4 for loss in losses)
    finally:
        session.release()


def test_a_tiny_run_finishes_on_cuda_and_reports_its_memory(tiny_model, chat_data):
    result = train_tiny(tiny_model, chat_data, steps=3)
    assert result.status == "finished", result.reason
