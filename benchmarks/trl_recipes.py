"""The yardstick of benchmarks/throughput.py: TRL's SFTTrainer, as a user would run it for the same job.

Two recipes, each trained in its own process by `run_trl(job)`:

- **trl-seed**, the QLoRA recipe most tutorials start from: NF4 + double quantisation,
  `prepare_model_for_kbit_training`, LoRA r16/alpha32 on all linear layers (dropout 0.05), gradient
  checkpointing, padded batches of 4 examples in shuffled order, paged 8-bit AdamW on CUDA (torch
  AdamW on CPU), lr 2e-4 cosine with 3 % warmup, grad norm 0.3, assistant-only loss;
- **trl-best**, TRL's fastest documented setting for the same job: padding-free BFD packing
  (`packing=True, packing_strategy="bfd"`) in rows shaped like Tunesmith's plan, gradient
  checkpointing only where that plan needs it, Liger's kernels on CUDA when installed.

Both train on the examples Tunesmith trains on: the model's chat template with `{% generation %}`
markers around each assistant turn and its end-of-turn text (`training_template`), TRL's documented
`chat_template_path` way to get `assistant_only_loss`, truncated to the same length. Before training,
`run_trl` checks that TRL's tokens and trained labels equal Tunesmith's, and counts from TRL's own
data loader the steps that reach the target number of real tokens, so the schedule ends there.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

SEED_MICRO_BATCH = 4  # the seed recipe's per-device batch of padded examples

# SmolLM2's chat template (the demo model), rendering the same text, with the part of each assistant
# turn that Tunesmith trains on (its content, <|im_end|> and the newline after it) marked for TRL.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOLLM2_TRAINING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def trl_settings(recipe: str, plan: dict, mean_length: float, tokens_per_step: float) -> dict:
    """The SFTConfig fields of `recipe` that differ between the two, for Tunesmith's plan `plan` of
    the same set; the seed recipe accumulates as many padded batches as give about the plan's
    real tokens per optimizer step, so all recipes take steps of about the same size."""
    cuda = plan["device"] == "cuda"
    if recipe == "trl-seed":
        accum = max(1, round(tokens_per_step / (SEED_MICRO_BATCH * mean_length)))
        return {"per_device_train_batch_size": SEED_MICRO_BATCH, "gradient_accumulation_steps": accum,
                "gradient_checkpointing": True, "packing": False, "padding_free": False,
                "use_liger_kernel": False, "prepare_kbit": True}
    return {"per_device_train_batch_size": plan["micro_batch"], "gradient_accumulation_steps": plan["grad_accum"],
            "gradient_checkpointing": plan["grad_checkpointing"], "packing": True, "packing_strategy": "bfd",
            "padding_free": True, "use_liger_kernel": cuda and _liger_installed(), "prepare_kbit": False}


def describe_trl(settings: dict, seq_len: int) -> str:
    shape = (f"BFD-packed padding-free rows, {settings['per_device_train_batch_size']} x {seq_len} tokens"
             if settings["packing"] else f"{settings['per_device_train_batch_size']} x up to {seq_len} tokens, padded")
    return (f"{shape}, x{settings['gradient_accumulation_steps']} per step, checkpointing "
            f"{'on' if settings['gradient_checkpointing'] else 'off'}"
            + (", prepare_model_for_kbit_training" if settings["prepare_kbit"] else "")
            + (", Liger" if settings["use_liger_kernel"] else ""))


def run_trl(job: dict) -> dict:
    """Train `job["recipe"]` until the first step that reaches `job["tokens"]` real tokens; save the
    adapter after that step and the one before; return the step log and the peak memory."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    plan, settings, out = job["plan"], job["settings"], Path(job["out"])
    cuda = plan["device"] == "cuda"
    dtype = getattr(torch, plan["compute_dtype"])
    tokenizer = AutoTokenizer.from_pretrained(job["model_path"])
    template = out / "training_template.jinja"
    template.write_text(training_template(tokenizer), encoding="utf-8")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    torch.manual_seed(job["seed"])
    model = AutoModelForCausalLM.from_pretrained(job["model_path"], quantization_config=quant, dtype=dtype,
                                                 attn_implementation="sdpa",
                                                 device_map={"": "cuda"} if cuda else None)
    if settings["prepare_kbit"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings["gradient_checkpointing"])
    lora = LoraConfig(r=plan["rank"], lora_alpha=plan["lora_alpha"], lora_dropout=0.05, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    extra = {"packing_strategy": settings["packing_strategy"]} if settings["packing"] else {}
    config = SFTConfig(
        output_dir=str(out / "trainer"), seed=job["seed"], max_steps=1, learning_rate=2e-4, lr_scheduler_type="cosine",
        warmup_steps=0, max_grad_norm=0.3, weight_decay=0.0, optim="paged_adamw_8bit" if cuda else "adamw_torch",
        bf16=plan["compute_dtype"] == "bfloat16", fp16=plan["compute_dtype"] == "float16",
        per_device_train_batch_size=settings["per_device_train_batch_size"],
        gradient_accumulation_steps=settings["gradient_accumulation_steps"],
        gradient_checkpointing=settings["gradient_checkpointing"], max_length=plan["seq_len"],
        packing=settings["packing"], padding_free=settings["padding_free"], assistant_only_loss=True,
        chat_template_path=str(template), use_liger_kernel=settings["use_liger_kernel"], logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, use_cpu=not cuda, **extra)
    rows = [{"messages": m} for m in job["train_messages"]]
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora)
    if settings.get("lora_fp32"):  # undo SFTTrainer's cast of a quantised model's LoRA weights to bf16
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    check = compare_with_ours(trainer.train_dataset, job["ours"], settings["packing"])
    per_step = tokens_per_step(trainer, job["tokens"])
    steps = len(per_step)
    trainer.args.max_steps = steps
    trainer.args.warmup_steps = math.ceil(0.03 * steps)

    log, started = [], []

    class StepLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            started.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            log.append({"step": state.global_step, "tokens": trainer._total_train_tokens,
                        "elapsed_s": time.perf_counter() - started[0]})
            if state.global_step == steps - 1:
                trainer.model.save_pretrained(out / "adapter-before")

    trainer.add_callback(StepLog())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = peak_bytes(cuda)
    trainer.model.save_pretrained(out / "adapter")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    cumulative = [sum(per_step[:i + 1]) for i in range(steps)]
    if [entry["tokens"] for entry in log] != cumulative:
        raise SystemExit(f"TRL trained other batches than its data loader gave beforehand: "
                         f"{[e['tokens'] for e in log]} != {cumulative}")
    step_tokens = [b - a for a, b in zip([0] + cumulative, cumulative)]
    lora_dtype = str(next(p.dtype for p in trainer.model.parameters() if p.requires_grad)).replace("torch.", "")
    return {"step_tokens": step_tokens, "elapsed_s": [e["elapsed_s"] for e in log], "peak_bytes": peak,
            "train_loss": losses[-1] if losses else None, "adapter_before": str(out / "adapter-before"),
            "adapter": str(out / "adapter"), "tokens_match": check, "lora_dtype": lora_dtype}


def training_template(tokenizer) -> str:
    """The model's template with generation markers, for TRL's assistant-only loss."""
    if tokenizer.chat_template != SMOLLM2_TEMPLATE:
        raise SystemExit("the TRL recipes have a training chat template only for the demo model (SmolLM2); "
                         "add one for this model's template to benchmarks/trl_recipes.py")
    return SMOLLM2_TRAINING_TEMPLATE


def compare_with_ours(dataset, ours: dict, packed: bool) -> str:
    """Stop unless TRL's prepared examples are Tunesmith's: the same ids and trained labels, one by
    one (padded recipe) or in total (packed, where rows mix examples)."""
    if packed:
        real = sum(len(ids) for ids in dataset["input_ids"])
        trained = sum(sum(1 for label in labels if label != -100) for labels in dataset["labels"])
        want = (sum(len(ids) for ids in ours["input_ids"]), sum(sum(1 for x in lab if x != -100) for lab in ours["labels"]))
        if (real, trained) != want:
            raise SystemExit(f"TRL's packed set has {real} tokens, {trained} trained; Tunesmith's {want}")
        return f"same totals: {real} tokens, {trained} trained"
    pairs = sorted(zip(dataset["input_ids"], dataset["labels"]))
    mine = sorted(zip(ours["input_ids"], ours["labels"]))
    if pairs != mine:
        differ = sum(a != b for a, b in zip(pairs, mine)) + abs(len(pairs) - len(mine))
        raise SystemExit(f"TRL's tokens or labels differ from Tunesmith's in {differ} of {len(mine)} examples")
    return f"identical: {len(mine)} examples, ids and trained labels"


def tokens_per_step(trainer, target: int) -> list[int]:
    """Real tokens of each optimizer step, from TRL's own (seeded) data loader, up to the first step
    whose running total reaches `target`."""
    accum = trainer.args.gradient_accumulation_steps
    loader = trainer.get_train_dataloader()
    steps, total, epoch = [], 0, 0
    while total < target:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        batches = [real_tokens(batch) for batch in loader]
        for start in range(0, len(batches), accum):  # an epoch's last step may have fewer batches
            steps.append(sum(batches[start:start + accum]))
            total += steps[-1]
            if total >= target:
                break
        epoch += 1
    return steps


def real_tokens(batch: dict) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["position_ids"].size(1))


def peak_bytes(cuda: bool) -> int:
    import resource
    import sys

    import torch

    if cuda:
        return torch.cuda.max_memory_allocated()
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _liger_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None
