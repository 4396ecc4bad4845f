"""The model card (README.md) of every export: what was exported, from which base and data, with
which plan, and how it was checked."""

from __future__ import annotations

from pathlib import Path

from app.core.adapters import AdapterSource
from app.core.export.merged_model import CHECK_PROMPTS, parameters
from app.core.runs import Run, read_history


MERGED_INTO = {"trained": "the NF4-rounded weights the adapter was trained against (base + adapter as tested)",
               "original": "the base model's original weights"}
CHECK_LINES = {  # what the card says of each check an export made
    "merged_into": lambda c: (f"Merged into {MERGED_INTO[c['merged_into']]}: W + scale x B x A per adapted "
                              "weight, in fp32, cast once."),
    "merged_into_why": lambda c: f"({c['merged_into_why'][:1].upper()}{c['merged_into_why'][1:]}.)",
    "max_logit_diff": lambda c: (f"Merged model vs base + adapter as tested ({c.get('checked_against', '?')}; "
                                 f"{len(CHECK_PROMPTS)} held-out prompts and the answers it gives): largest logit "
                                 f"difference {c['max_logit_diff']:.3g}; the same next token at "
                                 f"{c['top_token_agreement']:.1%} of positions."),
    "dtype_choice": lambda c: f"Stored in {c['dtype_choice']}.",
    "logit_check": lambda c: (f"Merged model vs base + adapter: {c['logit_check']}. The merge itself is "
                              "W + scale x B x A per adapted weight, in fp32, cast once."),
    "gguf_tensors": lambda c: (f"GGUF read back with gguf's reader: {c['gguf_tensors']} tensors, names and shapes "
                               f"as expected; largest value difference from the merged model "
                               f"{c['gguf_max_abs_diff']:.3g}."),
    "pre_tokenizer_by_hand": lambda c: (f"The pre-tokenizer was named by hand (`--pre-tokenizer "
                                        f"{c['pre_tokenizer_by_hand']}`), not identified from the tokenizer: "
                                        "llama.cpp splits text that way, which was not checked against transformers."),
}


def model_card(source: AdapterSource, info, fmt: str, dtype: str, quant: str, checks: dict) -> str:
    """README.md: what was exported, from which base and data, with which plan, and the checks."""
    run = _run_details(source)
    library = "peft" if fmt == "adapter" else "transformers" if fmt == "merged" else "gguf"
    lines = ["---", f"base_model: {info.name}", f"library_name: {library}", "tags:", "- tunesmith", "- qlora",
             "- lora", "---", "", f"# {run.get('id') or source.label}", "",
             f"A {_what(fmt, checks.get('dtype', dtype), quant)} fine-tuned with Tunesmith (QLoRA) from **{info.name}** "
             f"({_size(parameters(info))} parameters, {info.model_type}).", ""]
    if run:
        lines += ["## Training", "", "| | |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in run["rows"]]
        lines.append("")
    if checks:
        lines += ["## Checks", ""] + [f"- {say(checks)}" for key, say in CHECK_LINES.items() if key in checks] + [""]
    lines += ["## Use", "", _usage(fmt, info.name), ""]
    return "\n".join(lines)


def _run_details(source: AdapterSource) -> dict:
    if source.run_dir is None:
        return {}
    run = Run(source.run_dir)
    try:
        config, plan, status, data = run.config(), run.plan(), run.status(), run.data_info()
    except Exception:  # noqa: BLE001 - a card without the training table is still a card
        return {}
    history = read_history(run)
    rows = [("Dataset", f"`{Path(config.data).name}` ({data.get('examples', data.get('rows', '?'))} examples)"),
            ("Steps", f"{status.get('step', 0)} of {plan.total_steps}"),
            ("LoRA", f"rank {plan.rank}, alpha {plan.lora_alpha}, all linear layers"),
            ("Sequence length", plan.seq_len), ("Batch", f"{plan.micro_batch} x {plan.grad_accum} accumulation"),
            ("Learning rate", f"{config.lr:g}, {plan.warmup_steps} warmup steps, cosine"),
            ("Base model while training", "NF4 with double quantisation (QLoRA)" if plan.quantize == "4bit"
             else f"unquantised ({plan.compute_dtype})")]
    if history.losses:
        rows.append(("Final training loss", f"{history.losses[-1]:.4f}"))
    if history.eval_losses:
        rows.append(("Final eval loss", f"{history.eval_losses[-1]:.4f}"))
    return {"id": run.id, "rows": rows}


def _size(parameters: int) -> str:
    return f"{parameters / 1e9:.2f}B" if parameters >= 1e9 else f"{parameters / 1e6:.1f}M"


def _what(fmt: str, dtype: str, quant: str) -> str:
    return {"adapter": "LoRA adapter", "merged": f"merged model ({dtype} safetensors)",
            "gguf": f"GGUF model ({quant})"}[fmt]


def _usage(fmt: str, base: str) -> str:
    if fmt == "adapter":
        return ("```python\nfrom peft import AutoPeftModelForCausalLM\n"
                "model = AutoPeftModelForCausalLM.from_pretrained(\"path/to/this/folder\")\n```\n"
                f"The base model ({base}) is loaded from its own location.")
    if fmt == "merged":
        return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")\n"
                "tokenizer = AutoTokenizer.from_pretrained(\"path/to/this/folder\")\n```")
    return ("```bash\nollama create my-model -f Modelfile   # then: ollama run my-model\n"
            "llama-cli -m *.gguf -cnv                 # llama.cpp\n```")
