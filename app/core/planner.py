"""Choose the settings a run trains with, within a memory budget, keeping every value the user fixed.

From the model's architecture facts, the data's token lengths and a budget (a VRAM preset, or the
free memory of this machine), `plan_run` picks the sequence length (cover p99 of the data, else
p95, else the longest that fits), the LoRA rank (16; the preset's preferred rank when the data is
large and memory allows; lower before giving up context), gradient checkpointing (off when the plan
fits without it, since it costs ~20-30 % speed), micro-batch and accumulation for a target number of
tokens per optimizer step. Each choice comes with a one-line reason; when nothing fits, a
`PlanError` says what would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.core.architecture import ArchFacts
from app.core.config import Plan, TrainConfig
from app.core.data.batches import micro_batches_per_epoch
from app.core.data.stats import LengthStats, count_over
from app.core.errors import ConfigError, PlanError
from app.core.cards import Card, precision_for
from app.core.kernel_choice import OPTIMIZER_LABELS, choose_attention, choose_loss
from app.core.kernels import fused_loss_support, packing_support
from app.core.memory import CUDA_CONTEXT_BYTES, GIB, MemoryEstimate, MemorySetup, estimate_memory, gib
from app.core.presets import Budget

DEFAULT_RANK = 16
LOWER_RANKS = (8,)  # rank 4 would cost much quality for a few hundred MB; context goes first
TARGET_TOKENS_PER_STEP = 4096
MICRO_BATCHES = (4, 2, 1)
MIN_SEQ_LEN = 128
# Above this many trained tokens a higher LoRA rank has enough data to be worth its memory.
LARGE_DATA_TOKENS = 1_000_000
CARD_SIZES_GIB = (8, 12, 16, 24, 48, 80)
QUANTIZE_CHOICES = ("auto", "4bit", "none")
ASSUMED_CAPABILITY = (8, 0)  # a preset's card of unknown kind: Ampere, as cards.precision_for assumes
# An unquantised base is chosen by itself only when its plan keeps this share of the budget or less:
# room for what the estimate does not see, since a 16-bit base is the larger one.
UNQUANTISED_ROOM = 0.8


@dataclass(frozen=True)
class Fit:
    """One memory-feasible choice and its estimate."""

    seq_len: int
    rank: int
    grad_checkpointing: bool
    micro_batch: int
    estimate: MemoryEstimate


def detect_device() -> tuple[str, str, str]:
    """(device, compute dtype, optimizer) for this machine: bf16 (fp16 before Ampere) + paged
    8-bit AdamW on CUDA, fp32 + torch AdamW on the CPU."""
    from app.core import host

    capability = host.cuda_capability(0) if host.local_device() == "cuda" else None
    if capability is not None:
        # is_bf16_supported() also says yes for Turing, where bf16 is emulated and slow
        return "cuda", "bfloat16" if capability >= (8, 0) else "float16", "paged_adamw_8bit"
    return "cpu", "float32", "adamw_torch"


def device_settings(device: str, card: Card | None, reasons: dict[str, str]) -> tuple[str, str]:
    """(compute dtype, optimizer) a plan for `device` and `card` trains with, with reasons."""
    if device != "cuda":
        reasons["compute_dtype"] = "fp32: the CPU path trains in fp32 (bitsandbytes' CPU kernels compute in fp32)"
        reasons["optimizer"] = f"{OPTIMIZER_LABELS['adamw_torch']}: the paged 8-bit optimizer needs CUDA"
        return "float32", "adamw_torch"
    dtype, reasons["compute_dtype"] = precision_for(card)
    reasons["optimizer"] = f"{OPTIMIZER_LABELS['paged_adamw_8bit']}: 2 bytes of state per LoRA weight"
    return dtype, "paged_adamw_8bit"


def plan_run(config: TrainConfig, stats: LengthStats, lengths: list[int], has_validation: bool,
             facts: ArchFacts | None, budget: Budget | None, lora_dropout: float | None = None) -> Plan:
    """A Plan for `config` on data with these token lengths, within `budget` (None: no memory check)."""
    validate_config(config)
    reasons: dict[str, str] = {}
    device = budget.device if budget else detect_device()[0]
    card = budget.card if budget else None
    dtype, optimizer = device_settings(device, card, reasons)
    dropout = config.lora_dropout if lora_dropout is None else lora_dropout
    max_positions = facts.max_positions if facts else None
    cap = min(budget.preset.context_cap if budget else 2048, max_positions or 1 << 30)
    wanted_seq = _wanted_seq_len(config, stats, cap, reasons)
    loss, reasons["loss"] = choose_loss(device, fused_loss_support(facts), config.loss_kernel)

    if facts is None or budget is None:
        fit = Fit(wanted_seq, config.rank or DEFAULT_RANK, bool(config.grad_checkpointing),
                  config.micro_batch or MICRO_BATCHES[0], None)
        quantize = config.quantize if config.quantize in ("4bit", "none") else "4bit"
        reasons["quantize"] = "set by you" if config.quantize != "auto" else "4-bit: the model's size is not known"
        reasons["memory"] = "not planned: the model's architecture could not be read from config.json"
    else:
        attention_guess = _rows_attention(config, facts, device, card)
        fit, quantize = _choose_base(config, stats, facts, budget, wanted_seq, dtype, optimizer, dropout > 0,
                                     reasons, loss, attention_guess)
        reasons["memory"] = (f"predicted peak {gib(fit.estimate.peak)} of {gib(budget.usable_bytes)} usable "
                             f"({budget.source}, {budget.preset.safety_margin_gib:g} GiB kept free)")
    over = count_over(lengths, fit.seq_len)
    if over:
        reasons["seq_len"] += f"; {over} example{'s' * (over != 1)} will be truncated"

    rank = fit.rank
    alpha = config.lora_alpha or 2 * rank
    reasons["lora_alpha"] = "set by you" if config.lora_alpha else "2 x rank"
    micro = fit.micro_batch
    batching = _choose_batching(config, facts, fit.seq_len, reasons)
    attention, reasons["attention"] = choose_attention(batching == "packed", device, _capability(card, device),
                                                       config.attention, bool(facts and facts.attention_softcap))
    if batching == "packed":
        why = ("set by you" if config.micro_batch else "the longest row planned" if micro == MICRO_BATCHES[0]
               or micro * fit.seq_len >= TARGET_TOKENS_PER_STEP else "the longest row that fits")
        reasons["micro_batch"] = f"packed rows of {micro} x {fit.seq_len} = {micro * fit.seq_len:,} tokens: {why}"
    mean_len = max(1, min(fit.seq_len, stats.total // max(1, stats.count)))
    shape = Plan(seq_len=fit.seq_len, micro_batch=micro, batching=batching)
    micro_batches = micro_batches_per_epoch(lengths, shape, config.seed) if lengths else \
        math.ceil(stats.count / micro)
    per_micro = (sum(min(n, fit.seq_len) for n in lengths) / max(1, micro_batches) if lengths
                 else micro * mean_len)
    if config.grad_accum:
        accum = config.grad_accum
        reasons["grad_accum"] = "set by you"
    else:
        accum = max(1, min(16, round(TARGET_TOKENS_PER_STEP / max(1.0, per_micro))))
        unit = (f"packed rows of ~{per_micro:.0f} tokens" if batching == "packed" else
                f"batches of {micro} x ~{mean_len} tokens")
        reasons["grad_accum"] = f"about {TARGET_TOKENS_PER_STEP} tokens per optimizer step ({accum} {unit})"
    steps_per_epoch = max(1, math.ceil(micro_batches / accum))
    if config.max_steps:
        total = config.max_steps
        reasons["total_steps"] = "set by you (--max-steps)"
    else:
        total = max(1, math.ceil(config.epochs * steps_per_epoch))
        reasons["total_steps"] = f"{config.epochs:g} epoch(s) of {steps_per_epoch} steps"
    warmup = math.ceil(config.warmup_ratio * total) if config.warmup_ratio > 0 else 0
    eval_every = (config.eval_every or max(1, total // 10)) if has_validation else 0
    save_every = config.save_every or max(1, min(200, total // 10))
    estimate = fit.estimate
    return Plan(rank=rank, lora_alpha=alpha, seq_len=fit.seq_len, micro_batch=micro, grad_accum=accum,
                grad_checkpointing=fit.grad_checkpointing, batching=batching, loss=loss, attention=attention,
                quantize=quantize,
                total_steps=total,
                steps_per_epoch=steps_per_epoch, warmup_steps=warmup, eval_every=eval_every,
                save_every=save_every, compute_dtype=dtype, optimizer=optimizer, device=device,
                gpu=card.name if card else "", gpu_capability=card.capability_text if card else "",
                preset=budget.preset.id if budget else "", budget_bytes=budget.usable_bytes if budget else 0,
                predicted_peak_bytes=estimate.peak if estimate else 0,
                breakdown=estimate.to_dict() if estimate else {}, reasons=reasons)


def choose_fit(config: TrainConfig, stats: LengthStats, facts: ArchFacts, budget: Budget, wanted_seq: int,
               dtype: str, optimizer: str, dropout: bool, reasons: dict[str, str], loss: str = "plain",
               attention: str = "", quantize: str = "4bit") -> Fit:
    """The fastest, longest-context settings whose predicted peak fits `budget`."""
    def estimate(seq: int, rank: int, ckpt: bool, micro: int) -> MemoryEstimate:
        return estimate_memory(facts, MemorySetup(rank=rank, seq_len=seq, micro_batch=micro, grad_checkpointing=ckpt,
                                                  compute_dtype=dtype, optimizer=optimizer, device=budget.device,
                                                  lora_dropout=dropout, loss=loss, attention=attention,
                                                  quantize=quantize))

    seqs = [config.seq_len] if config.seq_len else _shorter_seqs(wanted_seq, stats)
    trained_tokens = stats.total
    preferred = budget.preset.preferred_rank
    if config.rank:
        ranks = [config.rank]
    elif preferred > DEFAULT_RANK and trained_tokens >= LARGE_DATA_TOKENS:
        ranks = [preferred, DEFAULT_RANK, *LOWER_RANKS]
    else:
        ranks = [DEFAULT_RANK, *LOWER_RANKS]
    ckpts = [config.grad_checkpointing] if config.grad_checkpointing is not None else [False, True]
    fit = None
    covering = 2 if len(seqs) > 1 and seqs[1] == _round_up(stats.p95) else 1  # p99 and p95
    for seq, rank in _candidates(seqs, ranks, covering):
        micros = [config.micro_batch] if config.micro_batch else \
            [m for m in MICRO_BATCHES if m * seq <= max(seq, TARGET_TOKENS_PER_STEP)]
        for ckpt in ckpts:
            for micro in micros:
                guess = estimate(seq, rank, ckpt, micro)
                if guess.peak <= budget.usable_bytes:
                    fit = Fit(seq, rank, ckpt, micro, guess)
                    break
            if fit:
                break
        if fit:
            break
    if fit is None:
        raise PlanError(_nothing_fits(facts, budget, seqs, ranks, ckpts, estimate, config))
    _explain(fit, config, budget, wanted_seq, trained_tokens, estimate, reasons)
    return fit


def validate_config(config: TrainConfig) -> None:
    """Raise ConfigError for a setting no plan can honour."""
    checks = [
        (config.rank is None or config.rank >= 1, "--rank must be at least 1"),
        (config.seq_len is None or config.seq_len >= 16, "--seq-len must be at least 16"),
        (config.micro_batch is None or config.micro_batch >= 1, "--batch must be at least 1"),
        (config.grad_accum is None or config.grad_accum >= 1, "--grad-accum must be at least 1"),
        (config.max_steps is None or config.max_steps >= 1, "--max-steps must be at least 1"),
        (config.epochs > 0, "--epochs must be above 0"),
        (0 < config.lr < 1, "--lr must be between 0 and 1, e.g. 2e-4"),
        (0 <= config.val_split <= 50, "--val-split is a percentage from 0 to 50"),
        (0 <= config.warmup_ratio < 1, "warmup ratio must be from 0 to below 1"),
        (config.max_grad_norm > 0, "max grad norm must be above 0"),
        (0 <= config.lora_dropout < 1, "LoRA dropout must be from 0 to below 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


# -- helpers ----------------------------------------------------------------------------------
def _choose_base(config: TrainConfig, stats: LengthStats, facts: ArchFacts, budget: Budget, wanted_seq: int,
                 dtype: str, optimizer: str, dropout: bool, reasons: dict[str, str], loss: str,
                 attention: str) -> tuple[Fit, str]:
    """The fit and the base's storage: unquantised when asked, or (auto) when it fits with the same
    context, rank, checkpointing and batch as 4-bit and leaves room (dequantising NF4 weights at
    every matmul costs time: on a CPU most of the step); 4-bit (QLoRA) otherwise."""
    if config.quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"--quantize {config.quantize}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    args = (config, stats, facts, budget, wanted_seq, dtype, optimizer, dropout)
    if config.quantize == "none":
        try:
            fit = choose_fit(*args, reasons, loss, attention, "none")
        except PlanError as error:
            raise PlanError(f"{error}; or keep the base in 4 bits (--quantize 4bit or auto)") from None
        reasons["quantize"] = f"unquantised ({_dtype_name(dtype)}): set by you"
        return fit, "none"
    four = choose_fit(*args, reasons, loss, attention, "4bit")
    if config.quantize == "4bit":
        reasons["quantize"] = "4-bit NF4 (QLoRA): set by you"
        return four, "4bit"
    usable = budget.usable_bytes
    try:
        plain = choose_fit(*args, dict(reasons), loss, attention, "none")
    except PlanError:
        plain = None
    same = plain is not None and (plain.seq_len, plain.rank, plain.grad_checkpointing, plain.micro_batch) == \
        (four.seq_len, four.rank, four.grad_checkpointing, four.micro_batch)
    if same and plain.estimate.peak <= UNQUANTISED_ROOM * usable:
        reasons["quantize"] = (f"unquantised ({_dtype_name(dtype)}): fits in {gib(plain.estimate.peak)} of "
                               f"{gib(usable)}, and skips dequantising 4-bit weights at every matmul")
        choose_fit(*args, reasons, loss, attention, "none")  # its reasons for the other fields
        return plain, "none"
    why = ("would not fit" if plain is None else
           f"would need {gib(plain.estimate.peak)}, more than {UNQUANTISED_ROOM:.0%} of {gib(usable)}"
           if same else "would need a shorter context, lower rank or checkpointing")
    reasons["quantize"] = f"4-bit NF4 (QLoRA): unquantised weights {why}"
    return four, "4bit"


def _capability(card: Card | None, device: str) -> tuple[int, int] | None:
    """The card's compute capability; a CUDA plan for a card of unknown kind assumes Ampere, as
    its precision does (precision_for)."""
    if card is not None:
        return card.capability
    return ASSUMED_CAPABILITY if device == "cuda" else None


def _dtype_name(dtype: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)


def _rows_attention(config: TrainConfig, facts: ArchFacts | None, device: str, card: Card | None) -> str:
    """The attention the rows would use, for the estimate (packed paths and eager have costs of
    their own); "" when the choice is refused (refused again, with its reason, once the batching
    is chosen)."""
    packed = not (config.packing is False or packing_support(facts, 1))
    try:
        return choose_attention(packed, device, _capability(card, device), config.attention,
                                bool(facts and facts.attention_softcap))[0]
    except ConfigError:
        return ""


def _choose_batching(config: TrainConfig, facts: ArchFacts | None, seq_len: int, reasons: dict[str, str]) -> str:
    why_not = packing_support(facts, seq_len)
    if config.packing is False:
        reasons["batching"] = "padded batches of similar lengths: packing turned off by you"
        return "grouped"
    if why_not:
        if config.packing:
            raise ConfigError(f"--packing is not available for this model: {why_not}; leave it off")
        reasons["batching"] = f"padded batches of similar lengths: {why_not}"
        return "grouped"
    reasons["batching"] = "packed: several examples per row, no padding tokens"
    return "packed"


def _round_up(value: int, step: int = 64) -> int:
    return step * max(1, math.ceil(value / step))


def _wanted_seq_len(config: TrainConfig, stats: LengthStats, cap: int, reasons: dict[str, str]) -> int:
    if config.seq_len:
        reasons["seq_len"] = "set by you"
        return config.seq_len
    wanted = max(64, min(cap, _round_up(stats.p99)))
    reasons["seq_len"] = f"covers 99% of examples (p99 {stats.p99} tokens)"
    if wanted < _round_up(stats.p99):
        reasons["seq_len"] = f"the context cap {cap} (p99 of the data is {stats.p99} tokens)"
    return wanted


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


def _shorter_seqs(wanted: int, stats: LengthStats) -> list[int]:
    """`wanted`, then p95, then halvings: the lengths to try, longest first."""
    seqs = [wanted]
    p95 = _round_up(stats.p95)
    if MIN_SEQ_LEN <= p95 < wanted:
        seqs.append(p95)
    length = seqs[-1]
    while length // 2 >= MIN_SEQ_LEN:
        length = _round_up(length // 2)
        if length < seqs[-1]:
            seqs.append(length)
    return seqs


def _explain(fit: Fit, config: TrainConfig, budget: Budget, wanted_seq: int, trained_tokens: int,
             estimate, reasons: dict[str, str]) -> None:
    usable = gib(budget.usable_bytes)
    if not config.seq_len and fit.seq_len < wanted_seq:
        reasons["seq_len"] = (f"{wanted_seq} tokens would not fit in {usable}; the longest that fits"
                              if fit.rank == LOWER_RANKS[-1] or fit.grad_checkpointing else
                              f"shortened from {wanted_seq} to fit in {usable}")
    if config.rank:
        reasons["rank"] = "set by you"
    elif fit.rank > DEFAULT_RANK:
        reasons["rank"] = (f"{fit.rank}: the preset prefers it and {trained_tokens:,} trained tokens can use it")
    elif fit.rank < DEFAULT_RANK:
        reasons["rank"] = f"lowered from {DEFAULT_RANK} to keep the context length within {usable}"
    else:
        reasons["rank"] = f"default rank {DEFAULT_RANK}"
    if config.grad_checkpointing is not None:
        reasons["grad_checkpointing"] = "set by you"
    elif fit.grad_checkpointing:
        without = estimate(fit.seq_len, fit.rank, False, 1).peak
        reasons["grad_checkpointing"] = (f"on: without it the peak would be {gib(without)}, over {usable} "
                                         "(costs ~20-30% speed)")
    else:
        reasons["grad_checkpointing"] = "off: the plan fits without it, ~20-30% faster"
    if config.micro_batch:
        reasons["micro_batch"] = "set by you"
    elif fit.micro_batch == MICRO_BATCHES[0]:
        reasons["micro_batch"] = f"{fit.micro_batch} examples per forward pass"
    else:
        reasons["micro_batch"] = f"{fit.micro_batch}: the most that fits with {fit.seq_len} tokens"


def _nothing_fits(facts: ArchFacts, budget: Budget, seqs, ranks, ckpts, estimate, config: TrainConfig) -> str:
    smallest = estimate(seqs[-1], ranks[-1], ckpts[-1], config.micro_batch or 1)
    wanted = estimate(seqs[0], ranks[0], ckpts[-1], config.micro_batch or 1)
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
    if config.seq_len or config.micro_batch or config.grad_checkpointing is False:
        return (f"the settings you fixed need at least {gib(smallest.peak)} and {gib(usable)} is usable "
                f"({budget.source}); try a shorter --seq-len, --batch 1 or --grad-checkpointing, or {bigger}")
    return (f"even {seqs[-1]} tokens need {gib(smallest.peak)} and {gib(usable)} is usable "
            f"({budget.source}); choose a smaller model or {bigger}")
