"""Read a GGUF file back and compare it with the Hugging Face folder it was written from: tensor
names and shapes against the expected mapping, key metadata (architecture, sizes, vocabulary, chat
template), and a few values of a few tensors within a tolerance that depends on the stored type."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from app.core.export.gguf import attention_heads, gguf_architecture, load_tensor, permute, plan_tensors
from app.core.export.gguf_tokenizer import tokenizer_kind

# Tolerance on |gguf - source| relative to the tensor's largest magnitude, per stored type.
TOLERANCE = {"F32": 1e-6, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q6_K": 0.04, "Q5_K": 0.06, "Q5_0": 0.06,
             "Q4_K": 0.1, "Q4_0": 0.1, "Q5_1": 0.06, "Q4_1": 0.1}
CHUNK_VALUES = 2**24  # values compared at once (64 MB in float32)


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
    config, arch = gguf_architecture(Path(model_dir))
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
    names += [f"blk.{b}.{part}.weight" for b in blocks for part in ("attn_norm", "attn_q", "attn_k", "attn_qkv",
                                                                      "ffn_down_exps", "ffn_gate_inp")]
    max_diff, checked = 0.0, 0
    for name in (n for n in names if n in shapes and shapes[n] == plan[n].shape):
        diff, scale = _compare(tensors[name], plan[name], config, arch)
        max_diff, checked = max(max_diff, diff), checked + 1
        if diff > TOLERANCE.get(tensors[name].tensor_type.name, 1e-2) * scale:
            problems.append(f"{name}: values differ by up to {diff:.3g} (largest value {scale:.3g})")
    return GgufCheck(not problems, problems, max_diff, len(tensors), len(plan), checked)


def _compare(tensor, planned, config: dict, arch: str) -> tuple[float, float]:
    """(largest |stored - source|, largest |source|) over the tensor, a few rows of token_embd,
    read CHUNK_VALUES at a time so that checking an 8B model's output matrix (0.5G values) holds
    tens of MB, not several GB of float32 copies. q and k are compared whole: un-permuting for
    llama.cpp's rotary layout mixes rows within each head."""
    shape = planned.shape
    permuted = arch == "llama" and planned.name.endswith(("attn_q.weight", "attn_k.weight"))
    end = min(8, shape[0]) if planned.name == "token_embd.weight" else shape[0]
    step = end if permuted or len(shape) == 1 else max(1, CHUNK_VALUES // math.prod(shape[1:]))
    diff = scale = 0.0
    for start in range(0, end, step):
        rows = slice(start, min(end, start + step))
        stored = gguf.quants.dequantize(np.asarray(tensor.data[rows]), tensor.tensor_type)
        stored = stored.reshape(-1, *shape[1:]) if len(shape) > 1 else stored
        if permuted:
            stored = permute(stored, attention_heads(config, planned.name), inverse=True)
        source = load_tensor(planned, config, "none" if permuted else arch, rows)  # Gemma's norms hold w + 1
        diff = max(diff, float(np.max(np.abs(stored - source))))
        scale = max(scale, float(np.max(np.abs(source))))
    return diff, scale or 1.0


def _check_metadata(reader: gguf.GGUFReader, config: dict, arch: str, model_dir: Path) -> list[str]:
    def value(key: str):
        return found.contents() if (found := reader.get_field(key)) is not None else None

    problems = []
    tokens = value(gguf.Keys.Tokenizer.LIST) or []
    expected = {gguf.Keys.General.ARCHITECTURE: arch, f"{arch}.block_count": config["num_hidden_layers"],
                f"{arch}.embedding_length": config["hidden_size"], f"{arch}.vocab_size": config["vocab_size"],
                gguf.Keys.Tokenizer.MODEL: tokenizer_kind(model_dir)}
    for key, want in expected.items():
        if value(key) != want:
            problems.append(f"metadata {key} is {value(key)!r}, expected {want!r}")
    if len(tokens) != config["vocab_size"]:
        problems.append(f"{len(tokens)} tokens in the GGUF vocabulary, expected vocab_size {config['vocab_size']}")
    template = gguf.SpecialVocab(model_dir).chat_template
    if template is not None and value(gguf.Keys.Tokenizer.CHAT_TEMPLATE) != template:
        problems.append("tokenizer.chat_template is missing or differs from the model's chat template")
    return problems
