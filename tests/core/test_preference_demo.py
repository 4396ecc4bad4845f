"""DPO on the demo model (SmolLM2-135M-Instruct): pairs whose chosen answer opens in the pirate chef's
voice ("Ahoy, me hearty!") and whose rejected answer is the same advice plainly. The held-out pairs'
preference accuracy goes from a coin toss to at least 90 %, and the tuned chat answers in the
chosen voice where the base never does."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from preference import PIRATE, pirate_pairs as all_pirate_pairs  # noqa: E402 - the benchmark's pairs, the same way


def pirate_pairs(path: Path, count: int) -> Path:
    """The first `count` of the benchmark's pairs from the demo's pirate-chef chats: chosen = the
    answer's pirate greeting and its first plain sentence, rejected = that plain sentence alone."""
    path.write_text("".join(json.dumps(row) + "\n" for row in all_pirate_pairs()[:count]))
    return path


@pytest.mark.slow
def test_dpo_teaches_the_demo_model_the_chosen_voice(tmp_path, demo_model_path):
    from app.core.chat import GenerationSettings, load_chat
    from app.core.config import TrainConfig
    from app.core.events import PreferenceMetrics
    from app.core.train.preference import ReferenceLogps
    from app.core.train.trainer import run_training

    data = pirate_pairs(tmp_path / "pairs.jsonl", 72)  # 64 to train on, 8 held out
    config = TrainConfig(model="demo", data=str(data), method="dpo", seq_len=256, micro_batch=2, grad_accum=1,
                         lr=3e-4, lora_dropout=0.0, eval_every=6, report="off")
    events = []
    result = run_training(config, events.append, threading.Event())
    assert result.status == "finished", result.reason
    evals = [e for e in events if isinstance(e, PreferenceMetrics) and e.split == "eval"]
    assert evals[-1].accuracy >= 0.9 and evals[-1].margin > 0, evals
    # before training the tuned model is the reference: every margin 0, a coin toss (ties count half); and
    # the base itself prefers the plain answer (per token) on most held-out pairs
    reference = ReferenceLogps.load(Path(result.run_dir) / "reference_logps.pt").values
    held = [sides for (where, _), sides in reference.items() if where == "val"]
    base_prefers = sum(float(chosen.mean()) > float(rejected.mean()) for chosen, rejected in held) / len(held)
    assert len(held) == 8 and base_prefers <= 0.5, base_prefers

    settings = GenerationSettings(max_new_tokens=12, temperature=0.0)
    session = load_chat(result.run_id)
    question = [{"role": "user", "content": "How do I make garlic bread?"}]  # not among the pairs
    tuned, base = (session.reply(question, settings, adapter=on) for on in (True, False))
    assert PIRATE.search(tuned), tuned
    assert not PIRATE.search(base), base
