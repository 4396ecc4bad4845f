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

from dataclasses import dataclass, replace

from app.core import host
from app.core.config import METHOD_CHOICES, PREFERENCE_METHODS, QUANTIZE_CHOICES, Plan, TrainConfig
from app.core.data.stats import LengthStats, count_over
from app.core.errors import ConfigError, PlanError
from app.core.models.architecture import ArchFacts
from app.core.models.support import packing_support
from app.core.plan.cards import Card, precision_for
from app.core.plan.context import Saving
from app.core.plan.fit import DEFAULT_RANK, MICRO_BATCHES, TARGET_TOKENS_PER_STEP, Fit, FitRequest, choose_fit
from app.core.plan.kernel_choice import OPTIMIZER_LABELS, choose_attention, choose_loss
from app.core.plan.memory import with_passes
from app.core.plan.method import fused_why_not, rows_per_example
from app.core.plan.presets import Budget, at_plan_time, device_line
from app.core.plan.processes import gpus_reason, nodes_reason
from app.core.plan.schedule import Schedule, plan_schedule
from app.core.plan.seq_len import SEQ_LEN_LEAST, PlannedData, SeqChoice, choose_seq_len, context_cap, planned_data
from app.core.plan.sharding import SHARDED_OPTIMIZER, four_bit_fit, strategy_of
from app.core.speeds import known_speed
from app.core.units import format_duration, gib

STRATEGIES = ("auto", "ddp", "fsdp")
ASSUMED_CAPABILITY = (8, 0)  # a preset's card of unknown kind: Ampere, as cards.precision_for assumes
# An unquantised base is chosen by itself only when its plan keeps this share of the budget or less:
# room for what the estimate does not see, since a 16-bit base is the larger one.
UNQUANTISED_ROOM = 0.8


def device_settings(device: str, card: Card | None) -> tuple[tuple[str, str], tuple[str, str]]:
    """((compute dtype, why), (optimizer, why)) for a plan on `device` and `card`."""
    if device != "cuda":
        return (("float32", "fp32: the CPU path trains in fp32 (bitsandbytes' CPU kernels compute in fp32)"),
                ("adamw_torch", f"{OPTIMIZER_LABELS['adamw_torch']}: the paged 8-bit optimizer needs CUDA"))
    return (precision_for(card),
            ("paged_adamw_8bit", f"{OPTIMIZER_LABELS['paged_adamw_8bit']}: 2 bytes of state per LoRA weight"))


def cpu_threads(config: TrainConfig) -> tuple[int, str]:
    """(torch's threads on the CPU, why): the cores other programs leave free now, shared by the
    run's processes. A busy core shared with torch's threads makes every step wait for the slowest
    thread (benchmarks/cpu_threads.py: 2 threads beside one busy program ran several times slower
    than 1)."""
    processes = max(1, config.gpus)  # the gloo processes of a run on several share the cores
    if config.threads:
        return config.threads, "set by you"
    cores, busy = host.cpu_cores()
    if busy is None:
        return max(1, cores // processes), f"this machine's {cores} core{'s' * (cores != 1)}" + (
            f", shared by {processes} processes" if processes > 1 else "")
    free = max(1, int(cores - busy + 0.6))  # a core over 40 % busy elsewhere is not taken
    each = max(1, free // processes)
    busy_text = f"other programs keep {busy:.1f} of its {cores} cores busy" if busy >= 0.4 else \
        f"all {cores} of its cores are free"
    shared = f", shared by {processes} processes" if processes > 1 else ""
    return each, f"{busy_text} (measured as planned){shared}"


def plan_run(config: TrainConfig, stats: LengthStats, lengths: list[int], has_validation: bool,
             facts: ArchFacts | None, budget: Budget | None, lora_dropout: float | None = None,
             with_data: bool = True) -> Plan:
    """A Plan for `config` on data with these token lengths, within `budget` (None: no memory check).
    Without data (`with_data` False) the plan has no steps: the memory it needs for --seq-len, or
    for a common chat context, and "depends on the data" for the rest.

    Top to bottom: the budget (device, dtype, optimizer), the facts (the lengths to plan for and the
    one sequence-length decision), the fit (memory: length, rank, checkpointing, micro-batch, the
    base's storage), the kernels (batching, attention, threads), the schedule; each step returns
    its reasons."""
    validate_config(config)
    where = _budget_step(config, budget)
    cap = context_cap(facts, where.budget)
    data = planned_data(config, stats, lengths, cap, with_data)
    seq = choose_seq_len(config, data, cap, with_data)
    loss, loss_reason = choose_loss(where.device, fused_why_not(config, facts), config.loss_kernel)
    fitted = _fit_step(config, data, facts, where, seq, loss, config.lora_dropout if lora_dropout is None
                       else lora_dropout)
    kernels = _kernels_step(config, facts, where, fitted.fit)
    schedule = plan_schedule(config, data.stats, data.lengths, fitted.fit, kernels.batching, has_validation)
    reasons = {**where.reasons, "seq_len": seq.reason, "loss": loss_reason, **fitted.reasons, **kernels.reasons,
               **schedule.reasons}
    if not with_data:  # a plan for the model alone: the data decides the steps
        schedule = replace(schedule, total_steps=0, steps_per_epoch=0, warmup_steps=0, eval_every=0, save_every=0)
        reasons.update(seq_len="set by you" if seq.fixed else
                       f"no data given: {fitted.fit.seq_len} tokens (pass --data to fit your examples)",
                       total_steps="depends on the data")
        reasons.pop("grad_accum", None)
    estimate, reasons["memory"] = _with_step_passes(fitted, where, schedule.grad_accum)
    reasons.update(_tiles_reasons(config, where.device))
    plan = _assemble(config, where, fitted, kernels, schedule, loss, estimate, reasons)
    return _with_time(plan, config, data.lengths) if with_data else plan


@dataclass(frozen=True)
class _Where:
    """The budget step: where the run trains, in what dtype, with which optimizer."""

    budget: Budget | None  # as at plan time (this machine's RAM as the process is now)
    device: str
    card: Card | None
    dtype: str
    optimizer: str
    reasons: dict[str, str]


def _budget_step(config: TrainConfig, budget: Budget | None) -> _Where:
    budget = at_plan_time(budget) if budget else None
    device = budget.device if budget else host.compute_device()[0]
    card = budget.card if budget else None
    (dtype, dtype_reason), (optimizer, optimizer_reason) = device_settings(device, card)
    reasons = {"device": device_line(budget), "compute_dtype": dtype_reason, "optimizer": optimizer_reason}
    if config.gpus > 1 or config.nodes > 1:
        reasons["gpus"] = gpus_reason(config.gpus, device, budget) + nodes_reason(config)
    return _Where(budget, device, card, dtype, optimizer, reasons)


@dataclass(frozen=True)
class _Fitted:
    """The fit step: the memory-feasible settings, the base's storage and the optimizer they
    train with (FSDP's when sharded)."""

    fit: Fit
    quantize: str
    optimizer: str
    reasons: dict[str, str]


def _fit_step(config: TrainConfig, data: PlannedData, facts: ArchFacts | None, where: _Where, seq: SeqChoice,
              loss: str, dropout: float) -> _Fitted:
    """The fit within the budget; without the model's facts or a budget, the settings asked for
    (or the defaults) unchecked, and a reason that says so."""
    if facts is None or where.budget is None:
        fitted = _unchecked_fit(config, seq, where.optimizer)
    else:
        request = FitRequest(config, data.stats, facts, where.budget, seq, where.dtype, where.optimizer, dropout > 0,
                             loss, _rows_attention(config, facts, where.device, where.card),
                             rows_per_example=rows_per_example(config.method, _packs(config, facts)))
        fitted = _checked_fit(request)
    over = count_over(data.lengths, fitted.fit.seq_len)
    if over:
        fitted.reasons["seq_len"] = fitted.reasons.get("seq_len", seq.reason) + (
            f"; {over} example{'s' * (over != 1)} will be truncated")
    return fitted


def _checked_fit(request: FitRequest) -> _Fitted:
    """The fit within the request's budget, the base's storage, and the optimizer (FSDP's own
    when the fit shards the model)."""
    fit, quantize, reasons = _choose_base(request)
    budget, optimizer = request.budget, request.optimizer
    reasons["memory"] = (f"predicted peak {gib(fit.estimate.peak)} of {gib(budget.usable_bytes)} usable "
                         f"({budget.source}, {budget.preset.safety_margin_gib:g} GiB kept free)")
    if fit.shards > 1:  # sharding.py: the optimizer over FSDP's shards
        optimizer = SHARDED_OPTIMIZER
        if request.config.nodes > 1:
            raise PlanError("this plan shards the model with FSDP, which Tunesmith runs on one machine only (its "
                            "checkpoints would be split over the machines' disks); use --strategy ddp where one "
                            "card holds the model, or the GPUs of one machine")
    return _Fitted(fit, quantize, optimizer, reasons)


def _unchecked_fit(config: TrainConfig, seq: SeqChoice, optimizer: str) -> _Fitted:
    """The fit of a plan made without the model's architecture or a budget: what was asked."""
    reasons = {"quantize": "set by you" if config.quantize != "auto" else "4-bit: the model's size is not known",
               "memory": "not planned: the model's architecture could not be read from config.json"}
    checkpointing = bool(config.grad_checkpointing or config.offload_checkpoints or config.layer_tile)
    saving = Saving(checkpointing, config.offload_checkpoints, max(0, config.mlp_tile), max(0, config.layer_tile))
    fit = Fit(seq.wanted, config.rank or DEFAULT_RANK, checkpointing, config.micro_batch or MICRO_BATCHES[0], None,
              saving)
    return _Fitted(fit, config.quantize if config.quantize in ("4bit", "none") else "4bit", optimizer, reasons)


@dataclass(frozen=True)
class _Kernels:
    """The kernels step: how rows are batched, the attention that runs over them, CPU threads."""

    batching: str
    attention: str
    threads: int
    reasons: dict[str, str]


def _kernels_step(config: TrainConfig, facts: ArchFacts | None, where: _Where, fit: Fit) -> _Kernels:
    reasons: dict[str, str] = {}
    threads, reason = cpu_threads(config) if where.device == "cpu" else (0, "")
    if reason:
        reasons["threads"] = reason
    reasons["lora_alpha"] = "set by you" if config.lora_alpha else "2 x rank"
    batching, reasons["batching"] = _choose_batching(config, facts, fit.seq_len)
    attention, reasons["attention"] = choose_attention(batching == "packed", where.device,
                                                       _capability(where.card, where.device), config.attention,
                                                       bool(facts and facts.attention_softcap))
    if batching == "packed":
        reasons["micro_batch"] = _packed_rows_reason(config, fit)
    return _Kernels(batching, attention, threads, reasons)


def _with_step_passes(fitted: _Fitted, where: _Where, grad_accum: int):
    """(the estimate, the memory reason) once the step's accumulation is known: on the CPU the C
    heap grows with a step's micro-batches."""
    estimate, reason = fitted.fit.estimate, fitted.reasons["memory"]
    if estimate is None or where.budget is None:
        return estimate, reason
    passes = with_passes(estimate, where.device, grad_accum)
    if passes.peak <= where.budget.usable_bytes:
        return passes, reason.replace(gib(estimate.peak), gib(passes.peak), 1)
    # the fit chose its length for one micro-batch a step: say what accumulating may take
    return estimate, reason + (f"; with {grad_accum} micro-batches a step the C heap may take it to "
                               f"{gib(passes.peak)}: set a lower accumulation to stay within")


def _tiles_reasons(config: TrainConfig, device: str) -> dict[str, str]:
    """Why the long-context settings the user fixed are on."""
    reasons = {}
    if config.mlp_tile:
        reasons["mlp_tile"] = f"set by you: the MLP over tiles of {config.mlp_tile} tokens"
    if config.layer_tile:
        reasons["layer_tile"] = f"set by you: each layer but attention over tiles of {config.layer_tile} tokens"
    if config.offload_checkpoints:
        reasons["offload_checkpoints"] = "set by you: checkpointed layers' inputs wait in CPU RAM" + (
            "" if device == "cuda" else " (on the CPU they stay where they are)")
    return reasons


def _assemble(config: TrainConfig, where: _Where, fitted: _Fitted, kernels: _Kernels, schedule: Schedule,
              loss: str, estimate, reasons: dict[str, str]) -> Plan:
    """The Plan of the steps' choices."""
    fit, budget, card = fitted.fit, where.budget, where.card
    return Plan(rank=fit.rank, lora_alpha=config.lora_alpha or 2 * fit.rank, seq_len=fit.seq_len,
                micro_batch=fit.micro_batch, grad_accum=schedule.grad_accum,
                grad_checkpointing=fit.grad_checkpointing, mlp_tile=fit.saving.mlp_tile,
                offload_checkpoints=fit.saving.offload_checkpoints, layer_tile=fit.saving.layer_tile,
                batching=kernels.batching, gpus=max(1, config.gpus), nodes=max(1, config.nodes),
                strategy=strategy_of(fit, config.gpus), loss=loss, attention=kernels.attention,
                quantize=fitted.quantize, total_steps=schedule.total_steps, steps_per_epoch=schedule.steps_per_epoch,
                warmup_steps=schedule.warmup_steps, eval_every=schedule.eval_every, save_every=schedule.save_every,
                compute_dtype=where.dtype, optimizer=fitted.optimizer, device=where.device, threads=kernels.threads,
                gpu=card.name if card else "", gpu_capability=card.capability_text if card else "",
                preset=budget.preset.id if budget else "", budget_bytes=budget.usable_bytes if budget else 0,
                predicted_peak_bytes=estimate.peak if estimate else 0,
                breakdown=estimate.to_dict() if estimate else {}, reasons=reasons)


def _with_time(plan: Plan, config: TrainConfig, lengths: list[int]) -> Plan:
    """The plan with how long it will take: its real tokens at the speed the last run of this model
    trained this way measured here (speeds.py); without one, it says the first steps will tell."""
    if not plan.total_steps or not plan.steps_per_epoch:
        return plan
    tokens = sum(min(length, plan.seq_len) for length in lengths) * plan.total_steps / plan.steps_per_epoch
    known = known_speed(config.model, plan)
    if known is None:
        plan.reasons["time"] = (f"{tokens:,.0f} tokens to train; how long: measured from the first steps (no run "
                                "of this model trained this way here yet)")
        return plan
    plan.estimated_s = tokens / known["tokens_per_s"]
    plan.reasons["time"] = (f"about {format_duration(plan.estimated_s)}: {tokens:,.0f} tokens at "
                            f"{known['tokens_per_s']:,.0f} tokens/s, the speed of run {known['run']} here")
    return plan


def _packed_rows_reason(config: TrainConfig, fit: Fit) -> str:
    micro, seq = fit.micro_batch, fit.seq_len
    why = ("set by you" if config.micro_batch else "the longest row planned" if micro == MICRO_BATCHES[0]
           or micro * seq >= TARGET_TOKENS_PER_STEP else "the longest row that fits")
    return f"packed row{'s' * (micro != 1)} of {seq:,} tokens ({micro * seq:,} tokens a pass): {why}"


def validate_config(config: TrainConfig) -> None:
    """Raise ConfigError for a setting no plan can honour."""
    preference = config.method in PREFERENCE_METHODS
    checks = [
        (config.method in METHOD_CHOICES, f"--method {config.method}: choose one of {', '.join(METHOD_CHOICES)}"),
        (0 < config.beta <= 100, "--beta must be above 0 (0.1 is usual) and at most 100"),
        (preference or not config.start_from, "--from starts a dpo or orpo run from a run's adapter: add --method "
                                              "dpo or orpo"),
        (not preference or config.gpus * config.nodes == 1,
         f"--method {config.method} trains in one process for now: drop --gpus/--nodes"),
        (config.rank is None or config.rank >= 1, "--rank must be at least 1"),
        (config.seq_len is None or config.seq_len >= SEQ_LEN_LEAST, f"--seq-len must be at least {SEQ_LEN_LEAST}"),
        (config.micro_batch is None or config.micro_batch >= 1, "--batch must be at least 1"),
        (config.grad_accum is None or config.grad_accum >= 1, "--grad-accum must be at least 1"),
        (config.max_steps is None or config.max_steps >= 1, "--max-steps must be at least 1"),
        (config.epochs > 0, "--epochs must be above 0"),
        (0 < config.lr < 1, "--lr must be between 0 and 1, e.g. 2e-4"),
        (config.val_split is None or 0 <= config.val_split <= 50, "--eval-split is a percentage from 0 to 50"),
        (0 <= config.warmup_ratio < 1, "warmup ratio must be from 0 to below 1"),
        (config.max_grad_norm > 0, "max grad norm must be above 0"),
        (0 <= config.lora_dropout < 1, "LoRA dropout must be from 0 to below 1"),
        (config.gpus >= 1, "--gpus must be at least 1"),
        (config.threads is None or 1 <= config.threads <= 1024, "--threads must be between 1 and 1024"),
        (config.early_stop in ("off", "warn", "stop"), f"--early-stop {config.early_stop!r}: use off, warn or stop"),
        (1 <= config.patience <= 100, "--patience must be between 1 and 100 evals"),
        (config.nodes >= 1, "--nodes must be at least 1"),
        (0 <= config.node_rank < config.nodes, f"--node-rank {config.node_rank}: from 0 to {config.nodes - 1} "
                                                f"with --nodes {config.nodes}"),
        (config.nodes == 1 or config.master_addr, "--nodes: add --master-addr, the address of the machine with "
                                                  "--node-rank 0"),
        (config.strategy in STRATEGIES, f"--strategy {config.strategy}: choose one of {', '.join(STRATEGIES)}"),
        (config.strategy == "auto" or config.gpus * config.nodes > 1,
         f"--strategy {config.strategy} is for several GPUs: add --gpus 2 or more"),
        (config.strategy != "fsdp" or config.quantize != "none", "--strategy fsdp shards the 4-bit base (FSDP-QLoRA): "
                                                                 "drop --quantize none, or use --strategy ddp"),
        (config.mlp_tile == 0 or config.mlp_tile >= 16, "--mlp-tile is tokens per tile: 0 (off) or at least 16"),
        (config.layer_tile == 0 or config.layer_tile >= 16, "--layer-tile is tokens per tile: 0 (off) or at least 16"),
        (config.grad_checkpointing is not False or not (config.offload_checkpoints or config.layer_tile),
         "--offload-checkpoints and --layer-tile are ways of checkpointing: drop --no-grad-checkpointing"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


# -- helpers ----------------------------------------------------------------------------------
def _choose_base(request: FitRequest) -> tuple[Fit, str, dict[str, str]]:
    """The fit and the base's storage: unquantised when asked, or (auto) when it fits with the same
    context, rank, checkpointing and batch as 4-bit and leaves room (dequantising NF4 weights at
    every matmul costs time: on a CPU most of the step); 4-bit (QLoRA) otherwise."""
    config, dtype = request.config, request.dtype
    if config.quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"--quantize {config.quantize}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    unquantised = replace(request, quantize="none")
    if config.quantize == "none":
        try:
            fit, reasons = choose_fit(unquantised)
        except PlanError as error:
            raise PlanError(f"{error}; or keep the base in 4 bits (--quantize 4bit or auto)") from None
        return fit, "none", {**reasons, "quantize": f"unquantised ({_dtype_name(dtype)}): set by you"}
    four, four_reasons = four_bit_fit(request)
    if config.quantize == "4bit":
        return four, "4bit", {**four_reasons, "quantize": "4-bit NF4 (QLoRA): set by you"}
    if four.shards > 1:
        return four, "4bit", {**four_reasons, "quantize": "4-bit NF4 (QLoRA): FSDP shards the 4-bit base"}
    usable = request.budget.usable_bytes
    try:
        plain, plain_reasons = choose_fit(unquantised)
    except PlanError:
        plain = None
    same = plain is not None and (plain.seq_len, plain.rank, plain.saving, plain.micro_batch) == \
        (four.seq_len, four.rank, four.saving, four.micro_batch)
    if same and plain.estimate.peak <= UNQUANTISED_ROOM * usable:
        return plain, "none", {**plain_reasons, "quantize": (
            f"unquantised ({_dtype_name(dtype)}): fits in {gib(plain.estimate.peak)} of {gib(usable)}, "
            "and skips dequantising 4-bit weights at every matmul")}
    why = ("would not fit" if plain is None else
           f"would need {gib(plain.estimate.peak)}, more than {UNQUANTISED_ROOM:.0%} of {gib(usable)}"
           if same else "would need a shorter context, lower rank or checkpointing")
    return four, "4bit", {**four_reasons, "quantize": f"4-bit NF4 (QLoRA): unquantised weights {why}"}


def _capability(card: Card | None, device: str) -> tuple[int, int] | None:
    """The card's compute capability; a CUDA plan for a card of unknown kind assumes Ampere, as
    its precision does (precision_for)."""
    if card is not None:
        return card.capability
    return ASSUMED_CAPABILITY if device == "cuda" else None


def _dtype_name(dtype: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)


def _packs(config: TrainConfig, facts: ArchFacts | None) -> bool:
    """Whether the rows will be packed (the batching is chosen after the fit, from the fit's length)."""
    return not (config.packing is False or packing_support(facts, 1))


def _rows_attention(config: TrainConfig, facts: ArchFacts | None, device: str, card: Card | None) -> str:
    """The attention the rows would use, for the estimate (packed paths and eager have costs of
    their own); "" when the choice is refused (refused again, with its reason, once the batching
    is chosen)."""
    try:
        return choose_attention(_packs(config, facts), device, _capability(card, device), config.attention,
                                bool(facts and facts.attention_softcap))[0]
    except ConfigError:
        return ""


def _choose_batching(config: TrainConfig, facts: ArchFacts | None, seq_len: int) -> tuple[str, str]:
    """(batching, why): packed where the model's attention allows and the user did not say no."""
    why_not = packing_support(facts, seq_len)
    if config.packing is False:
        return "grouped", "padded batches of similar lengths: packing turned off by you"
    if why_not:
        if config.packing:
            raise ConfigError(f"--packing is not available for this model: {why_not}; leave it off")
        return "grouped", f"padded batches of similar lengths: {why_not}"
    return "packed", "packed: several examples per row, no padding tokens"
