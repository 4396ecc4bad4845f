"""Check a model folder before anything loads from it: config, architecture, weights, tokenizer.

Only files are read here: config.json as JSON and the safetensors headers. No model code runs,
no pickle is unpickled, so a folder can be judged safely before the user commits to it.
"""

from __future__ import annotations

import json
from pathlib import Path

from app.core.errors import ModelError
from app.core.models.facts import ModelFacts, arch_or_none

PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def inspect_folder(path: Path, trust_remote_code: bool = False, allow_pickle: bool = False,
                   check_weights: bool = True) -> ModelFacts:
    """Validate `path` as a causal-LM folder; raise ModelError with the fix when it is not one.
    The record is named after the folder, of kind "folder"; resolve_model says where it came from."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: not a folder")
    config = read_config(path)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelError(f"{path / 'config.json'}: no 'model_type'; is this a Hugging Face model folder?")
    architecture = ", ".join(config.get("architectures") or []) or model_type
    needs_code = _needs_remote_code(path, config, model_type, architecture)
    if needs_code and not trust_remote_code:
        raise ModelError(f"{path}: model type '{model_type}' needs the model's own Python code; "
                         "Tunesmith does not run it unless you pass --trust-remote-code for a model you trust")
    # the same gate for every command that reads the folder (train, plan, check-data, chat, export)
    refuse_own_code(path, "tokenizer_config.json", "its tokenizer", trust_remote_code)
    weights, pickle_only = _weight_files(path, allow_pickle)
    parameters = None
    if check_weights:
        parameters = sum(check_safetensors(f) for f in weights if f.suffix == ".safetensors") or None
    size = sum(f.stat().st_size for f in weights)
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise ModelError(f"{path}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); "
                         "copy the tokenizer from the original model into the folder")
    return ModelFacts(path.name, "folder", str(path), path, path / "config.json", config, arch_or_none(config),
                      weights, parameters, size, pickle_only, needs_code)


def read_config(path: Path) -> dict:
    """config.json of a model folder (or the config file `path` itself) as a dict, or a ModelError
    that says what is wrong with it: the one reader of model configs."""
    path = Path(path)
    file = path if path.suffix == ".json" else path / "config.json"
    if not file.exists():
        raise ModelError(f"{path}: no config.json; a model folder holds config.json, weights and "
                         "tokenizer files (as written by save_pretrained)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelError(f"{file}: not UTF-8 text; the config is damaged, download it again") from None
    except json.JSONDecodeError as err:
        raise ModelError(f"{file}:{err.lineno}: not valid JSON ({err.msg}); "
                         "the config is damaged, download it again") from None
    if not isinstance(config, dict):
        raise ModelError(f"{file}: expected a JSON object")
    return config


def _needs_remote_code(path: Path, config: dict, model_type: str, architecture: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    auto_map = config.get("auto_map") or {}
    if not isinstance(auto_map, dict):
        auto_map = {}
    if model_type in CONFIG_MAPPING_NAMES:
        causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        declared = config.get("architectures") or []
        declared_causal = not declared or any(a in causal_classes or a.endswith("ForCausalLM") for a in declared)
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not declared_causal:
            if "AutoModelForCausalLM" in auto_map:  # its causal LM is its own code, not transformers'
                return True
            raise ModelError(f"{path}: '{model_type}' ({architecture}) is not a causal language model; "
                             "Tunesmith fine-tunes text-generation models such as Llama, Qwen or Mistral")
        return False
    if not auto_map:
        raise ModelError(f"{path}: model type '{model_type}' is not known to this transformers version; "
                         "upgrade transformers or choose another model")
    if "AutoModelForCausalLM" not in auto_map:
        raise ModelError(f"{path}: model type '{model_type}' needs the model's own Python code (auto_map in "
                         f"config.json), and that code names no causal language model (it maps "
                         f"{', '.join(sorted(auto_map))}, not AutoModelForCausalLM); Tunesmith fine-tunes "
                         "text-generation models such as Llama, Qwen or Mistral")
    return True


def safetensors_files(path: Path) -> list[Path]:
    """The model's safetensors files: those its shard index lists (a ModelError when the index is
    damaged or a listed shard is missing), else every *.safetensors but an adapter's; [] for none."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError, UnicodeDecodeError):
            raise ModelError(f"{index}: damaged shard index; download the model again") from None
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise ModelError(f"{path}: shard {missing[0]} listed in model.safetensors.index.json is missing "
                             f"({len(missing)} of {len(shards)} missing); finish or repeat the download")
        return [path / s for s in shards]
    return sorted(f for f in path.glob("*.safetensors") if not f.name.startswith("adapter_"))


def _weight_files(path: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    safetensors = safetensors_files(path)
    if safetensors:
        return safetensors, False
    pickles = sorted({f for pattern in PICKLE_PATTERNS for f in path.glob(pattern)})
    if pickles:
        if not allow_pickle:
            raise ModelError(f"{path}: only pickle weights ({pickles[0].name}), which can run code when "
                             "loaded; use a safetensors copy, or pass --allow-pickle if you trust the source")
        return pickles, True
    raise ModelError(f"{path}: no weights (*.safetensors) found; finish the download or save the "
                     "model with save_pretrained")


def check_safetensors(file: Path) -> int:
    """Number of elements in a safetensors file; ModelError if it is truncated or corrupt."""
    return sum(_numel(entry["shape"]) for entry in read_safetensors_header(file)[1].values())


def read_safetensors_header(file: Path) -> tuple[int, dict]:
    """(header length, {tensor name: {"dtype", "shape", "data_offsets"}}) of a safetensors file,
    checked against the file's size; ModelError if it is truncated or corrupt. A tensor's bytes
    start at 8 + header length + its first data offset."""
    file = Path(file)
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_len <= 1 or header_len > min(size - 8, 100 * 2**20):
                raise ValueError("bad header length")
            header = json.loads(handle.read(header_len))
        header.pop("__metadata__", None)
        end = 0
        for name, entry in header.items():
            begin, stop = entry["data_offsets"]
            width = _DTYPE_BYTES.get(entry["dtype"])
            if width is not None and stop - begin != _numel(entry["shape"]) * width:
                raise ValueError(f"tensor {name} has the wrong size")
            end = max(end, stop)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise ModelError(f"{file}: corrupt safetensors file ({err}); download it again") from None
    if 8 + header_len + end != size:
        raise ModelError(f"{file}: truncated or corrupt safetensors file ({size} bytes, header describes "
                         f"{8 + header_len + end}); download it again")
    return header_len, header


def _numel(shape) -> int:
    numel = 1
    for dim in shape:
        numel *= int(dim)
    return numel


def refuse_own_code(folder: Path, config_name: str, what: str, trust_remote_code: bool) -> None:
    """ModelError when `folder`'s `config_name` maps classes to Python files of its own (auto_map)
    and the user has not passed --trust-remote-code: that code would run on loading, and
    transformers would otherwise ask [y/N] on the terminal or fail with a long message."""
    try:
        config = json.loads((Path(folder) / config_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if trust_remote_code or not (isinstance(config, dict) and config.get("auto_map")):
        return
    files = sorted(p.name for p in Path(folder).glob("*.py"))
    raise ModelError(f"{folder}: {what} names its own Python code ({', '.join(files) or 'auto_map in ' + config_name}); "
                     "Tunesmith does not run it unless you pass --trust-remote-code for files you trust")
