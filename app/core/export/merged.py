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

CHECK_PROMPTS = ("How do I make garlic bread?", "Tell me about the sea.", "What is 12 + 7?")


def merge_adapter(source: AdapterSource, info, tokenizer, out: Path, dtype: str = "bf16",
                  progress: Callable[[str], None] = lambda message: None, trust_remote_code: bool = False) -> dict:
    """Merge the adapter into the base model's 16-bit weights and save the result (sharded
    safetensors, config, generation config, tokenizer) into `out`.

    Tensor by tensor when the files allow (`app.core.export.merge`: RAM holds one shard, not the model),
    else by loading the model whole with PEFT; either way the RAM it needs is checked first.
    Returns the checks against base + adapter over a few prompts: the largest logit difference and
    how often both pick the same next token (16-bit rounding moves logits a little and near-ties can
    flip), or why they were skipped (the model does not fit in RAM even once)."""
    from app.core.export import merge  # read at call time: tests replace merge.plan_merge

    base_dir = Path(info.path)
    try:
        plan = merge.plan_merge(base_dir, source.adapter_dir)
    except merge.CannotStream as why:
        _check_ram(int(parameters(info) * DTYPE_BYTES[dtype] * 1.25) + 2**30, f"loading the model whole: {why}")
        progress(f"Loading {info.name} in {dtype} (not 4-bit) to merge the adapter (whole: {why})")
        return _merge_whole(source, info, tokenizer, out, dtype, progress, trust_remote_code)
    _check_ram(merge.merge_ram(plan, dtype), "merging tensor by tensor")
    progress(f"Merging the adapter into {info.name} in {dtype} (not 4-bit), one tensor at a time")
    summary = merge.merge_shards(plan, out, dtype, progress)
    merge.write_merged_config(base_dir, out, dtype, trust_remote_code)
    if not (out / "generation_config.json").exists():
        from transformers import AutoConfig, GenerationConfig

        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
        GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    progress(f"Merged {summary.merged_weights} weights; {gib(summary.bytes)} in {len(summary.files)} files")
    return compare_logits(source, info, tokenizer, out, dtype, progress, trust_remote_code)


def compare_logits(source: AdapterSource, info, tokenizer, merged_dir: Path, dtype: str,
                   progress: Callable[[str], None] = lambda message: None, trust_remote_code: bool = False) -> dict:
    """Base + adapter against the merged model on CHECK_PROMPTS, one model in RAM at a time; when
    even one does not fit, the checks say why they were skipped instead."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from app.core import host
    from app.core.models.load import quiet_loading

    needed, free = int(parameters(info) * DTYPE_BYTES[dtype] * 1.2) + 2**30, host.available_ram()
    if needed > free:
        reason = (f"skipped: comparing with base + adapter loads the model whole ({gib(needed, 1)}) and "
                  f"{gib(free, 1)} of RAM is free")
        progress(f"Logit check {reason}")
        return {"logit_check": reason}
    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    prompts = _check_prompts(tokenizer)
    quiet_loading()
    progress("Checking the merged model against base + adapter")
    with torch.no_grad():
        model = _base_with_adapter(source, info, dtype, trust_remote_code)
        before = [model(ids).logits.float() for ids in prompts]
        del model
        gc.collect()
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch_dtype,
                                                      trust_remote_code=trust_remote_code).eval()
        after = [merged(ids).logits.float() for ids in prompts]
        del merged
        gc.collect()
    return _agreement(before, after, progress)


def _base_with_adapter(source: AdapterSource, info, dtype: str, trust_remote_code: bool):
    """The base model in `dtype` (not 4-bit) with the adapter on it, for inference."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from app.core.models.load import quiet_loading

    quiet_loading()
    base = AutoModelForCausalLM.from_pretrained(info.path, dtype=getattr(torch, TORCH_DTYPES[dtype]),
                                                trust_remote_code=trust_remote_code,
                                                use_safetensors=not info.pickle_weights)
    return PeftModel.from_pretrained(base, source.adapter_dir).eval()


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
