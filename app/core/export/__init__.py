"""Export a trained adapter: the adapter itself, a merged 16-bit model, or a GGUF file with an
Ollama Modelfile; each with a model card (README.md) saying what it is and how it was checked.

Every export is atomic: it is written into a temporary sibling of `--out` and renamed into place
only when complete, so a failure or a full disk never leaves half a model behind. Each export
folder carries a marker file (MARKER); an existing folder is replaced only with `force` and only
when it is empty or holds that marker, and never when it is (or holds) the home folder, the
current folder, Tunesmith's own folders, a run, the adapter or the base model being exported.
Free disk space is checked before anything is written.
The merged model is made from the base model in 16-bit (not the 4-bit weights training used),
tensor by tensor so that RAM holds one shard and not the model (`app.core.export.merge`), and its logits
are compared with base + adapter on a few prompts when the model fits in RAM; a GGUF file is read
back and compared with the merged model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from app.core.atomic import staged_dir, write_json, write_text
from app.core.chat import AdapterSource, adapter_tokenizer, find_adapter
from app.core.errors import ExportError
from app.core.run_lock import RunLock
from app.core.runs import is_run_folder

FORMATS = ("adapter", "merged", "gguf")
DTYPES = ("bf16", "f16", "f32")
_DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4}
_TORCH_DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
GGUF_BYTES_PER_PARAM = {"f16": 2.0, "bf16": 2.0, "f32": 4.0, "q8_0": 34 / 32}
CHECK_PROMPTS = ("How do I make garlic bread?", "Tell me about the sea.", "What is 12 + 7?")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
DISK_MARGIN = 1.1
MARKER = ".tunesmith-export"  # in every export folder: the only kind of folder --force replaces


@dataclass
class ExportResult:
    out_dir: Path
    format: str
    files: list[str]
    bytes: int
    checks: dict = field(default_factory=dict)


def export_run(ref: str, fmt: str, out: str | Path, dtype: str = "bf16", quant: str = "f16", force: bool = False,
               progress: Callable[[str], None] = lambda message: None,
               trust_remote_code: bool = False, pre_tokenizer: str = "") -> ExportResult:
    """Export the adapter `ref` names (a run, a checkpoint or an adapter folder) as `fmt` into `out`."""
    from app.core.models import resolve_model

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}'; use one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown --dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    if fmt == "gguf":
        from app.core.export.gguf import QUANTS

        if quant not in QUANTS:
            raise ExportError(f"unknown --quant '{quant}'; use one of {', '.join(QUANTS)}")
    out = Path(out).expanduser().resolve()
    source = find_adapter(ref)
    problem = protected_reason(out, [source.adapter_dir, source.run_dir])
    if problem:
        raise ExportError(problem)
    replace = _check_target(out, force)
    info = resolve_model(source.base, trust_remote_code, progress=progress)
    problem = protected_reason(out, [Path(info.path)])
    if problem:
        raise ExportError(problem)
    if fmt == "gguf":
        from app.core.export.gguf import read_config

        read_config(Path(info.path))  # an architecture the writer does not know is refused before the merge
    _check_space(out, _needed_bytes(fmt, source, _parameters(info), dtype, quant))
    tokenizer = adapter_tokenizer(source, info, trust_remote_code)
    run_inside = next((p for p in out.parents if is_run_folder(p)), None)
    with (RunLock(run_inside, "exporting") if run_inside else nullcontext()), staged_dir(out, replace=replace) as tmp:
        checks: dict = {}
        if fmt == "adapter":
            progress(f"Copying the adapter from {source.adapter_dir}")
            _write_adapter(source, tokenizer, tmp)
        elif fmt == "merged":
            checks.update(merge_adapter(source, info, tokenizer, tmp, dtype, progress, trust_remote_code))
        else:
            checks.update(_write_gguf(source, info, tokenizer, tmp, dtype, quant, progress, trust_remote_code,
                                      pre_tokenizer))
        write_text(tmp / "README.md", model_card(source, info, fmt, dtype, quant, checks))
        write_json(tmp / MARKER, {"written_by": "tunesmith export", "format": fmt, "source": source.label,
                                  "base": info.name})
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file() and p.name != MARKER)
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    progress(f"Exported {fmt} to {out}")
    return ExportResult(out, fmt, files, size, checks)


def merge_adapter(source: AdapterSource, info, tokenizer, out: Path, dtype: str = "bf16",
                  progress: Callable[[str], None] = lambda message: None, trust_remote_code: bool = False) -> dict:
    """Merge the adapter into the base model's 16-bit weights and save the result (sharded
    safetensors, config, generation config, tokenizer) into `out`.

    Tensor by tensor when the files allow (`app.core.export.merge`: RAM holds one shard, not the model),
    else by loading the model whole with PEFT; either way the RAM it needs is checked first.
    Returns the checks against base + adapter over a few prompts: the largest logit difference and
    how often both pick the same next token (16-bit rounding moves logits a little and near-ties can
    flip), or why they were skipped (the model does not fit in RAM even once)."""
    from app.core.export import merge

    base_dir = Path(info.path)
    try:
        plan = merge.plan_merge(base_dir, source.adapter_dir)
    except merge.CannotStream as why:
        _check_ram(int(_parameters(info) * _DTYPE_BYTES[dtype] * 1.25) + 2**30, f"loading the model whole: {why}")
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
    progress(f"Merged {summary.merged_weights} weights; {summary.bytes / 2**30:.2f} GiB in {len(summary.files)} files")
    return compare_logits(source, info, tokenizer, out, dtype, progress, trust_remote_code)


def compare_logits(source: AdapterSource, info, tokenizer, merged_dir: Path, dtype: str,
                   progress: Callable[[str], None] = lambda message: None, trust_remote_code: bool = False) -> dict:
    """Base + adapter against the merged model on CHECK_PROMPTS, one model in RAM at a time; when
    even one does not fit, the checks say why they were skipped instead."""
    import gc

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from app.core import host
    from app.core.models import quiet_loading

    needed, free = int(_parameters(info) * _DTYPE_BYTES[dtype] * 1.2) + 2**30, host.available_ram()
    if needed > free:
        reason = (f"skipped: comparing with base + adapter loads the model whole ({needed / 2**30:.1f} GiB) and "
                  f"{free / 2**30:.1f} GiB of RAM is free")
        progress(f"Logit check {reason}")
        return {"logit_check": reason}
    torch_dtype = getattr(torch, _TORCH_DTYPES[dtype])
    prompts = _check_prompts(tokenizer)
    quiet_loading()
    progress("Checking the merged model against base + adapter")
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                    use_safetensors=not info.facts.pickle_weights)
        model = PeftModel.from_pretrained(base, source.adapter_dir).eval()
        before = [model(ids).logits.float() for ids in prompts]
        del model, base
        gc.collect()
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch_dtype,
                                                      trust_remote_code=trust_remote_code).eval()
        after = [merged(ids).logits.float() for ids in prompts]
        del merged
        gc.collect()
    return _agreement(before, after, progress)


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
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from app.core.models import quiet_loading

    torch_dtype = getattr(torch, _TORCH_DTYPES[dtype])
    quiet_loading()
    base = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                use_safetensors=not info.facts.pickle_weights)
    model = PeftModel.from_pretrained(base, source.adapter_dir)
    model.eval()
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


def ollama_modelfile(gguf_name: str, tokenizer) -> str:
    """An Ollama Modelfile whose TEMPLATE renders prompts as the model's chat template does.

    The template is found by rendering the chat template with marker strings and putting Ollama's
    `{{ .System }}`, `{{ .Prompt }}` and `{{ .Response }}` where the markers land, so it works for
    any template (ChatML, Llama 3, Mistral, ...) without a table of known formats."""
    system, user, answer = "\x01SYSTEM\x01", "\x01PROMPT\x01", "\x01RESPONSE\x01"

    def render(messages: list[dict], generation: bool) -> str | None:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except Exception:  # noqa: BLE001 - e.g. a template that refuses a system turn
            return None

    with_system = render([{"role": "system", "content": system}, {"role": "user", "content": user}], True)
    without = render([{"role": "user", "content": user}], True)
    whole = render([{"role": "user", "content": user}, {"role": "assistant", "content": answer}], False)
    if without is None or whole is None or user not in without or answer not in whole:
        raise ExportError("the model's chat template cannot be turned into an Ollama TEMPLATE; "
                          "write the Modelfile's TEMPLATE by hand")
    ending = whole.split(answer, 1)[1]  # what closes the assistant's turn, e.g. "<|im_end|>\n"
    if with_system is not None and system in with_system:
        split = _shared_tail(with_system, without, tokenizer)
        shared = len(with_system) - split  # the user's turn onwards, the same with or without a system turn
        head = with_system[:split].replace(system, "{{ .System }}")
        template = (f"{{{{ if .System }}}}{head}{{{{ else }}}}{without[:len(without) - shared]}{{{{ end }}}}"
                    + with_system[split:].replace(user, "{{ .Prompt }}"))
    else:
        template = without.replace(user, "{{ .Prompt }}")
    template += "{{ .Response }}" + ending
    stops = _stop_tokens(tokenizer, ending, without.split(user, 1)[0])
    if '"""' in template:
        raise ExportError('the chat template contains """, which a Modelfile cannot quote')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"


def model_card(source: AdapterSource, info, fmt: str, dtype: str, quant: str, checks: dict) -> str:
    """README.md: what was exported, from which base and data, with which plan, and the checks."""
    run = _run_details(source)
    library = "peft" if fmt == "adapter" else "transformers" if fmt == "merged" else "gguf"
    lines = ["---", f"base_model: {info.name}", f"library_name: {library}", "tags:", "- tunesmith", "- qlora",
             "- lora", "---", "", f"# {run.get('id') or source.label}", "",
             f"A {_what(fmt, dtype, quant)} fine-tuned with Tunesmith (QLoRA) from **{info.name}** "
             f"({_size(_parameters(info))} parameters, {info.facts.model_type}).", ""]
    if run:
        lines += ["## Training", "", "| | |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in run["rows"]]
        lines.append("")
    if checks:
        lines += ["## Checks", ""]
        if "max_logit_diff" in checks:
            lines.append(f"- Merged model vs base + adapter ({len(CHECK_PROMPTS)} prompts): largest logit "
                         f"difference {checks['max_logit_diff']:.3g}; the same next token at "
                         f"{checks['top_token_agreement']:.1%} of positions.")
        if "logit_check" in checks:
            lines.append(f"- Merged model vs base + adapter: {checks['logit_check']}. The merge itself is "
                         "W + scale x B x A per adapted weight, in fp32, cast once.")
        if "gguf_tensors" in checks:
            lines.append(f"- GGUF read back with gguf's reader: {checks['gguf_tensors']} tensors, names and "
                         f"shapes as expected; largest value difference from the merged model "
                         f"{checks['gguf_max_abs_diff']:.3g}.")
        if "pre_tokenizer_by_hand" in checks:
            lines.append(f"- The pre-tokenizer was named by hand (`--pre-tokenizer {checks['pre_tokenizer_by_hand']}`), "
                         "not identified from the tokenizer: llama.cpp splits text that way, which was not checked "
                         "against transformers.")
        lines.append("")
    lines += ["## Use", "", _usage(fmt, info.name), ""]
    return "\n".join(lines)


# -- the formats ------------------------------------------------------------------------------------
def _write_adapter(source: AdapterSource, tokenizer, out: Path) -> None:
    for name in ADAPTER_FILES:
        if not (source.adapter_dir / name).exists():
            raise ExportError(f"{source.adapter_dir}: no {name}; the adapter folder is incomplete")
        shutil.copy2(source.adapter_dir / name, out / name)
    tokenizer.save_pretrained(out)


def _write_gguf(source: AdapterSource, info, tokenizer, out: Path, dtype: str, quant: str, progress,
                trust_remote_code: bool, pre_tokenizer: str = "") -> dict:
    from app.core.export.gguf_check import verify_gguf
    from app.core.export.gguf import write_gguf

    merged = out / ".merged"
    merged.mkdir()
    checks = merge_adapter(source, info, tokenizer, merged, "f32" if quant == "f32" else dtype, progress,
                           trust_remote_code)
    name = f"{_slug(source.label)}-{quant}.gguf"
    progress(f"Writing {name}")
    summary = write_gguf(merged, out / name, quant, lambda message, _fraction=None: progress(message),
                         pre_tokenizer)
    progress("Reading the GGUF file back to check it against the merged model")
    check = verify_gguf(out / name, merged)
    if not check.ok:
        raise ExportError(f"{name}: the written file does not match the merged model ({'; '.join(check.problems)})")
    write_text(out / "Modelfile", ollama_modelfile(name, tokenizer))
    shutil.rmtree(merged)
    write_json(out / "export.json", {"gguf": name, "quant": quant, "tensors": summary.tensor_count,
                                     "pre_tokenizer": summary.pre_tokenizer, "warnings": summary.warnings})
    extra = {"pre_tokenizer_by_hand": pre_tokenizer} if pre_tokenizer else {}
    return {**checks, "gguf_tensors": check.tensor_count, "gguf_max_abs_diff": check.max_abs_diff, **extra}


# -- helpers ----------------------------------------------------------------------------------------
def protected_reason(out: Path, also: list[Path | None] = ()) -> str:
    """Why `out` must never be replaced by an export ("" when it may be): it is, or contains, the
    home folder, the current folder, one of Tunesmith's folders, a run, or a path in `also`
    (the adapter and base model being exported)."""
    from app.core.paths import cache_dir, config_dir, data_dir, runs_dir

    out = Path(out).expanduser().resolve()
    named = [(Path.home(), "your home folder"), (Path.cwd(), "the current folder"),
             (data_dir(), "Tunesmith's data folder"), (runs_dir(), "Tunesmith's run store"),
             (cache_dir(), "Tunesmith's cache"), (config_dir(), "Tunesmith's settings folder")]
    named += [(path, "what is being exported") for path in also if path is not None]
    for path, what in named:
        path = Path(path).expanduser().resolve()
        if out == path or out in path.parents:
            return (f"{out}: refused: {'it is' if out == path else 'it contains'} {what} ({path}); an export "
                    "never replaces that. Choose a new folder for --out")
    if out.parent == Path(runs_dir()).resolve() or is_run_folder(out) or out == Path(out.anchor):
        return f"{out}: refused: it is a run folder or a drive's root; choose a new folder for --out"
    return ""


def _check_target(out: Path, force: bool) -> bool:
    """Whether the export replaces `out`: only an empty folder, or one of our exports with
    `force`; anything else of the user's is refused, even with `force`."""
    if not out.exists():
        return False
    if out.is_file():
        raise ExportError(f"{out}: is a file; choose a folder for --out")
    if not any(out.iterdir()):
        return True
    if not (out / MARKER).is_file():
        raise ExportError(f"{out}: already exists and holds files Tunesmith did not write (no {MARKER}); it is "
                          "never replaced, even with --force. Choose a new folder for --out")
    if not force:
        raise ExportError(f"{out}: already holds an earlier export; pass --force to replace it, or choose "
                          "another --out")
    return True


def replace_problem(out: Path, ref: str) -> str:
    """For a window about to ask "replace?": why `out` cannot be replaced by exporting `ref`, or ""."""
    try:
        source = find_adapter(ref)
        problem = protected_reason(out, [source.adapter_dir, source.run_dir])
        if not problem:
            _check_target(Path(out).expanduser().resolve(), True)
    except ExportError as err:
        return str(err)
    except Exception:  # noqa: BLE001 - the export itself reports anything else, in full
        return ""
    return problem


def _needed_bytes(fmt: str, source: AdapterSource, params: int, dtype: str, quant: str) -> int:
    if fmt == "adapter":
        return sum(p.stat().st_size for p in source.adapter_dir.iterdir() if p.is_file()) + 50_000_000
    merged = params * (4 if dtype == "f32" else 2)
    if fmt == "merged":
        return merged
    return merged + int(params * GGUF_BYTES_PER_PARAM[quant])  # the merged model is temporary


def _parameters(info) -> int:
    """The base model's parameter count (from its weights' headers, else its size in 16-bit)."""
    return info.facts.parameters or info.facts.size_bytes // 2


def _check_space(out: Path, needed: int) -> None:
    folder = out.parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed * DISK_MARGIN > free:
        raise ExportError(f"{folder}: {free / 2**30:.1f} GiB free, but this export needs about "
                          f"{needed * DISK_MARGIN / 2**30:.1f} GiB; free some space or choose another --out")


def _check_ram(needed: int, how: str) -> None:
    from app.core import host

    free = host.available_ram()
    if needed > free:
        raise ExportError(f"this export needs about {needed / 2**30:.1f} GiB of RAM ({how}) and {free / 2**30:.1f} "
                          "GiB is free; close other programs and try again, or export on a machine with more RAM")


def _shared_tail(with_system: str, without: str, tokenizer) -> int:
    """Where, in `with_system`, the text it shares with `without` up to the end starts (the user's
    turn onwards), moved forward to a token boundary so no special token is cut in two."""
    n = 0
    while n < min(len(with_system), len(without)) and with_system[-1 - n] == without[-1 - n]:
        n += 1
    split = len(with_system) - n
    for token in sorted(set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {})),
                        key=len, reverse=True):
        start = with_system.rfind(token, 0, split)
        if start != -1 and start < split < start + len(token):
            return start + len(token)
    return split


def _stop_tokens(tokenizer, ending: str, user_prefix: str) -> list[str]:
    """The end token, the token that closes a turn and the one that opens the user's turn."""
    special = sorted(set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {})),
                     key=len, reverse=True)
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    for text in (ending, user_prefix):
        found = [(text.rfind(t) if text is user_prefix else text.find(t), t) for t in special if t and t in text]
        if found:
            stops.append(min(found)[1] if text is ending else max(found)[1])
    return list(dict.fromkeys(stops))


def _run_details(source: AdapterSource) -> dict:
    from app.core.runs import Run, read_history

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
            ("Quantisation while training", "NF4 with double quantisation")]
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


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "model"
