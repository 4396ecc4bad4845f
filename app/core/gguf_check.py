"""Read a GGUF file back and compare it with the Hugging Face folder it was written from: tensor
names and shapes against the expected mapping, key metadata (architecture, sizes, vocabulary, chat
template), and a few values of a few tensors within a tolerance that depends on the stored type."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from app.core.gguf_export import attention_heads, load_tensor, permute, plan_tensors, read_config

# Tolerance on |gguf - source| relative to the tensor's largest magnitude, per stored type.
TOLERANCE = {"F32": 1e-6, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2}


@dataclass
class GgufCheck:
    """What `verify_gguf` found; `ok` is True when `problems` is empty."""

    ok: bool
    problems: list[str]
    max_abs_diff: float
    tensor_count: int
    expected_count: int
    values_checked: int


def verify_gguf(gguf_file: Path, model_dir: Path, samples: int = 3) -> GgufCheck:
    """Read `gguf_file` back and compare it with the HF folder it came from.

    Checks tensor names and shapes against the expected mapping, key metadata, and the values of
    token_embd (a few rows), output, and the attn_norm, q (un-permuted) and k weights of `samples`
    blocks spread over the depth, within a tolerance that depends on the stored type.
    """
    config, arch = read_config(Path(model_dir))
    plan = {item.name: item for item in plan_tensors(Path(model_dir), config, arch)}
    try:
        reader = gguf.GGUFReader(gguf_file)
    except (OSError, ValueError) as err:
        return GgufCheck(False, [f"{gguf_file}: not a readable GGUF file ({err})"], 0.0, 0, len(plan), 0)
    tensors = {t.name: t for t in reader.tensors}
    problems = [f"missing tensor {name}" for name in plan if name not in tensors]
    problems += [f"unexpected tensor {name}" for name in tensors if name not in plan]
    shapes = {name: tuple(int(d) for d in reversed(tensors[name].shape))  # GGUF lists dims fastest first
              for name in plan.keys() & tensors.keys()}
    problems += [f"{name}: shape {shape}, expected {plan[name].shape}"
                 for name, shape in sorted(shapes.items()) if shape != plan[name].shape]
    problems += _check_metadata(reader, config, arch, Path(model_dir))
    n_layers = config["num_hidden_layers"]
    blocks = sorted({round(i * (n_layers - 1) / max(samples - 1, 1)) for i in range(max(samples, 1))})
    names = ["token_embd.weight", "output.weight", "output_norm.weight"]
    names += [f"blk.{b}.{part}.weight" for b in blocks for part in ("attn_norm", "attn_q", "attn_k")]
    max_diff, checked = 0.0, 0
    for name in (n for n in names if n in shapes and shapes[n] == plan[n].shape):
        rows = slice(0, 8) if name == "token_embd.weight" else slice(None)
        tensor = tensors[name]
        stored = gguf.quants.dequantize(np.asarray(tensor.data[rows]), tensor.tensor_type)
        stored = stored.reshape(-1, *plan[name].shape[1:]) if len(plan[name].shape) > 1 else stored
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            stored = permute(stored, attention_heads(config, name), inverse=True)
        source = load_tensor(plan[name], config, "none", rows)
        diff = float(np.max(np.abs(stored - source)))
        scale = float(np.max(np.abs(source))) or 1.0
        max_diff, checked = max(max_diff, diff), checked + 1
        if diff > TOLERANCE.get(tensor.tensor_type.name, 1e-2) * scale:
            problems.append(f"{name}: values differ by up to {diff:.3g} (largest value {scale:.3g})")
    return GgufCheck(not problems, problems, max_diff, len(tensors), len(plan), checked)


def _check_metadata(reader: gguf.GGUFReader, config: dict, arch: str, model_dir: Path) -> list[str]:
    def value(key: str):
        return found.contents() if (found := reader.get_field(key)) is not None else None

    problems = []
    tokens = value(gguf.Keys.Tokenizer.LIST) or []
    expected = {gguf.Keys.General.ARCHITECTURE: arch, f"{arch}.block_count": config["num_hidden_layers"],
                f"{arch}.embedding_length": config["hidden_size"], f"{arch}.vocab_size": config["vocab_size"],
                gguf.Keys.Tokenizer.MODEL: "gpt2"}
    for key, want in expected.items():
        if value(key) != want:
            problems.append(f"metadata {key} is {value(key)!r}, expected {want!r}")
    if len(tokens) != config["vocab_size"]:
        problems.append(f"{len(tokens)} tokens in the GGUF vocabulary, expected vocab_size {config['vocab_size']}")
    template = gguf.SpecialVocab(model_dir).chat_template
    if template is not None and value(gguf.Keys.Tokenizer.CHAT_TEMPLATE) != template:
        problems.append("tokenizer.chat_template is missing or differs from the model's chat template")
    return problems
