"""The merged model: the adapter merged into the base model's 16-bit weights, tensor by tensor
where the files allow (`merge.py`), else by PEFT with the whole model loaded; and the check of the
result against base + adapter on a few prompts, one model in RAM at a time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from app.core.chat import AdapterSource
from app.core.errors import ExportError
from app.core.export.merge import DTYPE_BYTES, TORCH_DTYPES
from app.core.units import gib

# not in the sample data; the check runs over each prompt and the answer base + adapter gives it
CHECK_PROMPTS = ("How do I make garlic bread?", "Tell me about the sea.", "What is 12 + 7?",
                 "How should I store fresh herbs?")
CHECK_ANSWER_TOKENS = 32


MERGE_INTO = ("trained", "original")


def merge_adapter(source: AdapterSource, info, tokenizer, out: Path, dtype: str = "bf16",
                  progress: Callable[[str], None] = lambda message: None, trust_remote_code: bool = False,
                  into: str = "trained") -> dict:
    """Merge the adapter into the base model's 16-bit weights and save the result (sharded
    safetensors, config, generation config, tokenizer) into `out`.

    Tensor by tensor when the files allow (`app.core.export.merge`: RAM holds one shard, not the model),
    else by loading the model whole with PEFT; either way the RAM it needs is checked first.
    Returns the checks against base + adapter over a few prompts: the largest logit difference and
    how often both pick the same next token (16-bit rounding moves logits a little and near-ties can
    flip), or why they were skipped (the model does not fit in RAM even once).

    `into` "trained" (the default) merges into the weights the adapter was trained against: for a
    QLoRA run, the base's linear weights rounded to NF4 and back as in training, so that the merged
    model is base + adapter as tested; "original" merges into the base's own 16-bit weights."""
    from app.core.chat import trained_storage
    from app.core.export import merge  # read at call time: tests replace merge.plan_merge

    if into not in MERGE_INTO:
        raise ExportError(f"unknown --merge-into '{into}'; use one of {', '.join(MERGE_INTO)}")
    base_dir = Path(info.path)
    storage, compute = trained_storage(source)
    nf4 = compute if into == "trained" and storage == "4bit" else ""
    try:
        plan = merge.plan_merge(base_dir, source.adapter_dir)
    except merge.CannotStream as why:
        _check_ram(int(parameters(info) * DTYPE_BYTES[dtype] * 1.25) + 2**30, f"loading the model whole: {why}")
        progress(f"Loading {info.name} in {dtype} (not 4-bit) to merge the adapter (whole: {why})")
        checks = _merge_whole(source, info, tokenizer, out, dtype, progress, trust_remote_code)
        return {**checks, "merged_into": "original"}
    _check_ram(merge.merge_ram(plan, dtype), "merging tensor by tensor")
    into_text = "the NF4-rounded weights it trained against" if nf4 else "the original weights"
    progress(f"Merging the adapter into {info.name}'s {into_text}, saved in {dtype}, one tensor at a time")
    summary = merge.merge_shards(plan, out, dtype, progress, nf4_compute=nf4)
    merge.write_merged_config(base_dir, out, dtype, trust_remote_code)
    if not (out / "generation_config.json").exists():
        from transformers import AutoConfig, GenerationConfig

        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
        GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    progress(f"Merged {summary.merged_weights} weights; {gib(summary.bytes)} in {len(summary.files)} files")
    checks = compare_logits(source, info, tokenizer, out, dtype, progress, trust_remote_code)
    return {**checks, "merged_into": "trained" if nf4 else "original"}


def compare_logits(source: AdapterSource, info, tokenizer, merged_dir: Path, dtype: str,
                   progress: Callable[[str], None] = lambda message: None, trust_remote_code: bool = False) -> dict:
    """The merged model against base + adapter as tested (the base stored and computed as in
    training: NF4 for a QLoRA run) on CHECK_PROMPTS and the answers base + adapter gives them, one
    model in RAM at a time; when even one does not fit, the checks say why they were skipped."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from app.core import host
    from app.core.chat import trained_storage
    from app.core.models.load import quiet_loading

    storage, compute = trained_storage(source)
    free = host.available_ram()
    wide = next((d for d in ("f32", "bf16") if _check_bytes(info, d) <= free), "")  # the reference's precision
    needed = _check_bytes(info, wide or "bf16")
    if not wide:
        reason = (f"skipped: comparing with base + adapter loads the model whole ({gib(needed, 1)}) and "
                  f"{gib(free, 1)} of RAM is free")
        progress(f"Logit check {reason}")
        return {"logit_check": reason}
    quiet_loading()
    progress(f"Checking the merged model against base + adapter as tested ({_storage_text(storage, compute)})")
    with torch.no_grad():
        model = _tested_model(source, info, storage, compute, wide, trust_remote_code)
        sequences = [model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=CHECK_ANSWER_TOKENS,
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id)
                     for ids in _check_prompts(tokenizer)]
        before = [model(ids).logits.float() for ids in sequences]
        del model
        gc.collect()
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=getattr(torch, TORCH_DTYPES[dtype]),
                                                      trust_remote_code=trust_remote_code).eval()
        after = [merged(ids).logits.float() for ids in sequences]
        del merged
        gc.collect()
    return {**_agreement(before, after, progress), "checked_against": _storage_text(storage, compute)}


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

    from app.core.export.merge import as_trained, was_quantised

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

    from app.core.models.load import quiet_loading

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
    from app.core import host

    free = host.available_ram()
    if needed > free:
        raise ExportError(f"this export needs about {gib(needed, 1)} of RAM ({how}) and {gib(free, 1)} is free; "
                          "close other programs and try again, or export on a machine with more RAM")


def parameters(info) -> int:
    """The base model's parameter count (from its weights' headers, else its size in 16-bit)."""
    return info.parameters or info.size_bytes // 2
