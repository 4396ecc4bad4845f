"""Models bigger than one card: FSDP-QLoRA over several (issue 20), the plan.

With `--gpus N` the planner first gives every card a whole replica (DDP: the fastest, the same
plan as one card). When the 4-bit model and its step do not fit one card, FSDP shards the 4-bit
weights, the LoRA weights, their gradients and the optimizer state over the N cards (each gathers
one layer whole while it runs, and the lm_head for the loss: memory.py's `gathered` term); the last
rung keeps the shards in host RAM (FSDP's CPU offload), gathering them to the card when used. On
one card that does not hold the model, the refusal says how many such cards would. `--strategy
fsdp` shards whatever the fit (on the CPU too: gloo processes, the same code); `--strategy ddp`
never does.

Trained by train/parallel/sharded.py; the FSDP terms of the estimate have not been measured on a GPU.
"""

from __future__ import annotations

from dataclasses import replace

from app.core.errors import PlanError
from app.core.plan.fit import Fit, FitRequest, choose_fit
from app.core.plan.kernel_choice import OPTIMIZER_LABELS
from app.core.units import gib

CARD_COUNTS = (2, 4, 8)
SHARDED_OPTIMIZER = "adamw_torch"


def four_bit_fit(request: FitRequest) -> tuple[Fit, dict[str, str]]:
    """(fit, reasons) for the 4-bit base: one replica per card, else FSDP, else FSDP with its
    shards in host RAM, as the user's --strategy allows ("auto", "ddp" or "fsdp")."""
    request = replace(request, quantize="4bit")
    gpus, device, wanted = request.config.gpus, request.budget.device, request.config.strategy
    replica_error = None
    if wanted != "fsdp":
        try:
            return choose_fit(request)
        except PlanError as error:
            if device != "cuda" or wanted == "ddp":
                fsdp_fits = wanted == "ddp" and device == "cuda"
                extra = "; --strategy fsdp would shard it over the cards" if fsdp_fits else ""
                raise PlanError(f"{error}{extra}") from None
            if gpus <= 1:
                raise PlanError(f"{error}{_cards_that_would(request)}") from None
            replica_error = error
    for offload in (False, True) if device == "cuda" else (False,):
        try:
            fit, reasons = choose_fit(sharded(request, gpus, offload))
        except PlanError as error:
            replica_error = replica_error or error
            continue
        where = (f"; the shards wait in host RAM ({gib(fit.estimate.host_offload)} in all), gathered to the "
                 "cards when used" if offload else "")
        what = "cards" if device == "cuda" else "processes"
        why = ("set by you" if wanted == "fsdp" else "one card does not hold the 4-bit model and its step")
        reasons["gpus"] = (f"FSDP-QLoRA over {gpus} {what}: {why}, so weights, LoRA and optimizer state are "
                           f"sharded{where}" + ("" if device == "cuda" else " (gloo: the FSDP code path, to try it)"))
        reasons["optimizer"] = (f"{OPTIMIZER_LABELS[SHARDED_OPTIMIZER]}: its state sharded by FSDP (the 8-bit "
                                "optimizer does not take FSDP's sharded weights)")
        return fit, reasons
    raise PlanError(f"{replica_error}; even sharded over {gpus} cards (FSDP, its shards in host RAM) it does "
                    "not fit") from None


def _cards_that_would(request: FitRequest) -> str:
    """"; N such cards would hold it ..." for a one-card refusal, when FSDP over a few would fit."""
    for count in CARD_COUNTS:
        for offload in (False, True):
            try:
                fit, _ = choose_fit(sharded(request, count, offload))
            except PlanError:
                continue
            ram = f", {gib(fit.estimate.host_offload)} of host RAM" if offload else ""
            return (f"; {count} such cards would hold it sharded (--gpus {count}: FSDP-QLoRA, "
                    f"{gib(fit.estimate.peak)} a card{ram})")
    return ""


def sharded(request: FitRequest, shards: int, offload: bool) -> FitRequest:
    """The request sharded by FSDP over `shards` processes (`offload`: the shards in host RAM),
    with the optimizer FSDP trains with."""
    return replace(request, optimizer=SHARDED_OPTIMIZER, shards=shards, offload_params=offload)


def strategy_of(fit, gpus: int) -> str:
    """The plan's strategy: "" (one process), "ddp", "fsdp" or "fsdp-offload"."""
    if gpus <= 1:
        return ""
    if fit.shards <= 1:
        return "ddp"
    return "fsdp-offload" if fit.offload_params else "fsdp"
