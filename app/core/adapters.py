"""Where a trained adapter is and what it was trained on: `find_adapter` turns what the user
names (a run, a run's checkpoint, a PEFT adapter folder) into an AdapterSource, which chat, the
evals and export all load from; `adapter_tokenizer` is the tokenizer it was trained with;
`startable_runs` and `start_point` are the runs a dpo/orpo run may start from (--from) and what
starting from one means."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from app.core.config import TrainConfig
from app.core.data.tokenize import ensure_chat_template
from app.core.errors import ModelError, RunError
from app.core.models.files import refuse_own_code
from app.core.models.load import load_tokenizer
from app.core.models.resolve import is_missing_hub_model
from app.core.models.template_guard import check_template
from app.core.runs import Run, RunSummary, list_runs, open_run


@dataclass
class AdapterSource:
    """Where an adapter and its base model are."""

    adapter_dir: Path
    base: str  # a model reference `resolve_model` understands: "demo", a folder or a hub id
    label: str
    tokenizer_dir: Path | None = None  # a tokenizer saved with the adapter (its chat template)
    run_dir: Path | None = None  # the run the adapter belongs to, if any


def find_adapter(ref: str) -> AdapterSource:
    """The adapter `ref` names: a run (id, prefix or folder), a run's checkpoint, or a PEFT adapter folder."""
    path = Path(ref).expanduser()
    if (path / "adapter_config.json").exists():
        run_dir = _run_of(path)
        if run_dir is not None:
            run = open_run(str(run_dir))
            tokenizer = run.adapter_dir if (run.adapter_dir / "tokenizer_config.json").exists() else None
            return AdapterSource(path, run.config().model, f"{run.id} ({path.name})", tokenizer or path, run.dir)
        return AdapterSource(path, _base_of(path), path.name, path)
    run = open_run(ref)
    if (run.adapter_dir / "adapter_config.json").exists():
        return AdapterSource(run.adapter_dir, run.config().model, run.id, run.adapter_dir, run.dir)
    checkpoint = run.latest_checkpoint()
    if checkpoint is None:
        raise RunError(f"run {run.id} has no adapter yet and no checkpoint; train it for a few steps first")
    return AdapterSource(checkpoint, run.config().model, f"{run.id} ({checkpoint.name})", run_dir=run.dir)


def base_to_download(ref: str) -> str:
    """The hub id of the base model `ref`'s adapter names when no copy of it is on this machine
    (loading or exporting would download it: the window asks first), else ""."""
    try:
        base = find_adapter(ref).base
    except Exception:  # noqa: BLE001 - the load or export itself reports a bad reference
        return ""
    return base if is_missing_hub_model(base) else ""


def runs_with_adapter() -> list:
    """The runs `find_adapter` can use (a final adapter or a checkpoint), newest first, as RunSummary rows."""
    rows = []
    for row in list_runs():
        run = open_run(row.id)
        if (run.adapter_dir / "adapter_config.json").exists() or run.latest_checkpoint() is not None:
            rows.append(row)
    return rows


def trained_storage(source: AdapterSource) -> tuple[str, str]:
    """(how the base was stored, the compute dtype) when the adapter was trained, as the run's plan
    says: ("4bit", "bfloat16") for runs from before the plan recorded it and for adapters from
    elsewhere (QLoRA's defaults)."""
    if source.run_dir is None:
        return "4bit", "bfloat16"
    try:
        plan = open_run(str(source.run_dir)).plan()
    except Exception:  # noqa: BLE001 - an unreadable plan: the QLoRA default
        return "4bit", "bfloat16"
    return plan.quantize or "4bit", plan.compute_dtype or "bfloat16"


def adapter_tokenizer(source: AdapterSource, info, trust_remote_code: bool = False):
    """The tokenizer trained with (saved beside the adapter), else the base model's; with a chat template."""
    if source.tokenizer_dir is not None and (source.tokenizer_dir / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer


        refuse_own_code(source.tokenizer_dir, "tokenizer_config.json", "the adapter's tokenizer", trust_remote_code)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_dir, trust_remote_code=trust_remote_code)
        except Exception as err:  # noqa: BLE001 - a damaged tokenizer folder is the user's to fix
            raise ModelError(f"{source.tokenizer_dir}: cannot load the adapter's tokenizer "
                             f"({str(err).splitlines()[0][:160] if str(err) else type(err).__name__})") from None
        check_template(getattr(tokenizer, "chat_template", None), str(source.tokenizer_dir))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = load_tokenizer(info, trust_remote_code)
    ensure_chat_template(tokenizer)
    return tokenizer


def _run_of(path: Path) -> Path | None:
    """The run folder an adapter or checkpoint folder belongs to, if any."""
    for parent in (path.parent, path.parent.parent):
        if (parent / "status.json").exists() and (parent / "config.json").exists():
            return parent
    return None


def _base_of(adapter_dir: Path) -> str:
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RunError(f"{adapter_dir / 'adapter_config.json'}: cannot read ({err})") from None
    base = config.get("base_model_name_or_path")
    if not base:
        raise RunError(f"{adapter_dir / 'adapter_config.json'}: no base_model_name_or_path; cannot tell which "
                       "model the adapter belongs to")
    return base


def startable_runs(model: str) -> list[RunSummary]:
    """The runs a dpo/orpo run of `model` may start from: finished, of the same model, with an adapter."""
    return [row for row in list_runs() if row.model == model and _startable(open_run(row.id)) == ""]


def _startable(source: Run) -> str:
    """Why a run cannot be started from, or ""."""
    status = source.raw_status().get("status")
    if status != "finished" or not (source.adapter_dir / "adapter_model.safetensors").is_file():
        return (f"that run has not finished ({status or 'no status'}); start from a finished run, or finish it "
                "first (tunesmith resume)")
    return ""


def start_point(config: TrainConfig) -> tuple[TrainConfig, str]:
    """--from: the config with the finished run's LoRA rank and alpha (its weights must fit the layers)
    and its adapter folder; (config, "") without --from. RunError when it cannot be started from."""
    if not config.start_from:
        return config, ""
    source = open_run(config.start_from)
    why_not = _startable(source)
    if why_not:
        raise RunError(f"--from {source.id}: {why_not}")
    plan, theirs = source.plan(), source.config()
    if theirs.model != config.model:
        raise RunError(f"--from {source.id}: it trained {theirs.model}, this run {config.model}; start from a run "
                       "of the same model")
    for name in ("rank", "lora_alpha"):
        asked = getattr(config, name)
        if asked is not None and asked != getattr(plan, name):
            raise RunError(f"--from {source.id}: its adapter has {name.replace('_', ' ')} {getattr(plan, name)}, "
                           f"you asked for {asked}; drop --{name.replace('_', '-')}")
    return replace(config, rank=plan.rank, lora_alpha=plan.lora_alpha), str(source.adapter_dir)
