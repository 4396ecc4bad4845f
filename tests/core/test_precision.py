"""fp16 compute, as on Volta and Turing cards: a gradient scaler, fp32 LoRA weights, and the
scaler's state kept in checkpoints so that a resumed run goes on exactly. bitsandbytes computes
fp16 on the CPU too, so this runs here."""

import threading
from dataclasses import replace

from app.core.config import TrainConfig
from app.core.events import StepMetrics
from app.core.train.prepare import prepare_training
from app.core.train.trainer import resume_training, train_prepared


def fp16_prepared(tiny_model, chat_data, steps: int):
    config = TrainConfig(model=str(tiny_model), data=str(chat_data), seq_len=128, micro_batch=4, grad_accum=1,
                         lr=5e-3, max_steps=steps, save_every=100, lora_dropout=0.0)
    prepared = prepare_training(config)
    prepared.plan = replace(prepared.plan, compute_dtype="float16")
    return prepared


def test_fp16_runs_scale_the_loss_keep_lora_in_fp32_and_resume_exactly(tiny_model, chat_data):
    from app.core.train.session import QLoraSession

    session = QLoraSession(fp16_prepared(tiny_model, chat_data, 4))
    try:
        assert session.scaler is not None and session.scaler.get_scale() > 1
        assert {p.dtype for p in session.params} == {__import__("torch").float32}
    finally:
        session.release()

    whole = []
    result = train_prepared(fp16_prepared(tiny_model, chat_data, 4),
                            lambda e: whole.append(e.loss) if isinstance(e, StepMetrics) else None)
    assert result.status == "finished" and len(whole) == 4

    stop, resumed = threading.Event(), []

    def on_event(event):
        if isinstance(event, StepMetrics):
            resumed.append(event.loss)
            if event.step >= 2:
                stop.set()

    first = train_prepared(fp16_prepared(tiny_model, chat_data, 4), on_event, stop)
    assert first.status == "stopped"
    checkpoint = sorted((__import__("pathlib").Path(first.run_dir) / "checkpoints").iterdir())[-1]
    assert (checkpoint / "scaler.pt").exists()
    assert resume_training(first.run_id, on_event).status == "finished"
    assert resumed == whole  # the scaler's scale and skipped steps carried over
