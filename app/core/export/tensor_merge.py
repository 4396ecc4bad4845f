"""Merge a LoRA adapter into its base model one tensor at a time, so that RAM holds one output
shard, never the model.

Loading an 8B model whole to merge needs ~16 GB in bf16 (32 GB in f32), more than many
hobbyists' machines have beside the GPU. Here the base model's safetensors files are read tensor
by tensor (plain reads, not memory maps, so the bytes are freed as soon as a tensor is written);
a weight that LoRA adapted becomes W + scale * B @ A, computed in fp32 and cast once to the output
dtype; tensors are gathered into output shards of at most SHARD_BYTES and each shard is written
and flushed before the next begins. Peak RAM is about one output shard plus the largest tensor in
fp32 plus the adapter: `merge_ram`.

Plain LoRA (with or without rsLoRA) on linear layers is what Tunesmith trains; an adapter using
anything else (DoRA, rank or alpha patterns, trained embeddings or biases, modules_to_save) or a
base model stored any other way (pickle weights, 4-bit checkpoints, names that transformers
renames on load) makes `plan_merge` raise CannotStream with the reason, and the export falls back to loading the
model whole with PEFT.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.core.atomic import write_json
from app.core.errors import ExportError, ModelError
from app.core.models.files import read_config, read_safetensors_header, safetensors_files
from app.core.units import gib

SHARD_BYTES = 2 * 2**30  # as save_pretrained(max_shard_size="2GB")
_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_OTHER_BYTES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4}  # the export's --dtype choices
TORCH_DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
_LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
_UNSUPPORTED = (("use_dora", "DoRA"), ("rank_pattern", "per-layer ranks"), ("alpha_pattern", "per-layer alphas"),
                ("modules_to_save", "fully trained modules (modules_to_save)"), ("fan_in_fan_out", "fan_in_fan_out"),
                ("lora_bias", "trained LoRA biases"))
COPIED_FILES = ("generation_config.json",)


class CannotStream(Exception):
    """Why a merge cannot run tensor by tensor (the export then loads the model whole)."""


@dataclass
class _Tensor:
    file: Path
    offset: int  # of its first byte in the file
    nbytes: int
    dtype: str  # safetensors code
    shape: list[int]


@dataclass
class MergePlan:
    """What a streamed merge reads: every base tensor, and the LoRA factors per adapted weight."""

    tensors: dict[str, _Tensor]
    lora: dict[str, tuple[str, str, float]]  # base weight name -> (A key, B key, scale)
    adapter_file: Path
    adapter_bytes: int


@dataclass
class MergeSummary:
    files: list[str]
    tensors: int
    merged_weights: int
    bytes: int


def plan_merge(base_dir: Path, adapter_dir: Path) -> MergePlan:
    """Read the safetensors headers of the base and the adapter and pair each LoRA factor with the
    base weight it adapts; CannotStream says why not."""
    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ExportError(f"{adapter_dir / 'adapter_config.json'}: unreadable ({err}); the adapter folder is "
                          "incomplete") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise CannotStream(f"the adapter is {config.get('peft_type')}, not LoRA")
    for key, what in _UNSUPPORTED:
        if config.get(key):
            raise CannotStream(f"the adapter uses {what}")
    if config.get("bias", "none") != "none":
        raise CannotStream("the adapter trains biases")
    adapter_file = adapter_dir / "adapter_model.safetensors"
    if not adapter_file.is_file():
        raise CannotStream("the adapter is not stored as adapter_model.safetensors")
    tensors: dict[str, _Tensor] = {}
    for file in _weight_files(base_dir):
        header_len, header = read_safetensors_header(file)
        for name, entry in header.items():
            if entry["dtype"] not in _FLOAT_BYTES | _OTHER_BYTES:
                raise CannotStream(f"{file.name} stores {name} as {entry['dtype']} (a quantised checkpoint?)")
            begin, end = entry["data_offsets"]
            tensors[name] = _Tensor(file, 8 + header_len + begin, end - begin, entry["dtype"], entry["shape"])
    _, adapter_header = read_safetensors_header(adapter_file)
    factors: dict[str, dict[str, list[int]]] = {}
    for key, entry in adapter_header.items():
        match = _LORA_KEY.fullmatch(key)
        if not match:
            raise CannotStream(f"the adapter holds {key}, which is not a LoRA A/B factor of a linear layer")
        factors.setdefault(match.group(1), {})[match.group(2)] = entry["shape"]
    alpha, use_rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora"))
    lora = {}
    for module, shapes in sorted(factors.items()):
        weight = f"{module}.weight"
        if set(shapes) != {"A", "B"} or weight not in tensors:
            raise CannotStream(f"the adapter's {module} has no matching {weight} in the base model's files")
        (rank, fan_in), (fan_out, rank_b) = shapes["A"], shapes["B"]
        if tensors[weight].dtype not in _FLOAT_BYTES:
            raise CannotStream(f"the base model stores {weight} as {tensors[weight].dtype} (a quantised checkpoint?)")
        if rank != rank_b or tensors[weight].shape != [fan_out, fan_in]:
            raise CannotStream(f"the adapter's {module} factors {shapes['B']} x {shapes['A']} do not fit "
                                f"{weight} {tensors[weight].shape}")
        scale = alpha / (math.sqrt(rank) if use_rslora else rank)
        prefix = f"base_model.model.{module}"
        lora[weight] = (f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight", scale)
    if not lora:
        raise CannotStream("the adapter holds no LoRA factors")
    return MergePlan(tensors, lora, adapter_file, adapter_file.stat().st_size)


def merge_ram(plan: MergePlan, dtype: str, shard_bytes: int = SHARD_BYTES) -> int:
    """Bytes of RAM a streamed merge needs at most: a full output shard, the largest tensor as
    read, in fp32 and once more during the merge, and the adapter in fp32, with 10 % for the
    interpreter and allocator."""
    counts = [t.nbytes // _width(t.dtype) for t in plan.tensors.values()]
    largest = max(counts)
    out_shard = min(max(shard_bytes, largest * DTYPE_BYTES[dtype]), sum(counts) * DTYPE_BYTES[dtype])
    return int(1.1 * (out_shard + largest * (4 + 4 + 4) + 2 * plan.adapter_bytes) + 300 * 2**20)


def merge_shards(plan: MergePlan, out_dir: Path, dtype: str = "bf16",
                 progress: Callable[[str], None] = lambda message: None,
                 shard_bytes: int = SHARD_BYTES, nf4_compute: str = "") -> MergeSummary:
    """Write the merged model's weights (and an index when there are several shards) into `out_dir`.
    `nf4_compute` (a torch dtype name, e.g. "bfloat16"): merge into the weights a QLoRA run trained
    against, every quantised linear weight rounded to NF4 and back as bitsandbytes did it in
    training, instead of into the original ones ("")."""
    import torch
    from safetensors.torch import load_file, save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = getattr(torch, TORCH_DTYPES[dtype])
    adapter = {key: value.float() for key, value in load_file(str(plan.adapter_file)).items()}
    shards: list[tuple[str, list[str], int]] = []  # (temporary file name, tensor names, bytes)
    pending: dict[str, torch.Tensor] = {}
    pending_bytes, written, merged, total = 0, 0, 0, len(plan.tensors)

    def flush() -> None:
        nonlocal pending, pending_bytes
        path = out_dir / f".shard-{len(shards) + 1:05d}.safetensors"
        save_file(pending, str(path), metadata={"format": "pt"})
        _fsync(path)
        shards.append((path.name, list(pending), pending_bytes))
        pending, pending_bytes = {}, 0

    for index, name in enumerate(sorted(plan.tensors, key=_natural), 1):
        tensor = _read(plan.tensors[name])
        if nf4_compute and was_quantised(name, tensor):
            tensor = as_trained(tensor, nf4_compute)
        if name in plan.lora:
            key_a, key_b, scale = plan.lora[name]
            weight = tensor.float()
            del tensor
            weight.addmm_(adapter[key_b], adapter[key_a], alpha=scale)  # W + scale * B @ A, in fp32
            tensor = weight.to(target)
            del weight
            merged += 1
        elif tensor.is_floating_point():
            tensor = tensor.to(target)
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > shard_bytes:
            flush()
        pending[name] = tensor
        pending_bytes += size
        written += size
        del tensor
        if index % 16 == 0 or index == total:
            progress(f"Merging: {index} of {total} tensors ({gib(written, 1)} written)")
    flush()
    files = _name_shards(out_dir, shards)
    return MergeSummary(files, total, merged, written)


def was_quantised(name: str, tensor) -> bool:
    """Whether QLoRA stored this weight in NF4: the linear layers of the decoder blocks (as
    transformers' bitsandbytes loading does; embeddings, norms and the output head stay 16-bit)."""
    return tensor.dim() == 2 and tensor.is_floating_point() and ".layers." in name and name.endswith(".weight")


def as_trained(weight, compute: str):
    """`weight` as a QLoRA run saw it: loaded in the compute dtype, quantised to NF4 with double
    quantisation by bitsandbytes' own quantizer (blocks of 64, as Params4bit does on loading)
    and dequantised again, in fp32."""
    import bitsandbytes.functional as bnb_functional
    import torch

    packed, state = bnb_functional.quantize_4bit(weight.to(getattr(torch, compute)), blocksize=64,
                                                 compress_statistics=True, quant_type="nf4",
                                                 quant_storage=torch.uint8)
    return bnb_functional.dequantize_4bit(packed, state).float()


def write_merged_config(base_dir: Path, out_dir: Path, dtype: str, trust_remote_code: bool = False) -> None:
    """config.json with the output dtype, the generation config, and (for a model with its own code,
    when allowed) its Python files."""
    config = read_config(base_dir)
    name = TORCH_DTYPES[dtype]
    config.pop("quantization_config", None)
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = name
    write_json(Path(out_dir) / "config.json", config)
    extra = list(Path(base_dir).glob("*.py")) if trust_remote_code else []
    for file in [Path(base_dir) / n for n in COPIED_FILES] + extra:
        if file.is_file():
            shutil.copyfile(file, Path(out_dir) / file.name)


# -- helpers ------------------------------------------------------------------------------------------
def _weight_files(base_dir: Path) -> list[Path]:
    files = safetensors_files(base_dir)
    if not files:
        raise CannotStream("the base model's weights are not safetensors files")
    return files


def _read(entry: _Tensor):
    """One tensor read into memory of its own (no memory map stays behind)."""
    import torch

    codes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    view, done = memoryview(buffer.numpy()), 0
    with open(entry.file, "rb") as handle:
        handle.seek(entry.offset)
        while done < entry.nbytes:
            count = handle.readinto(view[done:])
            if not count:
                raise ModelError(f"{entry.file}: ends early; download the model again")
            done += count
    return buffer.view(codes[entry.dtype]).reshape(entry.shape)


def _width(code: str) -> int:
    return (_FLOAT_BYTES | _OTHER_BYTES)[code]


def _natural(name: str) -> list:
    """model.layers.2 before model.layers.10, so shards hold whole layers in order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _name_shards(out_dir: Path, shards: list[tuple[str, list[str], int]]) -> list[str]:
    """Rename the written shards as save_pretrained names them and write the index."""
    if len(shards) == 1:
        os.replace(out_dir / shards[0][0], out_dir / "model.safetensors")
        return ["model.safetensors"]
    weight_map, files = {}, []
    for number, (temporary, names, _) in enumerate(shards, 1):
        final = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out_dir / temporary, out_dir / final)
        files.append(final)
        weight_map.update(dict.fromkeys(names, final))
    write_json(out_dir / "model.safetensors.index.json",
               {"metadata": {"total_size": sum(size for *_, size in shards)}, "weight_map": weight_map})
    return files + ["model.safetensors.index.json"]


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
