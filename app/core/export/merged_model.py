"""The merged model: the adapter merged into the base model's 16-bit weights, tensor by tensor
where the files allow (`tensor_merge.py`), else by PEFT with the whole model loaded; and the check of the
result against base + adapter on a few prompts, one model in RAM at a time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.core import host
from app.core.adapters import AdapterSource, trained_storage
from app.core.errors import ExportError
from app.core.export import tensor_merge as merge
from app.core.export.tensor_merge import DTYPE_BYTES, TORCH_DTYPES, as_trained, was_quantised
from app.core.models.load import quiet_loading
from app.core.units import gib

# not in the sample data; the check runs over each prompt and the answer base + adapter gives it
CHECK_PROMPTS = ("How do I make garlic bread?", "Tell me about the sea.", "What is 12 + 7?",
                 "How should I store fresh herbs?")
CHECK_ANSWER_TOKENS = 32


MERGE_INTO = ("trained", "original")
F16_MAX = 65504.0
# "auto" stores f16 (10 mantissa bits: keeps the adapter's small changes that bf16's 7 round away)
# when every activation base + adapter produced on the check prompts stays this far inside f16's
# range. The largest are "massive activations" of fixed size at fixed tokens (SmolLM2-135M: 28,241;
# Llama 2 7B: ~2,600), not growing with the input; and an f16 merge that overflows on the check
# prompts is merged again in bf16.
F16_HEADROOM = 2.0


@dataclass
class _Reference:
    """Base + adapter as tested, run once on the check prompts before the merge."""

    sequences: list  # each prompt and the greedy answer base + adapter gave it
    logits: list
    largest_activation: float  # |input| or |output| of any linear layer, or of the residual stream
    checked_against: str


def merge_adapter(source: AdapterSource, info, tokenizer, out: Path, dtype: str = "auto",
                  progress: Callable[[str], None] = lambda message: None, trust_remote_code: bool = False,
                  into: str = "trained") -> dict:
    """Merge the adapter into the base model's 16-bit weights and save the result (sharded
    safetensors, config, generation config, tokenizer) into `out`.

    Tensor by tensor when the files allow (`app.core.export.tensor_merge`: RAM holds one shard, not the model),
    else by loading the model whole with PEFT; either way the RAM it needs is checked first.
    Returns the checks against base + adapter over a few prompts: the largest logit difference and
    how often both pick the same next token (16-bit rounding moves logits a little and near-ties can
    flip), or why they were skipped (the model does not fit in RAM even once), and the precision
    written (`dtype` "auto": f16 where the activations allow, else bf16; `dtype_choice` says why).

    `into` "trained" (the default) merges into the weights the adapter was trained against: for a
    QLoRA run, the base's linear weights rounded to NF4 and back as in training, so that the merged
    model is base + adapter as tested; "original" merges into the base's own 16-bit weights."""
    if into not in MERGE_INTO:
        raise ExportError(f"unknown --merge-into '{into}'; use one of {', '.join(MERGE_INTO)}")
    base_dir = Path(info.path)
    storage, compute = trained_storage(source)
    nf4 = compute if into == "trained" and storage == "4bit" else ""
    try:
        plan = merge.plan_merge(base_dir, source.adapter_dir)
    except merge.CannotStream as why:
        dtype, choice = ("bf16", "bf16: the whole-model merge is not checked before it is written") \
            if dtype == "auto" else (dtype, "")
        _check_ram(int(parameters(info) * DTYPE_BYTES[dtype] * 1.25) + 2**30, f"loading the model whole: {why}")
        progress(f"Loading {info.name} in {dtype} (not 4-bit) to merge the adapter (whole: {why})")
        checks = _merge_whole(source, info, tokenizer, out, dtype, progress, trust_remote_code)
        why_original = f"it could not be merged layer by layer ({why}), so it was merged whole into the base's " \
            "original weights" if into == "trained" and storage == "4bit" else ""
        return {**checks, "merged_into": "original", "dtype": dtype, **({"dtype_choice": choice} if choice else {}),
                **({"merged_into_why": why_original} if why_original else {})}
    reference = tested_reference(source, info, tokenizer, progress, trust_remote_code)
    dtype, choice = choose_dtype(dtype, reference)
    while True:
        _check_ram(merge.merge_ram(plan, dtype), "merging tensor by tensor")
        into_text = "the NF4-rounded weights it trained against" if nf4 else "the original weights"
        progress(f"Merging the adapter into {info.name}'s {into_text}, saved in {dtype}, one tensor at a time"
                 + (f" ({choice})" if choice else ""))
        _write_streamed(plan, info, tokenizer, out, dtype, nf4, progress, trust_remote_code)
        checks = compare_with_reference(reference, out, dtype, progress, trust_remote_code)
        if checks.pop("finite", True) or not choice or dtype != "f16":
            break
        progress("In f16 the merged model's logits overflowed on the check prompts; merging again in bf16")
        _empty(out)
        dtype, choice = "bf16", "bf16: in f16 the merged model overflowed on the check prompts"
    why_original = "the run trained on the base's unquantised weights: those are the weights it trained " \
        "against" if into == "trained" and not nf4 else ""
    return {**checks, "merged_into": "trained" if nf4 else "original", "dtype": dtype,
            **({"dtype_choice": choice} if choice else {}), **({"merged_into_why": why_original} if why_original else {})}


def _write_streamed(plan, info, tokenizer, out: Path, dtype: str, nf4: str, progress: Callable[[str], None],
                    trust_remote_code: bool) -> None:
    """The tensor-by-tensor merge into `out`, with config, generation config and tokenizer."""
    base_dir = Path(info.path)
    summary = merge.merge_shards(plan, out, dtype, progress, nf4_compute=nf4)
    merge.write_merged_config(base_dir, out, dtype, trust_remote_code)
    if not (out / "generation_config.json").exists():
        from transformers import AutoConfig, GenerationConfig

        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
        GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    progress(f"Merged {summary.merged_weights} weights; {gib(summary.bytes)} in {len(summary.files)} files")


def _empty(folder: Path) -> None:
    import shutil

    for path in folder.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def choose_dtype(dtype: str, reference: _Reference | str) -> tuple[str, str]:
    """(the precision to write, why) for `dtype` "auto"; any other `dtype` as asked, with no reason."""
    if dtype != "auto":
        return dtype, ""
    if isinstance(reference, str):
        return "bf16", "bf16: the activations could not be measured (the logit check was skipped)"
    largest = reference.largest_activation
    if largest * F16_HEADROOM <= F16_MAX:
        return "f16", (f"f16: the largest activation on the check prompts, {largest:,.0f}, is under "
                       f"1/{F16_HEADROOM:g} of f16's largest value ({F16_MAX:,.0f}), and f16 keeps 3 more bits "
                       "of each weight than bf16")
    return "bf16", (f"bf16: the largest activation on the check prompts, {largest:,.0f}, is too near f16's "
                    f"largest value ({F16_MAX:,.0f}) to store this model in f16")


def tested_reference(source: AdapterSource, info, tokenizer, progress: Callable[[str], None] = lambda m: None,
                     trust_remote_code: bool = False) -> _Reference | str:
    """Base + adapter as tested (the base stored and computed as in training: NF4 for a QLoRA run)
    on CHECK_PROMPTS and the answers it gives them, with the largest activation it produced; or,
    when the model does not fit in RAM, why the check is skipped."""
    import gc

    import torch

    storage, compute = trained_storage(source)
    free = host.available_ram()
    wide = next((d for d in ("f32", "bf16") if _check_bytes(info, d) <= free), "")  # the reference's precision
    needed = _check_bytes(info, wide or "bf16")
    if not wide:
        reason = (f"skipped: comparing with base + adapter loads the model whole ({gib(needed, 1)}) and "
                  f"{gib(free, 1)} of RAM is free")
        progress(f"Logit check {reason}")
        return reason
    quiet_loading()
    progress(f"Running base + adapter as tested ({_storage_text(storage, compute)}) on {len(CHECK_PROMPTS)} prompts")
    largest = [0.0]

    def watch(_module, inputs, output):
        for tensor in (*inputs, output):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                largest[0] = max(largest[0], float(tensor.detach().abs().max()))

    with torch.no_grad():
        model = _tested_model(source, info, storage, compute, wide, trust_remote_code)
        sequences = [model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=CHECK_ANSWER_TOKENS,
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id)
                     for ids in _check_prompts(tokenizer)]
        hooks = [m.register_forward_hook(watch) for m in model.modules() if isinstance(m, torch.nn.Linear)]
        outputs = [model(ids, output_hidden_states=True) for ids in sequences]
        for hook in hooks:
            hook.remove()
        logits = [out.logits.float() for out in outputs]
        for out in outputs:  # the residual stream, between the layers
            largest[0] = max([largest[0]] + [float(h.abs().max()) for h in out.hidden_states])
        del outputs
        del model
        gc.collect()
    return _Reference(sequences, logits, largest[0], _storage_text(storage, compute))


def compare_with_reference(reference: _Reference | str, merged_dir: Path, dtype: str,
                           progress: Callable[[str], None] = lambda message: None,
                           trust_remote_code: bool = False) -> dict:
    """The merged model's logits against the reference's on the same sequences."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(reference, str):
        return {"logit_check": reference}
    progress("Checking the merged model against base + adapter as tested")
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=getattr(torch, TORCH_DTYPES[dtype]),
                                                      trust_remote_code=trust_remote_code).eval()
        after = [merged(ids).logits.float() for ids in reference.sequences]
        del merged
        gc.collect()
    finite = all(bool(torch.isfinite(logits).all()) for logits in after)
    return {**_agreement(reference.logits, after, progress), "checked_against": reference.checked_against,
            "finite": finite}


def _check_bytes(info, dtype: str) -> int:
    return int(parameters(info) * DTYPE_BYTES[dtype] * 1.2) + 2**30


def _storage_text(storage: str, compute: str) -> str:
    return f"NF4-rounded base, {compute} compute in training" if storage == "4bit" else f"{compute} base in training"


def _tested_model(source: AdapterSource, info, storage: str, compute: str, dtype: str, trust_remote_code: bool):
    """Base + adapter as trained and chatted with, computed in `dtype` on the CPU: for a QLoRA run
    the base's quantised weights hold their NF4-rounded values (what the 4-bit layers compute with,
    without bitsandbytes' CPU kernels, whose own rounding would blur the check), the adapter apart."""
    import torch
    from peft import PeftModel

    base = _load_plain(info, dtype, trust_remote_code)
    if storage == "4bit":
        with torch.no_grad():
            for name, param in base.named_parameters():
                if was_quantised(name, param):
                    param.copy_(as_trained(param, compute))
    return PeftModel.from_pretrained(base, source.adapter_dir).eval()


def _load_plain(info, dtype: str, trust_remote_code: bool):
    import torch
    from transformers import AutoModelForCausalLM

    quiet_loading()
    return AutoModelForCausalLM.from_pretrained(info.path, dtype=getattr(torch, TORCH_DTYPES[dtype]),
                                                trust_remote_code=trust_remote_code,
                                                use_safetensors=not info.pickle_weights)


def _base_with_adapter(source: AdapterSource, info, dtype: str, trust_remote_code: bool):
    """The base model in `dtype` (not 4-bit) with the adapter on it, for the whole-model merge."""
    from peft import PeftModel

    return PeftModel.from_pretrained(_load_plain(info, dtype, trust_remote_code), source.adapter_dir).eval()


def _check_prompts(tokenizer) -> list:
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"] for p in CHECK_PROMPTS]


def _agreement(before: list, after: list, progress: Callable[[str], None]) -> dict:
    diff = max(float((a - b).abs().max()) for a, b in zip(before, after))
    same = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(before, after))
    agreement = same / sum(a.shape[1] for a in before)
    progress(f"Merged: logits differ from base + adapter by at most {diff:.3g}; the same next token at "
             f"{agreement:.1%} of positions")
    return {"max_logit_diff": diff, "top_token_agreement": agreement}


def _merge_whole(source: AdapterSource, info, tokenizer, out: Path, dtype: str, progress: Callable[[str], None],
                 trust_remote_code: bool) -> dict:
    """The merge PEFT does: the whole base in 16-bit, merge_and_unload, save_pretrained."""
    import torch

    model = _base_with_adapter(source, info, dtype, trust_remote_code)
    prompts = _check_prompts(tokenizer)
    with torch.no_grad():
        before = [model(ids).logits.float() for ids in prompts]
        progress("Merging the adapter into the weights")
        merged = model.merge_and_unload()
        after = [merged(ids).logits.float() for ids in prompts]
    checks = _agreement(before, after, progress)
    progress("Saving the merged model")
    merged.save_pretrained(out, max_shard_size="2GB", safe_serialization=True)
    tokenizer.save_pretrained(out)
    return checks


def _check_ram(needed: int, how: str) -> None:
    free = host.available_ram()
    if needed > free:
        raise ExportError(f"this export needs about {gib(needed, 1)} of RAM ({how}) and {gib(free, 1)} is free; "
                          "close other programs and try again, or export on a machine with more RAM")


def parameters(info) -> int:
    """The base model's parameter count (from its weights' headers, else its size in 16-bit)."""
    return info.parameters or info.size_bytes // 2
