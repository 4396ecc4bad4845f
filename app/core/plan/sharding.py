"""Models bigger than one card: FSDP-QLoRA over several (issue 20), planned.

With `--gpus N` the planner first gives every card a whole replica (DDP: the fastest, the same
plan as one card). When the 4-bit model and its step do not fit one card, FSDP shards the 4-bit
weights, the LoRA weights, their gradients and the optimizer state over the N cards (each gathers
one layer whole while it runs, and the lm_head for the loss: memory.py's `gathered` term); the last
rung keeps the shards in host RAM (FSDP's CPU offload), gathering them to the card when used. On
one card that does not hold the model, the refusal says how many such cards would.

Planned and predicted only: Tunesmith does not train with FSDP yet (`refuse_untrainable`), and the
FSDP terms of the estimate have not been measured.
"""

from __future__ import annotations

from app.core.errors import ConfigError, PlanError
from app.core.units import gib

CARD_COUNTS = (2, 4, 8)


def four_bit_fit(choose_fit, args: tuple, gpus: int, device: str):
    """(fit, reasons) for the 4-bit base: one replica per card, else FSDP, else FSDP with its
    shards in host RAM; `choose_fit` and `args` as the planner calls it."""
    try:
        fit, reasons = choose_fit(*args, "4bit")
        return fit, reasons
    except PlanError as error:
        if device != "cuda":
            raise
        if gpus <= 1:
            raise PlanError(f"{error}{_cards_that_would(choose_fit, args)}") from None
        replica_error = error
    for offload in (False, True):
        try:
            fit, reasons = choose_fit(*args, "4bit", shards=gpus, offload_params=offload)
        except PlanError:
            continue
        where = (f"; the shards wait in host RAM ({gib(fit.estimate.host_offload)} in all), gathered to the "
                 "cards when used" if offload else "")
        reasons["gpus"] = (f"FSDP-QLoRA over {gpus} cards: one card does not hold the 4-bit model and its step, "
                           f"so weights, LoRA and optimizer state are sharded{where}. Predicted only: Tunesmith "
                           "cannot train with FSDP yet")
        return fit, reasons
    raise PlanError(f"{replica_error}; even sharded over {gpus} cards (FSDP, its shards in host RAM) it does "
                    "not fit") from None


def _cards_that_would(choose_fit, args: tuple) -> str:
    """"; N such cards would hold it ..." for a one-card refusal, when FSDP over a few would fit."""
    for count in CARD_COUNTS:
        for offload in (False, True):
            try:
                fit, _ = choose_fit(*args, "4bit", shards=count, offload_params=offload)
            except PlanError:
                continue
            ram = f", {gib(fit.estimate.host_offload)} of host RAM" if offload else ""
            return (f"; {count} such cards would hold it sharded (--gpus {count}: FSDP-QLoRA, "
                    f"{gib(fit.estimate.peak)} a card{ram}; planned, not yet trainable)")
    return ""


def strategy_of(fit, gpus: int) -> str:
    """The plan's strategy: "" (one process), "ddp", "fsdp" or "fsdp-offload"."""
    if gpus <= 1:
        return ""
    if fit.shards <= 1:
        return "ddp"
    return "fsdp-offload" if fit.offload_params else "fsdp"


def refuse_untrainable(plan) -> None:
    """One line instead of a run Tunesmith cannot train yet."""
    if plan.strategy.startswith("fsdp"):
        raise ConfigError(f"--gpus {plan.gpus}: this model needs FSDP-QLoRA over the cards (see `tunesmith plan`), "
                          "which Tunesmith plans but does not train yet; choose a model that fits one card")
