"""VRAM presets: how much memory a plan may use, read from TOML files.

Tunesmith ships one file per card size in `presets/` (8, 12, 16, 24, 48, 80 GB) and `auto.toml`
(the detected card's free memory, or the computer's available RAM without a GPU, less a margin).
Users add their own `NAME.toml` files to `<config dir>/presets/`; theirs win on a name clash.
A broken file is a `ConfigError` that names the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from app.core import host
from app.core.errors import ConfigError
from app.core.paths import config_dir
from app.core.plan.cards import Card, card_from_capability, detected_card, find_card
from app.core.resources import shipped_dir
from app.core.toml import load_toml
from app.core.units import GIB, gib

# key: (type, required, lowest allowed value)
KEYS = {
    "name": (str, False, None),
    "description": (str, False, None),
    "budget_gib": (float, True, 1.0),
    "safety_margin_gib": (float, True, 0.0),
    "preferred_rank": (int, False, 1),
    "context_cap": (int, False, 64),
}


@dataclass(frozen=True)
class Preset:
    """A memory budget and the planner's preferences for one kind of card."""

    id: str  # the file name without .toml
    name: str
    description: str
    budget_gib: float | None  # None for "auto": measured when the plan is made
    safety_margin_gib: float
    preferred_rank: int = 16
    context_cap: int = 8192
    file: str = ""


@dataclass(frozen=True)
class Budget:
    """What a plan may use: `usable` bytes on `device`, and where that figure came from."""

    preset: Preset
    device: str  # "cuda" or "cpu"
    total_bytes: int
    usable_bytes: int
    source: str  # e.g. "RTX 4090: 24.0 GiB, 1.3 GiB used by other programs" or "preset 24gb"
    card: Card | None = None  # the card planned for; None on the CPU or for a preset alone
    local: bool = False  # this machine's own device (what training here uses), not a card named or a preset alone
    baseline_bytes: int = 0  # CPU: this process's resident RAM when planned, part of every estimate (at_plan_time)


def preset_dirs() -> list[Path]:
    """Where presets are read from: the shipped folder, then the user's (which wins)."""
    return [shipped_dir("presets"), config_dir() / "presets"]


def list_presets() -> list[Preset]:
    """Every preset, "auto" first, then by budget."""
    found: dict[str, Path] = {}
    for folder in preset_dirs():
        if folder.is_dir():
            found.update({file.stem: file for file in sorted(folder.glob("*.toml"))})
    presets = [read_preset(file) for file in found.values()]
    return sorted(presets, key=lambda p: (p.budget_gib is not None, p.budget_gib or 0, p.id))


def get_preset(name: str) -> Preset:
    """The preset called `name` ("24gb", "auto", a user file's name); ConfigError if none is."""
    wanted = name.strip().lower().replace(" ", "")
    presets = list_presets()
    for preset in presets:
        if preset.id.lower() in (wanted, wanted + "gb"):
            return preset
    names = ", ".join(p.id for p in presets)
    raise ConfigError(f"no preset called '{name}'; choose one of {names}, or add {name}.toml to "
                      f"{config_dir() / 'presets'}")


def read_preset(file: Path) -> Preset:
    """Parse and check one preset file."""
    data = load_toml(file)
    is_auto = file.stem == "auto"
    values = {}
    for key, (kind, required, lowest) in KEYS.items():
        if key not in data:
            if required and not (is_auto and key == "budget_gib"):
                raise ConfigError(f"{file}: missing key '{key}'; add e.g. `{key} = {_example(key)}`")
            continue
        value = data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"{file}: key '{key}' must be {_kind_name(kind)}, not {value!r}")
        if lowest is not None and value < lowest:
            raise ConfigError(f"{file}: key '{key}' must be at least {lowest}, not {value!r}")
        values[key] = value
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ConfigError(f"{file}: unknown key '{unknown[0]}'; the keys are {', '.join(KEYS)}")
    budget = values.get("budget_gib")
    if budget is not None and values["safety_margin_gib"] >= budget:
        raise ConfigError(f"{file}: 'safety_margin_gib' ({values['safety_margin_gib']}) must be below "
                          f"'budget_gib' ({budget})")
    return Preset(id=file.stem, name=values.get("name", file.stem), description=values.get("description", ""),
                  budget_gib=budget, safety_margin_gib=values["safety_margin_gib"],
                  preferred_rank=values.get("preferred_rank", 16), context_cap=values.get("context_cap", 8192),
                  file=str(file))


def resolve_budget(preset: Preset, device: str | None = None, card: Card | None = None) -> Budget:
    """The bytes `preset` allows, and the card they are on.

    - `card` named (`--gpu NAME`, a card this machine need not have): its memory (or the preset's
      budget, if smaller) less the margin.
    - a card preset with no card named, on a machine without a CUDA GPU: the preset's budget, for
      a card of unknown kind.
    - this machine's CUDA card: the preset's budget (all of the card for "auto"), but never more
      than what other programs leave free on it, less the margin.
    - "auto" without a GPU: the available RAM, for training on the CPU."""
    margin = int(preset.safety_margin_gib * GIB)
    fixed = int(preset.budget_gib * GIB) if preset.budget_gib is not None else None
    if card is not None:
        total = min(fixed, card.memory_bytes) if fixed else card.memory_bytes
        return Budget(preset, "cuda", total, max(0, total - margin),
                      f"{card.name} ({card.source}): {card.memory_gib:.1f} GiB", card)
    local = host.local_device()
    if local == "cuda" and device in (None, "cuda"):
        return _local_cuda_budget(preset, fixed, margin)
    if fixed is not None:
        return Budget(preset, device or "cuda", fixed, fixed - margin, f"preset {preset.id}")
    available = host.available_ram()
    return Budget(preset, "cpu", available, max(0, available - margin),
                  f"no CUDA GPU: {gib(available, 1)} of RAM available", local=True)


def training_budget(name: str, gpu: str = "") -> Budget:
    """The budget for training on this machine with preset `name` (and the memory of card `gpu`,
    when named, as a cap). Without a CUDA GPU training runs on the CPU, so a card preset gives
    way to the available RAM (and says so)."""
    preset = get_preset(name)
    if gpu:
        named = find_card(gpu)
        card_gib = named.memory_bytes / GIB
        preset = replace(preset, budget_gib=min(preset.budget_gib or card_gib, card_gib))
    if host.local_device() == "cuda" or preset.budget_gib is None:
        return resolve_budget(preset)
    budget = resolve_budget(replace(preset, budget_gib=None), device="cpu")
    return replace(budget, source=f"{budget.source}; the {preset.id} preset is for NVIDIA cards")


def _local_cuda_budget(preset: Preset, fixed: int | None, margin: int) -> Budget:
    """This machine's first card: what the preset allows of what other programs leave free."""
    card = local_card()
    use = host.memory_use(0)
    if use is not None and use.total_bytes:
        total = use.total_bytes
        others = use.others_bytes or 0
        gpus = host.gpus().gpus
        driver = (gpus[0].reserved_bytes or 0) if gpus else 0  # NVML v2: outside "used", never ours
        note = f", {gib(others, 1)} used by other programs" if others >= 0.05 * GIB else ""
    else:  # no NVML reading (rare: NVML missing while torch sees the card): torch's free memory
        free, total, _ = host.cuda_free()
        others, driver = max(0, total - free), 0
        note = f", {gib(others, 1)} in use"
    free_for_us = max(0, total - others - driver)
    allowed = min(fixed, free_for_us) if fixed is not None else free_for_us
    name = card.name if card else "GPU 0"
    source = f"{name}: {gib(total, 1)}{note}"
    if fixed is not None:
        source += f"; preset {preset.id}" + (" (more than is free)" if fixed > free_for_us else "")
    return Budget(preset, "cuda", allowed, max(0, allowed - margin), source, card, local=True)


# A training process's resident RAM as it plans, measured by benchmarks/estimator_rss.py (0.33-0.43
# GiB for the demo, in every case of results/estimator_rss-cpu.md): the baseline of a plan made by a
# lighter process, so that `tunesmith plan` predicts what `train` will.
TRAINING_PROCESS_FLOOR = int(0.35 * GIB)


def at_plan_time(budget: Budget) -> Budget:
    """A budget of this machine's RAM measured again as the plan is made: what this process holds
    now is the estimate's baseline, and the process may grow to that plus the available RAM (less
    the margin). Other budgets are returned as they are."""
    if not (budget.local and budget.device == "cpu"):
        return budget
    host.trim_heap()  # what the data check freed is not this process's to keep
    # at least what a training process holds when it plans (torch, transformers, the tokenizer):
    # `tunesmith plan` itself may not have loaded them
    baseline, available = max(host.process_ram(), TRAINING_PROCESS_FLOOR), host.available_ram()
    total = baseline + available
    margin = int(budget.preset.safety_margin_gib * GIB)
    return replace(budget, total_bytes=total, usable_bytes=max(0, total - margin), baseline_bytes=baseline)


def device_line(budget: Budget | None) -> str:
    """What a plan is for, said first: this machine's GPU or CPU, or a card it does not have (and
    then what Train here will plan for instead)."""
    here = "this machine's GPU" if host.local_device() == "cuda" else "this CPU"
    if budget is None:
        return f"planned for {here}, without a memory check"
    if budget.local and budget.device == "cpu":
        return f"planned for this CPU: {budget.source.removeprefix('no CUDA GPU: ')}"
    if budget.local:
        return f"planned for this machine's {budget.card.name if budget.card else 'GPU 0'} ({budget.source})"
    what = (f"the {budget.card.name} you chose" if budget.card is not None
            else f"a card with {gib(budget.total_bytes, 0)} (the {budget.preset.id} preset)")
    if host.local_device() != "cuda":
        return f"planned for {what}; this machine has no NVIDIA card: Train will plan for this CPU"
    return f"planned for {what}; Train plans for this machine's GPU within that memory"


def local_card() -> Card | None:
    """This machine's first CUDA card: NVML's reading, else torch's (uncatalogued cards)."""
    card = detected_card(0)
    if card is not None:
        return card
    capability = host.cuda_capability(0)
    if capability is None:
        return None
    _, total, name = host.cuda_free(0)
    return card_from_capability(name, int(total), capability, "detected")


def _kind_name(kind: type) -> str:
    return {str: "text in quotes", float: "a number", int: "a whole number"}[kind]


def _example(key: str) -> str:
    return {"budget_gib": "24", "safety_margin_gib": "1.5"}.get(key, "16")
