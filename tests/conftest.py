"""Shared fixtures: an isolated Tunesmith home per test, a tiny random Llama and runs of it, the demo
model and a demo run, and the main window for GUI tests."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped here without it (benchmarks/gpu_check.py runs them)."""
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu_tests:
        item.add_marker(skip)


EXAMPLES = REPO / "resources" / "data" / "examples"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One model cache for the whole session, so the demo model is converted once.

    Set TUNESMITH_TEST_CACHE to keep it across test sessions.
    """
    keep = os.environ.get("TUNESMITH_TEST_CACHE")
    path = Path(keep) if keep else tmp_path_factory.mktemp("cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(autouse=True)
def tunesmith_home(tmp_path, monkeypatch, shared_cache) -> Path:
    """Each test gets its own run store and config; the model cache is shared."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "cache").symlink_to(shared_cache, target_is_directory=True)
    monkeypatch.setenv("TUNESMITH_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return home


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [line for f in EXAMPLES.glob("*.jsonl") for line in f.read_text().splitlines()] * 3
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|im_end|>")
    fast.chat_template = CHATML
    return fast


def build_tiny_model(path: Path, tie: bool = False, hidden: int = 64, intermediate: int = 128,
                     initializer_range: float = 0.3) -> Path:
    """A 2-layer random-weight Llama with a real BPE tokenizer, saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=tie, initializer_range=initializer_range,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def demo_model_path(shared_cache, tmp_path_factory) -> Path:
    """The converted demo model (converted once per cache)."""
    old = os.environ.get("TUNESMITH_HOME")
    home = tmp_path_factory.mktemp("demo-home")
    (home / "cache").symlink_to(shared_cache, target_is_directory=True)
    os.environ["TUNESMITH_HOME"] = str(home)
    try:
        from app.core.models.demo_model import ensure_demo_model

        return ensure_demo_model()
    finally:
        if old is None:
            os.environ.pop("TUNESMITH_HOME", None)
        else:
            os.environ["TUNESMITH_HOME"] = old


@pytest.fixture(scope="session")
def demo_cli(demo_model_path, shared_cache, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`tunesmith demo` (the pirate-chef data, 56 steps at lr 1e-3, then its before/after report),
    run once per session in its own Tunesmith home: (that home, the finished process). The demo's
    own test reads what it printed; `demo_run` is its run."""
    home = tmp_path_factory.mktemp("demo-run-home")
    (home / "cache").symlink_to(shared_cache, target_is_directory=True)
    env = dict(os.environ, TUNESMITH_HOME=str(home))
    proc = subprocess.run([sys.executable, "-m", "app", "demo"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1500)
    return home, proc


@pytest.fixture(scope="session")
def demo_run(demo_cli) -> Path:
    """The finished demo run's folder; tests open it by its folder path."""
    home, proc = demo_cli
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run] = list((home / "data" / "runs").iterdir())
    return run


@pytest.fixture
def chat_data(tmp_path) -> Path:
    """16 short chats: the `messages` example file four times."""
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join((EXAMPLES / "messages.jsonl").read_text().splitlines() * 4) + "\n")
    return path


def train_tiny(model, data, steps: int = 6, stop_at: int | None = None, lr: float = 5e-3, quantize: str = "4bit",
               report: str = "off"):
    """A real run of a tiny model (128 tokens, micro-batch 4, on a 4-bit base unless `quantize`
    says otherwise); with `stop_at`, stopped after that step with a checkpoint, as the Stop
    button does. Without its before/after report unless `report` asks (tests/core/test_report.py
    tests it; the other tests keep its seconds)."""
    import threading

    from app.core.config import TrainConfig
    from app.core.events import StepMetrics
    from app.core.train.trainer import run_training

    stop = threading.Event()

    def on_event(event):
        if stop_at is not None and isinstance(event, StepMetrics) and event.step >= stop_at:
            stop.set()

    config = TrainConfig(model=str(model), data=str(data), seq_len=128, micro_batch=4, grad_accum=1, lr=lr,
                         max_steps=steps, save_every=100, lora_dropout=0.0, quantize=quantize, report=report)
    return run_training(config, on_event, stop)


@pytest.fixture
def tiny_run(tiny_model, chat_data):
    """A finished four-step run of the tiny model."""
    result = train_tiny(tiny_model, chat_data, steps=4)
    assert result.status == "finished", result.reason
    return result


@pytest.fixture
def window(qtbot):
    """The main window shown offscreen without loading the engine, left idle (no run, answer or
    export going) when the test ends."""
    from app.gui.main_window import MainWindow
    from app.gui.widgets.plots import use_palette

    use_palette(False)
    win = MainWindow(None, load_engine=False)
    qtbot.addWidget(win)
    win.show()
    yield win
    win.train_tab.stop_training()
    win.chat_tab.stop()
    qtbot.waitUntil(lambda: not (win.train_tab.running or win.chat_tab.answering or win.export_tab.exporting),
                    timeout=120_000)
    win.threads.wait_all()


def adapter_of_a_hub_base(tiny_run, tmp_path: Path) -> Path:
    """A downloaded-looking adapter whose base is a hub id with no copy on this machine."""
    import json
    import shutil

    adapter = tmp_path / "downloaded-adapter"
    shutil.copytree(tiny_run.adapter_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/not-here-7b"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter
