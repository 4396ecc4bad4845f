"""The memory-feasible settings of a plan: the longest context, then the highest rank, then no
checkpointing, then the biggest micro-batch whose predicted peak fits the budget, tried in that
order of preference, with the reason for each choice; when nothing fits, what would."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from app.core import host
from app.core.config import TrainConfig
from app.core.data.stats import LengthStats
from app.core.errors import PlanError
from app.core.models.architecture import ArchFacts
from app.core.plan.context import LADDER, Saving, on_device
from app.core.plan.memory import MemoryEstimate, MemorySetup, estimate_memory
from app.core.plan.memory_constants import CUDA_CONTEXT_BYTES
from app.core.plan.presets import Budget
from app.core.plan.seq_len import SHORTEST_TRIED, SeqChoice
from app.core.units import GIB, gib

DEFAULT_RANK = 16
LOWER_RANKS = (8,)  # rank 4 would cost much quality for a few hundred MB; context goes first
TARGET_TOKENS_PER_STEP = 4096
MICRO_BATCHES = (4, 2, 1)
# Above this many trained tokens a higher LoRA rank has enough data to be worth its memory.
LARGE_DATA_TOKENS = 1_000_000
CARD_SIZES_GIB = (8, 12, 16, 24, 48, 80)


@dataclass(frozen=True)
class Fit:
    """One memory-feasible choice and its estimate."""

    seq_len: int
    rank: int
    grad_checkpointing: bool
    micro_batch: int
    estimate: MemoryEstimate
    saving: Saving = Saving()  # checkpointing and the long-context rungs it climbed (context.py)
    shards: int = 1  # FSDP over this many cards (1: each card a whole replica, or one card)
    offload_params: bool = False  # FSDP's shards in host RAM


@dataclass(frozen=True)
class FitRequest:
    """What a fit is asked: the user's fixed settings, the data, the model, the budget, the
    lengths it may choose from and the run's kernels. Variants are `replace(request, ...)`: the
    base's storage (`quantize`), FSDP's shards and their optimizer."""

    config: TrainConfig
    stats: LengthStats
    facts: ArchFacts
    budget: Budget
    seq: SeqChoice
    dtype: str
    optimizer: str
    dropout: bool
    loss: str = "plain"
    attention: str = ""
    quantize: str = "4bit"
    shards: int = 1
    offload_params: bool = False
    rows_per_example: int = 1  # padded preference pairs: each side a row of its own (2)

    def estimate(self, seq: int, rank: int, saving: Saving, micro: int) -> MemoryEstimate:
        """The estimator's peak of these settings with this request's model, kernels and budget."""
        return estimate_memory(self.facts, MemorySetup(
            rank=rank, seq_len=seq, micro_batch=micro * self.rows_per_example, compute_dtype=self.dtype, optimizer=self.optimizer,
            device=self.budget.device, lora_dropout=self.dropout, loss=self.loss, attention=self.attention,
            quantize=self.quantize, shards=self.shards, offload_params=self.offload_params,
            process_baseline=self.budget.baseline_bytes, **asdict(saving)))


def choose_fit(request: FitRequest) -> tuple[Fit, dict[str, str]]:
    """The fastest, longest-context settings whose predicted peak fits the request's budget, and
    why each of them (the length's reason kept unless the fit is shorter)."""
    config, budget = request.config, request.budget
    ranks = _ranks(config, budget, request.stats.total)
    ckpts = savings_to_try(config, budget.device)
    host_free = _HostRam(checked=not (budget.card is not None and budget.card.source == "catalogue"))

    def fits():
        """Every candidate in the order of preference (context, then rank, then no checkpointing,
        then the biggest micro-batch) whose predicted peak is within the budget."""
        for seq, rank in _candidates(list(request.seq.tries), ranks, request.seq.covering):
            micros = [config.micro_batch] if config.micro_batch else \
                [m for m in MICRO_BATCHES if m * seq <= max(seq, TARGET_TOKENS_PER_STEP)]
            for saving in ckpts:
                for micro in micros:
                    guess = request.estimate(seq, rank, saving, micro)
                    if guess.peak <= budget.usable_bytes and host_free.holds(guess.host_offload):
                        yield Fit(seq, rank, saving.grad_checkpointing, micro, guess, saving, request.shards,
                                  request.offload_params)

    fit = next(fits(), None)
    if fit is None and host_free.short:
        kept = "FSDP shards and offloaded checkpoints" if request.offload_params else "offloaded checkpoints"
        raise PlanError(f"{request.seq.shortest:,} tokens need {gib(host_free.short)} of RAM for {kept} "
                        f"and this machine has {gib(host_free.free)} free; close programs, or use a shorter --seq-len")
    if fit is None:
        raise PlanError(_nothing_fits(request, ranks, ckpts))
    return fit, {**_explain(fit, request), **_climbed(fit, request)}


def _ranks(config: TrainConfig, budget: Budget, trained_tokens: int) -> list[int]:
    """The LoRA ranks to try, best first: the user's; the preset's preferred one when the data is
    large enough to use it; the default, then lower before giving up context."""
    if config.rank:
        return [config.rank]
    preferred = budget.preset.preferred_rank
    if preferred > DEFAULT_RANK and trained_tokens >= LARGE_DATA_TOKENS:
        return [preferred, DEFAULT_RANK, *LOWER_RANKS]
    return [DEFAULT_RANK, *LOWER_RANKS]


def savings_to_try(config: TrainConfig, device: str) -> list[Saving]:
    """The ways of keeping less for backward the planner may use, cheapest first: what the user
    fixed, or none, then checkpointing and the long-context ladder above it (offloading on CUDA
    only); an MLP tile the user set stays on in each."""
    mine = config.mlp_tile
    if config.offload_checkpoints or config.layer_tile:
        return [Saving(True, config.offload_checkpoints, mine, config.layer_tile)]
    if config.grad_checkpointing is False:
        return [Saving(False, mlp_tile=mine)]
    ladder = [on_device(rung, device) for rung in LADDER]
    ladder = [replace(rung, mlp_tile=rung.mlp_tile or mine) for rung in ladder if rung is not None]
    ladder += [replace(rung, offload_checkpoints=False) for rung in ladder]  # when host RAM is short
    return ([Saving(mlp_tile=mine)] if config.grad_checkpointing is None else []) + list(dict.fromkeys(ladder))


class _HostRam:
    """This machine's available RAM, read once and only when an offloading plan asks; `short`:
    the least host RAM a plan that fitted the card lacked (0: none did). Not `checked` for a plan
    for a card named from the catalogue: that machine's RAM is not this one's (the plan says how
    much it needs)."""

    def __init__(self, checked: bool = True):
        self.free, self.short, self.checked = None, 0, checked

    def holds(self, needed: int) -> bool:
        if not needed or not self.checked:
            return True
        if self.free is None:
            self.free = host.available_ram()
        if needed <= self.free:
            return True
        self.short = min(self.short or needed, needed)
        return False


def _candidates(seqs: list[int], ranks: list[int], covering: int) -> list[tuple[int, int]]:
    """(sequence length, rank) pairs in the order the planner tries them, best first.

    The order is a chain along which neither value ever grows, so that a larger budget (which
    stops earlier on the chain) never gets a shorter context or a lower rank. The first length
    (p99 of the data) is tried at the ranks down to the default; the last length that still covers
    the data (p95) at every rank down to the lowest, since rank is given up before context; any
    shorter length at the lowest rank. With one covering length it takes all ranks."""
    default_at = ranks.index(DEFAULT_RANK) + 1 if DEFAULT_RANK in ranks else len(ranks)
    pairs = []
    for index, seq in enumerate(seqs):
        if index < covering - 1:
            pairs += [(seq, rank) for rank in ranks[:default_at]]
        elif index == covering - 1:
            first = ranks.index(pairs[-1][1]) if pairs else 0
            pairs += [(seq, rank) for rank in ranks[first:]]
        else:
            pairs.append((seq, ranks[-1]))
    return pairs


def _explain(fit: Fit, request: FitRequest) -> dict[str, str]:
    """Why the fit has its sequence length, rank, checkpointing and micro-batch."""
    config, wanted_seq, trained_tokens = request.config, request.seq.wanted, request.stats.total
    usable = gib(request.budget.usable_bytes)
    why = {"seq_len": request.seq.reason}
    if not request.seq.fixed and fit.seq_len < wanted_seq:
        why["seq_len"] = (f"{wanted_seq} tokens would not fit in {usable}; the longest that fits"
                          if fit.rank == LOWER_RANKS[-1] or fit.grad_checkpointing else
                          f"shortened from {wanted_seq} to fit in {usable}")
    if config.rank:
        why["rank"] = "set by you"
    elif fit.rank > DEFAULT_RANK:
        why["rank"] = f"{fit.rank}: the preset prefers it and {trained_tokens:,} trained tokens can use it"
    elif fit.rank < DEFAULT_RANK:
        why["rank"] = f"lowered from {DEFAULT_RANK} to keep the context length within {usable}"
    else:
        why["rank"] = "the default"
    if config.layer_tile:
        why["grad_checkpointing"] = "on: tiled layers are a way of checkpointing (--layer-tile)"
    elif config.offload_checkpoints:
        why["grad_checkpointing"] = "on: offloaded checkpoints need it (--offload-checkpoints)"
    elif config.grad_checkpointing is not None:
        why["grad_checkpointing"] = "set by you"
    elif fit.grad_checkpointing:
        # the planner tries every micro-batch without checkpointing first: so even the smallest missed
        micro = config.micro_batch or MICRO_BATCHES[-1]
        without = request.estimate(fit.seq_len, fit.rank, Saving(mlp_tile=config.mlp_tile), micro).peak
        even = "" if micro == fit.micro_batch else f" even with micro-batch {micro}"
        why["grad_checkpointing"] = (f"on: without it the peak would be {gib(without)}{even}, over {usable} "
                                     "(costs ~20-30% speed)")
    else:
        why["grad_checkpointing"] = "off: the plan fits without it, ~20-30% faster"
    if config.micro_batch:
        why["micro_batch"] = "set by you"
    elif fit.micro_batch == MICRO_BATCHES[0]:
        why["micro_batch"] = f"{fit.micro_batch} examples per forward pass"
    else:
        why["micro_batch"] = f"{fit.micro_batch}: the most that fits with {fit.seq_len} tokens"
    return why


def _climbed(fit: Fit, request: FitRequest) -> dict[str, str]:
    """Why each long-context rung the planner (not the user) turned on: the peak without it."""
    config, saving, usable = request.config, fit.saving, request.budget.usable_bytes
    why = {}
    parts = (("offload_checkpoints", config.offload_checkpoints, False,
              f"{gib(fit.estimate.host_offload)} of layer inputs wait in host RAM"),
             ("mlp_tile", config.mlp_tile, 0, f"the MLP over tiles of {saving.mlp_tile:,} tokens"),
             ("layer_tile", config.layer_tile, 0,
              f"each layer but attention over tiles of {saving.layer_tile:,} tokens"))
    for key, mine, off, what in parts:
        if not getattr(saving, key) or mine:
            continue
        without = request.estimate(fit.seq_len, fit.rank, replace(saving, **{key: off}), fit.micro_batch).peak
        why[key] = (f"on: without it the peak at {fit.seq_len:,} tokens would be {gib(without)}, over {gib(usable)}; "
                    if without > usable else "on: the ladder offloads before it tiles; ") + what
    return why


def _nothing_fits(request: FitRequest, ranks: list[int], ckpts: list[Saving]) -> str:
    """What would fit, for a request nothing fits: a smaller model or a bigger card, or what to
    change of the settings the user fixed."""
    config, budget, seqs = request.config, request.budget, request.seq.tries
    smallest = request.estimate(seqs[-1], ranks[-1], ckpts[-1], config.micro_batch or 1)
    wanted = request.estimate(seqs[0], ranks[0], ckpts[-1], config.micro_batch or 1)  # the most saving rung
    usable = budget.usable_bytes
    context = CUDA_CONTEXT_BYTES if budget.device == "cuda" else 0
    static = (smallest.quantized_weights + smallest.kept_weights + smallest.lora_weights
              + smallest.lora_gradients + smallest.optimizer_state + context)
    card = next((size for size in CARD_SIZES_GIB
                 if wanted.peak + budget.preset.safety_margin_gib * GIB <= size * GIB), None)
    bigger = f"{'an' if card in (8, 80) else 'a'} {card} GB card" if card else "a card with more memory"
    if static >= usable:
        return (f"the model alone needs {gib(static)} and {gib(usable)} is usable ({budget.source}); "
                f"choose a smaller model or {bigger}")
    if request.seq.fixed or config.micro_batch or config.grad_checkpointing is False:
        tries = [option for option, given in (("a shorter --seq-len",
                                               not request.seq.fixed or seqs[0] // 2 < SHORTEST_TRIED),
                                              ("--batch 1", config.micro_batch in (None, 1)),
                                              ("--grad-checkpointing", config.grad_checkpointing is not False))
                 if not given]  # never what is already so
        return (f"the settings you fixed need at least {gib(smallest.peak)} and {gib(usable)} is usable "
                f"({budget.source}); try {_listed(tries + [bigger])}")
    return (f"even {seqs[-1]} tokens need {gib(smallest.peak)} and {gib(usable)} is usable "
            f"({budget.source}); choose a smaller model or {bigger}")


def _listed(items: list[str]) -> str:
    """"a", "a or b", "a, b or c"."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"
