"""A plan before anything loads: what `tunesmith plan` prints and the GUI's plan panel shows.

Model facts come from config.json (a folder, the HF cache or the catalogue), token lengths from the
data file measured with the model's tokenizer (or the demo model's when the model is not
downloaded), the budget from a preset. No weights are read, nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.core.config import Plan, TrainConfig
from app.core.data.check import DataCheck, check_dataset
from app.core.data.holdout import training_lengths
from app.core.data.stats import LengthStats, length_stats
from app.core.models.facts import ModelFacts
from app.core.models.resolve import model_facts
from app.core.models.support import gguf_problem
from app.core.plan.cards import find_card
from app.core.plan.planner import plan_run
from app.core.plan.presets import Budget, get_preset, resolve_budget

@dataclass
class PlanPreview:
    """The plan with everything it was made from."""

    model: ModelFacts
    budget: Budget
    plan: Plan
    stats: LengthStats | None
    tokenizer_note: str
    export_note: str = ""  # what the trained model cannot be exported as (said before training)

    def to_dict(self) -> dict:
        facts = self.model.arch
        return {
            "model": {"name": self.model.name, "source": self.model.kind, "config": str(self.model.config_path),
                      "total_params": facts.total_params, **facts.to_dict()},
            "gpu": self.budget.card.to_dict() if self.budget.card else None,
            "budget": {"preset": self.budget.preset.id, "device": self.budget.device,
                       "total_bytes": self.budget.total_bytes, "usable_bytes": self.budget.usable_bytes,
                       "safety_margin_gib": self.budget.preset.safety_margin_gib, "source": self.budget.source},
            "data": self.stats.to_dict() if self.stats else None,
            "tokenizer_note": self.tokenizer_note,
            "export_note": self.export_note,
            "predicted_peak_bytes": self.plan.predicted_peak_bytes,
            "breakdown": self.plan.breakdown,
            "plan": self.plan.to_dict(),
        }


def preview_plan(config: TrainConfig, lengths: list[int] | None = None, rows: list | None = None) -> PlanPreview:
    """Plan `config` (model, optional data, preset, any fixed fields) without loading weights.
    `lengths` (and `rows`, the file's usable examples): the data's token lengths when the caller has
    measured them already (the app's dataset check does), so the file is not read and tokenised
    twice. The held-out examples are set aside as the run will (holdout.py)."""
    facts = model_facts(config.model)
    preset = get_preset(config.preset)
    budget = resolve_budget(preset, card=find_card(config.gpu) if config.gpu else None)
    held = None
    if config.data:
        if lengths is None:
            lengths, rows = data_lengths(config)
        if not config.val_data:
            lengths, held = training_lengths(rows, lengths, config.val_split, config.seed)
        note = tokenizer_note(facts)
        stats = length_stats(lengths)
    else:  # the planner picks the length to plan for (seq_len.py)
        lengths, note, stats = [], "no data given: planned for full-length examples", None
    has_eval = bool(config.val_data) or (held is not None and bool(held.held))
    plan = plan_run(config, stats or length_stats([]), lengths, has_eval, facts.arch, budget,
                    with_data=bool(config.data))
    if held is not None:
        plan.reasons["held_out"] = held.reason
    elif config.val_data:
        plan.reasons["held_out"] = f"eval data {Path(config.val_data).name}"
    return PlanPreview(facts, budget, plan, stats, note, export_note(facts.config))


def export_note(config: dict) -> str:
    """What the trained adapter will not export as, from the model's config alone."""
    problem = gguf_problem(config)
    return f"{problem}; the adapter and merged exports work" if problem else ""


def tokenizer_note(facts: ModelFacts) -> str:
    """What the user should know about the tokenizer the lengths were measured with."""
    if facts.kind != "catalogue":
        return ""
    return (f"token lengths measured with the demo model's tokenizer ({facts.name} is not downloaded); "
            "its own may count 10-20% differently")


def data_lengths(config: TrainConfig) -> tuple[list[int], list]:
    """Token lengths of the usable rows of `config.data`, measured by the one dataset check, and
    the rows."""
    summary = check_dataset(DataCheck(config.data, config.model, skip_bad=config.skip_bad,
                                      trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle),
                            "plan")
    return summary.lengths, summary.report.examples
