"""Load a resolved model: its tokenizer and the base model in NF4 (QLoRA's storage), refusing
folders whose config would run their own code without --trust-remote-code."""

from __future__ import annotations

from pathlib import Path

from app.core.errors import ModelError
from app.core.models.facts import ModelFacts
from app.core.models.files import read_safetensors_header, refuse_own_code  # noqa: F401 - its callers' name for it
from app.core.models.template_guard import check_template


def quiet_loading() -> None:
    """Silence transformers' own progress bars ("Loading weights", one per load, several per run):
    our one-line progress says what is loading. Download bars stay (see download_model)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def load_tokenizer(info: ModelFacts, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (the end token when it has none)."""
    from transformers import AutoTokenizer

    quiet_loading()
    try:
        tokenizer = AutoTokenizer.from_pretrained(info.path, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise ModelError(f"{info.path}: cannot load the tokenizer ({str(err).splitlines()[0][:160]})") from None
    check_template(getattr(tokenizer, "chat_template", None), str(info.path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(info: ModelFacts, compute_dtype, device: str, trust_remote_code: bool = False,
                    attention: str = "sdpa", quantize: str = "4bit", quant_storage: str = "uint8"):
    """The base model to put LoRA on: its linear layers in NF4 with double quantisation
    (`quantize` "4bit", QLoRA's storage) or every weight in `compute_dtype` ("none"). The packed
    4-bit values are stored as `quant_storage` elements (FSDP shards them in the compute dtype)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quiet_loading()
    check_weight_shapes(info)
    quant = None
    if quantize == "4bit":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=quant_storage)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            info.path, quantization_config=quant, dtype=compute_dtype,
            device_map={"": device} if device != "cpu" else None,
            trust_remote_code=trust_remote_code, use_safetensors=not info.pickle_weights,
            attn_implementation=attention)
    except (OSError, ValueError, RuntimeError) as err:
        if "out of memory" in str(err).lower():
            raise
        raise ModelError(f"{info.path}: cannot load the model ({str(err).splitlines()[0][:200]})") from None
    return model


def check_weight_shapes(info: ModelFacts) -> None:
    """ModelError when a tensor in the weight files has another shape than the model its config.json
    builds (the config of another model beside the weights, a size edited by hand). transformers
    5.17 loads such weights into a 4-bit model without a word (later releases raise), and a run
    would fail at its first matmul, or train on garbage where the shapes still fit. The model is
    built on the meta device (no memory, about a second for 8B); names the files and the model
    spell differently (converted MoE experts), pre-quantised files and models with code of their
    own are left to transformers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    files = [file for file in info.weights if file.suffix == ".safetensors"]
    if not files or info.path is None or info.needs_remote_code or "quantization_config" in info.config:
        return
    try:
        with torch.device("meta"):
            built = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(info.path))
    except Exception:  # noqa: BLE001 - a config transformers cannot build: its own load says why
        return
    shapes = {name: list(tensor.shape) for name, tensor in built.state_dict().items()}
    for file in files:
        for name, entry in read_safetensors_header(file)[1].items():
            expected = shapes.get(name)
            if expected is not None and expected != list(entry["shape"]):
                raise ModelError(f"{info.path}: cannot load the model ({name} is "
                                 f"{'x'.join(map(str, entry['shape']))} in {file.name} but config.json makes it "
                                 f"{'x'.join(map(str, expected))}: the config and the weights are of different models)")
