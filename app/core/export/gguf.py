"""Write a Hugging Face model folder as one GGUF file that llama.cpp and Ollama load, and check it.

Our own compact take on llama.cpp's `convert_hf_to_gguf.py` for the architectures Tunesmith fine-tunes
(gguf_arch.py: Llama, SmolLM and Mistral with q/k permuted into llama.cpp's rotary layout, Qwen2,
Qwen3, Gemma 2 and 3, Phi-3, OLMo 2; Mixtral, Qwen2-MoE and Qwen3-MoE with each layer's experts
stacked into 3-D tensors). The tokenizer (gguf_tokenizer.py) is a GPT-2-style byte-level BPE
`tokenizer.json` (Llama 3, Qwen2, SmolLM, Mistral Nemo) or a SentencePiece `tokenizer.model`
(Llama 2, Mistral 7B, Phi-3). Tensors stream one at a time from the safetensors files into a
temporary file beside the target, renamed into place only when complete. `gguf_check.verify_gguf`
reads a written file back and compares it with the source folder.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from app.core.errors import ExportError
from app.core.models.support import GGUF_ARCHITECTURES, declared_architecture, experts, gguf_problem
from app.core.export.gguf_arch import (EXPERT_PARTS, EXPERT_RE, NORM_PLUS_ONE, add_architecture, block_parts,
                                       llama3_rope_factors, rope_parameters)
from app.core.errors import ModelError
from app.core.export.gguf_tokenizer import add_tokenizer
from app.core.export.quantize import BY_LLAMA_CPP, WRITTEN, check_quant, llama_quantize
from app.core.models.files import read_config, read_safetensors_header, safetensors_files


QUANTS = {name: gguf.GGMLQuantizationType[kind] for name, kind in WRITTEN.items()}  # what we write ourselves
FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "f32": gguf.LlamaFileType.ALL_F32,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0}
# with q4_0 and q5_0 the output matrix (or the tied embeddings) stays at q8_0: 4 bits there cost
# the most quality per byte saved (llama.cpp's own q4_0 keeps it at 6 bits)
LOW_BIT_OUTPUT = gguf.GGMLQuantizationType.Q8_0


@dataclass
class GgufSummary:
    """What `write_gguf` wrote."""

    path: Path
    bytes: int
    tensor_count: int
    arch: str
    quant: str
    tensors: list[tuple[str, tuple[int, ...], str]]
    """(GGUF name, shape in PyTorch order, GGML type name) for every tensor, in file order."""
    pre_tokenizer: str = "default"
    warnings: list[str] = field(default_factory=list)


def write_gguf(model_dir: Path, out_file: Path, quant: str = "f16",
               progress: Callable[[str, float], None] | None = None, pre_tokenizer: str = "") -> GgufSummary:
    """Convert `model_dir` (config.json, safetensors, tokenizer.json) into the GGUF file `out_file`.

    `quant` is one of QUANTS, written here: norms and biases stay f32, a weight whose rows are not a
    multiple of the block size is stored as f16, as llama.cpp does; or a K-quant (BY_LLAMA_CPP),
    written at 16 bits beside the target and quantised by llama.cpp. `progress(message, fraction)` is called per
    tensor; an exception it raises cancels the export. Nothing is left behind on any error.
    `pre_tokenizer` names llama.cpp's pre-tokenizer by hand (PRE_TOKENIZERS) for a tokenizer we
    cannot identify, which is otherwise refused: a wrong guess would mis-tokenise silently.
    """
    model_dir, out_file = Path(model_dir), Path(out_file)
    check_quant(quant)
    if quant in BY_LLAMA_CPP:
        return write_k_quant(model_dir, out_file, quant, progress, pre_tokenizer)
    config, arch = gguf_architecture(model_dir)
    plan = plan_tensors(model_dir, config, arch)
    report = progress or (lambda message, fraction: None)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.{uuid.uuid4().hex[:8]}.tmp")
    writer = gguf.GGUFWriter(None, arch)
    try:
        pre, warnings = _add_metadata(writer, model_dir, config, arch, quant, pre_tokenizer)
        for item in plan:
            item.qtype = _tensor_type(item.name, item.shape, quant, bool(config.get("tie_word_embeddings")))
            nbytes = math.prod(gguf.quants.quant_shape_to_byte_shape(item.shape, item.qtype))
            writer.add_tensor_info(item.name, item.shape, np.dtype(np.float32), nbytes, raw_dtype=item.qtype)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total, done = sum(math.prod(item.shape) for item in plan) or 1, 0
        for item in plan:
            report(f"Writing {item.name} ({item.qtype.name})", done / total)
            writer.write_tensor_data(gguf.quants.quantize(load_tensor(item, config, arch), item.qtype))
            done += math.prod(item.shape)
        for handle in writer.fout or []:
            handle.flush()
            os.fsync(handle.fileno())
        writer.close()
        os.replace(tmp, out_file)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    report(f"Wrote {out_file.name}", 1.0)
    rows = [(item.name, item.shape, item.qtype.name) for item in plan]
    return GgufSummary(out_file, out_file.stat().st_size, len(rows), arch, quant, rows, pre, warnings)


# --- configuration and tensor plan ---------------------------------------------------------------

@dataclass
class _Planned:
    name: str  # GGUF name
    shape: tuple[int, ...]  # PyTorch order
    source: str  # HF tensor name, or "" for a generated tensor
    file: Path | None = None
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32
    values: np.ndarray | None = None  # a generated tensor's values (RoPE factors)
    pieces: tuple[tuple[Path, str], ...] = ()  # (file, HF name) of each expert, stacked on axis 0


def write_k_quant(model_dir: Path, out_file: Path, quant: str, progress, pre_tokenizer: str):
    """The model at 16 bits (the merged weights' own type) in a hidden file beside `out_file`,
    quantised by llama.cpp into `out_file`; the 16-bit file is removed whatever happens."""
    report = progress or (lambda message, fraction: None)
    wide = "bf16" if _weights_dtype(model_dir) == "BF16" else "f16"
    tmp = out_file.with_name(f".{out_file.stem}.{uuid.uuid4().hex[:8]}.{wide}.gguf")
    staged = out_file.with_name(f".{out_file.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        first = write_gguf(model_dir, tmp, wide, lambda m, f: report(m, 0.5 * f), pre_tokenizer)
        llama_quantize(tmp, staged, quant, lambda m, f: report(m, 0.5 + 0.5 * f))
        os.replace(staged, out_file)
    finally:
        tmp.unlink(missing_ok=True)
        staged.unlink(missing_ok=True)
    reader = gguf.GGUFReader(out_file)
    rows = [(t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name) for t in reader.tensors]
    return GgufSummary(out_file, out_file.stat().st_size, len(rows), first.arch, quant, rows,
                       first.pre_tokenizer, first.warnings)


def _weights_dtype(model_dir: Path) -> str:
    """The safetensors dtype of the model's first weight ("BF16", "F16", "F32")."""
    header = next(iter(safetensors_headers(model_dir).values()))
    return next((entry["dtype"] for entry in header.values()), "F16")


_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_BLOCK_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def gguf_architecture(model_dir: Path) -> tuple[dict, str]:
    """(config.json, llama.cpp's architecture name) of a model folder the writer supports; an
    ExportError naming the architecture for one it does not."""
    config = read_config(Path(model_dir))
    problem = gguf_problem(config)
    if problem:
        raise ExportError(f"{model_dir}: {problem}")
    return config, GGUF_ARCHITECTURES[declared_architecture(config)]


def safetensors_headers(model_dir: Path) -> dict[Path, dict]:
    try:
        files = safetensors_files(model_dir)
        if not files:
            raise ExportError(f"{model_dir}: no *.safetensors weights; save the model with safetensors first")
        return {file: read_safetensors_header(file)[1] for file in files}
    except ModelError as err:  # damaged or truncated: the export's own kind of error
        raise ExportError(str(err)) from None


def plan_tensors(model_dir: Path, config: dict, arch: str) -> list[_Planned]:
    tied = bool(config.get("tie_word_embeddings", False))
    parts = block_parts(config, arch)
    planned: dict[str, _Planned] = {}
    stacks: dict[str, dict[int, tuple[Path, str, tuple[int, ...]]]] = {}
    for file, header in safetensors_headers(model_dir).items():
        for hf_name, entry in header.items():
            if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                continue
            match, shape = _BLOCK_RE.fullmatch(hf_name), tuple(int(d) for d in entry["shape"])
            expert = EXPERT_RE.fullmatch(hf_name) if experts(config) else None
            name = _GLOBAL.get(hf_name)
            if match and match.group(2) in parts:
                name = f"blk.{match.group(1)}.{parts[match.group(2)]}.{match.group(3)}"
            elif expert and expert.group(3) in EXPERT_PARTS:
                name = f"blk.{expert.group(1)}.{EXPERT_PARTS[expert.group(3)]}.weight"
            if name is None or entry["dtype"] not in ("F32", "F16", "BF16", "F64"):
                raise ExportError(f"{file.name}: tensor {hf_name} ({entry['dtype']}) has no GGUF counterpart; "
                                  "export a merged full-precision model, not a 4-bit model or an adapter")
            if expert:
                stacks.setdefault(name, {})[int(expert.group(2))] = (file, hf_name, shape)
            else:
                planned[name] = _Planned(name, shape, hf_name, file)
    planned.update(_stacked(stacks, experts(config), model_dir))
    required = ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"])
    per_block = list(parts.values()) + (sorted(set(EXPERT_PARTS.values())) if experts(config) else [])
    for name in required + [f"blk.{i}.{p}.weight" for i in range(config["num_hidden_layers"]) for p in per_block]:
        if name not in planned:
            raise ExportError(f"{model_dir}: no weights for {name}; the safetensors files do not match "
                              "config.json (an unfinished download or save?)")
    if (freqs := llama3_rope_factors(config)) is not None and arch == "llama":
        planned["rope_freqs.weight"] = _Planned("rope_freqs.weight", freqs.shape, "", values=freqs)
    rope = rope_parameters(config)
    if arch == "phi3" and rope["rope_type"] == "longrope":
        for kind in ("long", "short"):
            factors = np.asarray(rope[f"{kind}_factor"], dtype=np.float32)
            name = f"rope_factors_{kind}.weight"
            planned[name] = _Planned(name, factors.shape, "", values=factors)
    return sorted(planned.values(), key=_file_order)


def _stacked(stacks: dict, count: int, model_dir: Path) -> dict[str, _Planned]:
    """One 3-D tensor per layer and kind from each expert's matrix: all `count` of them, one shape."""
    planned = {}
    for name, found in stacks.items():
        shapes = {shape for _, _, shape in found.values()}
        if sorted(found) != list(range(count)) or len(shapes) != 1:
            raise ExportError(f"{model_dir}: {name} needs {count} experts of one shape, found {len(found)} "
                              f"({', '.join(map(str, sorted(shapes)))}); the safetensors files do not match config.json")
        pieces = tuple((file, hf_name) for _, (file, hf_name, _) in sorted(found.items()))
        planned[name] = _Planned(name, (count, *shapes.pop()), pieces[0][1], pieces[0][0], pieces=pieces)
    return planned


def _file_order(item: _Planned) -> tuple:
    """token_embd and rope_freqs first, then the blocks in numeric order, output_norm and output last."""
    parts = item.name.split(".")
    group = (1, int(parts[1])) if parts[0] == "blk" else (2 if parts[0].startswith("output") else 0, 0)
    return group, item.name


def _tensor_type(name: str, shape: tuple[int, ...], quant: str, tied: bool) -> gguf.GGMLQuantizationType:
    if len(shape) <= 1 or name.endswith(("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")) or (
            not name.endswith(".weight")):  # norms, biases and MoE routers stay f32, as in llama.cpp
        return gguf.GGMLQuantizationType.F32
    qtype = QUANTS[quant]
    if quant in ("q4_0", "q5_0") and name == ("token_embd.weight" if tied else "output.weight"):
        qtype = LOW_BIT_OUTPUT
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return gguf.GGMLQuantizationType.F16 if shape[-1] % block else qtype


def load_tensor(item: _Planned, config: dict, arch: str, rows: slice = slice(None)) -> np.ndarray:
    """One tensor (or some of its rows) as float32 in PyTorch order, permuted for llama.cpp when
    `arch` is "llama"."""
    if item.values is not None:
        return item.values[rows]
    if item.pieces:
        data = np.stack([_read(file, source) for file, source in item.pieces[rows]])
    else:
        data = _read(item.file, item.source, rows)
    if arch == "llama" and item.name.startswith("blk.") and item.name.split(".")[2] in ("attn_q", "attn_k"):
        data = permute(data, attention_heads(config, item.name))
    if arch in NORM_PLUS_ONE and item.name.endswith("norm.weight"):
        data = data + 1.0
    return data


def _read(file: Path, source: str, rows: slice = slice(None)) -> np.ndarray:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return handle.get_slice(source)[rows].float().numpy()
    except (OSError, SafetensorError) as err:
        raise ExportError(f"{file}: cannot read {source} ({err}); save or download it again") from None


def attention_heads(config: dict, name: str) -> int:
    n_head = config["num_attention_heads"]
    return n_head if ".attn_q." in name else config.get("num_key_value_heads") or n_head


def permute(weights: np.ndarray, n_head: int, inverse: bool = False) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF rotary halves -> interleaved pairs per head (or back)."""
    split = (n_head, weights.shape[0] // n_head // 2, 2) if inverse else (n_head, 2, weights.shape[0] // n_head // 2)
    return weights.reshape(*split, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


# --- metadata and tokenizer ------------------------------------------------------------------------

def _add_metadata(writer: gguf.GGUFWriter, model_dir: Path, config: dict, arch: str,
                  quant: str, pre_tokenizer: str = "") -> tuple[str, list[str]]:
    n_head = config["num_attention_heads"]
    writer.add_type("model")
    writer.add_name(model_dir.name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    rope = rope_parameters(config)
    if rope["rope_theta"] is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_file_type(FILE_TYPES[quant])
    writer.add_vocab_size(config["vocab_size"])
    add_architecture(writer, config, arch, model_dir / "config.json")
    pre, warnings = add_tokenizer(writer, model_dir, config, pre_tokenizer, space_prefix=arch not in NORM_PLUS_ONE)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return pre, warnings


