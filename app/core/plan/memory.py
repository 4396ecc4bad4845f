"""The memory estimator: predicted peak bytes of a QLoRA training step, by component.

`estimate_memory(facts, setup)` works from config.json facts alone (no weights) and answers with
a `MemoryEstimate` whose parts add up to the predicted peak. Every constant below says where it
comes from. "Measured" means `benchmarks/memory_calibration.py`: allocator events of a real
QLoRA step (bitsandbytes NF4, PEFT LoRA on all linear layers, SDPA attention) recorded by the
torch profiler on CPU, the same bookkeeping as `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from app.core.models.architecture import (
    FOUR_NORM_TYPES,
    FUSED_PROJECTION_TYPES,
    QK_NORM_TYPES,
    ArchFacts,
)
from app.core.plan.kernel_choice import FLASH, PACKED_MASKED, chunk_rows
from app.core.plan.memory_constants import (
    NF4_BYTES_PER_PARAM, LORA_BYTES_PER_PARAM, OPTIMIZER_BYTES_PER_PARAM, DTYPE_BYTES, ACTIVATION_COEFFICIENTS,
    ACTIVATION_MARGIN, LOGITS_BYTES, SOFTCAP_LOGITS_COPIES, EXTRA_NORM_BYTES, FUSED_LOSS_CHUNKS,
    FUSED_LOSS_HIDDEN_COPIES, REPEATING_ATTENTION, EAGER_SOFTMAX_BYTES, RECOMPUTE_FACTOR, DEQUANTISED_COPIES,
    CUDA_CONTEXT_BYTES, ALLOCATOR_SLACK, CPU_HEAP_FLOOR, CPU_HEAP_LAYERS, CPU_HEAP_PER_PASS, CPU_HEAP_PASSES,
    FSDP_GATHERED_LAYERS,
)



@dataclass(frozen=True)
class MemorySetup:
    """The settings that decide memory, besides the model."""

    rank: int = 16
    seq_len: int = 1024
    micro_batch: int = 1
    grad_checkpointing: bool = False
    mlp_tile: int = 0  # tokens per MLP tile (train/memory_savers/tiled_mlp.py), 0: the MLP over the whole sequence
    offload_checkpoints: bool = False  # checkpointed layers' inputs in host RAM (train/memory_savers/offload.py; CUDA only)
    layer_tile: int = 0  # tokens per tile of the checkpointed layers (train/memory_savers/tiled_layer.py), 0: untiled
    shards: int = 1  # FSDP: weights, LoRA and optimizer state sharded over this many cards (1: not sharded)
    offload_params: bool = False  # FSDP's CPU offload: those shards in host RAM, gathered to the card when used
    compute_dtype: str = "bfloat16"
    optimizer: str = "paged_adamw_8bit"
    device: str = "cuda"
    lora_dropout: bool = True
    loss: str = "plain"  # "plain": full fp32 logits; "chunked", "cce", "liger": fused, see memory_savers/fused_loss.py
    attention: str = ""  # kernel_choice's name: repeated kv heads, the block-diagonal mask, eager's softmax
    quantize: str = "4bit"  # "4bit": NF4 base (QLoRA); "none": the base in the compute dtype (LoRA)
    process_baseline: int = 0  # CPU: this process's resident RAM when planned (0: not counted)
    passes: int = 1  # micro-batches of a step in this process (accumulation): the CPU heap grows with them


def heap_passes(passes: int) -> float:
    """How much more the CPU heap keeps with `passes` micro-batches a step than with one."""
    return 1 + CPU_HEAP_PER_PASS * (min(max(1, passes), CPU_HEAP_PASSES) - 1)


def with_passes(estimate: "MemoryEstimate", device: str, passes: int) -> "MemoryEstimate":
    """`estimate` (made for one micro-batch a step) for a step of `passes` micro-batches: on the CPU
    the heap beyond the tensors grows with them (the fit chooses the micro-batch before the
    accumulation is known); on CUDA nothing changes."""
    if device != "cpu" or passes <= 1 or not estimate.process_baseline:
        return estimate
    grows = estimate.runtime_overhead - CPU_HEAP_FLOOR
    return replace(estimate, runtime_overhead=int(CPU_HEAP_FLOOR + grows * heap_passes(passes)))


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes by component; `peak` is their sum."""

    quantized_weights: int
    kept_weights: int
    lora_weights: int
    lora_gradients: int
    optimizer_state: int
    activations: int
    logits: int
    transient: int
    runtime_overhead: int
    lora_params: int
    host_offload: int = 0  # offloaded checkpoints: bytes in host RAM, not on the card (not in `peak`)
    gathered: int = 0  # FSDP: weights gathered whole from the other cards while they are used
    process_baseline: int = 0  # CPU: the process when planned (libraries, window, data), measured

    @property
    def peak(self) -> int:
        return (self.quantized_weights + self.kept_weights + self.lora_weights + self.lora_gradients
                + self.optimizer_state + self.activations + self.logits + self.transient
                + self.runtime_overhead + self.gathered + self.process_baseline)

    def rows(self) -> list[tuple[str, int, str]]:
        """(component, bytes, what it is) for tables and the GUI's breakdown (FSDP's row only when sharded)."""
        return [(label, getattr(self, name), what.format(lora_params=self.lora_params))
                for name, label, what in COMPONENTS if name not in ("gathered", "process_baseline")
                or getattr(self, name)]

    def to_dict(self) -> dict:
        """Bytes by component name, the peak, and the LoRA parameter count."""
        return {name: getattr(self, name) for name, _, _ in COMPONENTS} | {
            "peak": self.peak, "lora_params": self.lora_params, "host_offload": self.host_offload}


# (field, label, what it is): the order tables show the breakdown in
COMPONENTS = [
    ("quantized_weights", "base weights (4-bit)", "NF4 linear layers with double quantisation"),
    ("kept_weights", "base weights (kept)", "embeddings, lm_head, norms, MoE experts: not quantised"),
    ("lora_weights", "LoRA weights", "{lora_params:,} parameters in fp32"),
    ("lora_gradients", "LoRA gradients", "fp32, one per LoRA weight"),
    ("optimizer_state", "optimizer state", "AdamW moments of the LoRA weights"),
    ("activations", "activations", "kept for backward, per layer x tokens"),
    ("logits", "logits and loss", "fp32 logits, softmax and gradient (one chunk at a time when fused)"),
    ("transient", "dequantised weights", "the largest layer unpacked for a matmul, beyond the loss phase"),
    ("runtime_overhead", "CUDA context, allocator", "outside PyTorch's tensors"),
    ("gathered", "gathered weights (FSDP)", "layers gathered whole from the other cards, and the lm_head"),
    ("process_baseline", "this program",
     "Python, torch, the libraries and the data: measured when planned, at least a training process's"),
]


def setup_for(plan, lora_dropout: bool = True) -> MemorySetup:
    """The MemorySetup of a Plan (which does not record the dropout; the planner assumes it on)."""
    return MemorySetup(rank=plan.rank, seq_len=plan.seq_len, micro_batch=plan.micro_batch,
                       grad_checkpointing=plan.grad_checkpointing, mlp_tile=getattr(plan, "mlp_tile", 0) or 0,
                       offload_checkpoints=bool(getattr(plan, "offload_checkpoints", False)),
                       layer_tile=getattr(plan, "layer_tile", 0) or 0,
                       compute_dtype=plan.compute_dtype,
                       optimizer=plan.optimizer, device=plan.device, lora_dropout=lora_dropout, loss=plan.loss,
                       attention=plan.attention, quantize=getattr(plan, "quantize", "4bit") or "4bit",
                       process_baseline=int((getattr(plan, "breakdown", None) or {}).get("process_baseline", 0)))


def lora_parameter_count(facts: ArchFacts, rank: int) -> int:
    """LoRA parameters on every linear layer of the blocks: r x (d_in + d_out) each.

    MoE experts are fused 3-D tensors in transformers 5, not Linear layers, so they get no LoRA."""
    q, kv, h = facts.heads * facts.head_dim, facts.kv_heads * facts.head_dim, facts.hidden
    per_layer = (h + q) + 2 * (h + kv) + (q + h)
    if not facts.experts:
        per_layer += 3 * (h + facts.intermediate)
    return rank * per_layer * facts.layers


def estimate_memory(facts: ArchFacts, setup: MemorySetup) -> MemoryEstimate:
    """Predicted peak memory of a training step of `facts`' model with `setup`."""
    element = DTYPE_BYTES.get(setup.compute_dtype, 2)
    quantized = facts.linear_params if setup.quantize == "4bit" else 0
    if facts.experts and quantized:  # experts stay 16-bit: bitsandbytes quantises Linear layers only
        quantized -= facts.mlp_params
    kept = facts.total_params - quantized
    lora = lora_parameter_count(facts, setup.rank)
    tokens = setup.seq_len * setup.micro_batch

    per_layer = _per_layer_bytes(facts, setup, element)
    logits = _loss_bytes(facts, setup, element, tokens)
    gpu = "cuda" if setup.device == "cuda" else "cpu"
    down, up_moment = _dequantised_moments(facts, setup, element, gpu, tokens)
    masks = tokens * (16 * -(-tokens // 16)) * element if setup.attention == PACKED_MASKED else 0
    per_layer_kept, one_tile = _tiled_mlp_terms(facts, setup, element, per_layer)
    if setup.grad_checkpointing and tiles_layers(facts, setup):
        in_tile = replace(setup, seq_len=setup.layer_tile)  # one tile's layer: its MLP over tiles or not
        tile_kept, mlp_tile = _tiled_mlp_terms(facts, in_tile, element, per_layer)
        per_layer_kept, attention_backward = _tiled_layer_bytes(facts, setup, element, gpu)
        # the attention core's backward and a tile's rerun come one after the other, not together
        one_tile = max(tokens * attention_backward, setup.micro_batch * setup.layer_tile * tile_kept + mlp_tile)
    if setup.grad_checkpointing:
        inputs, host = _checkpointed_inputs(facts, setup, tokens, element, gpu)
        layer = RECOMPUTE_FACTOR[gpu] * (tokens * per_layer_kept + one_tile)
        activations = inputs + masks + max(0.0, layer - logits)
        peak = max(logits, layer + down, layer + up_moment)  # beside one layer's recompute and backward
        transient = max(0.0, peak - max(logits, layer))
    else:
        host = 0
        activations = tokens * facts.layers * per_layer_kept + RECOMPUTE_FACTOR[gpu] * one_tile + masks
        transient = max(0.0, max(down, up_moment) - logits)  # never beside the loss phase
    gathered = _fsdp_gathered(facts, setup, quantized, lora, element) if setup.shards > 1 else 0
    varying = activations + logits + transient + gathered
    overhead = (CUDA_CONTEXT_BYTES + ALLOCATOR_SLACK * varying if setup.device == "cuda" else
                CPU_HEAP_FLOOR + CPU_HEAP_LAYERS * tokens * per_layer * heap_passes(setup.passes)
                if setup.process_baseline else 0)
    optimizer_state = lora * OPTIMIZER_BYTES_PER_PARAM.get(setup.optimizer, 8.0)
    static = {"quantized_weights": quantized * NF4_BYTES_PER_PARAM, "kept_weights": kept * element,
              "lora_weights": lora * LORA_BYTES_PER_PARAM, "lora_gradients": lora * LORA_BYTES_PER_PARAM,
              "optimizer_state": optimizer_state}
    if setup.offload_params:  # FSDP's CPU offload: every card's share in the one machine's RAM
        host += sum(static.values())
        static = dict.fromkeys(static, 0)
    share = max(1, setup.shards)  # FSDP: each card keeps its share of what is not per token
    return MemoryEstimate(
        **{name: int(value / share) for name, value in static.items()},
        activations=int(activations), logits=int(logits), transient=int(transient),
        runtime_overhead=int(overhead), lora_params=lora, host_offload=int(host), gathered=int(gathered),
        process_baseline=setup.process_baseline if setup.device != "cuda" else 0)


def _per_layer_bytes(facts: ArchFacts, setup: MemorySetup, element: int) -> float:
    """Activation bytes per token and layer kept for backward (without checkpointing): the
    layer's own, the repeated K/V heads where the attention repeats them, eager's scores."""
    per_layer = activation_bytes_per_token_layer(facts, element, setup.lora_dropout)
    if repeats_kv_heads(setup):
        per_layer += 2 * (facts.heads - facts.kv_heads) * facts.head_dim * element
    if setup.attention == "eager":
        score = EAGER_SOFTMAX_BYTES + (element if element < 4 else 0) + (element if facts.attention_softcap else 0)
        per_layer += (1 + ACTIVATION_MARGIN) * facts.heads * setup.seq_len * score
    return per_layer


def _loss_bytes(facts: ArchFacts, setup: MemorySetup, element: int, tokens: int) -> float:
    """The loss phase: the full fp32 logits (plain), or the fused loss's chunks and hidden copies."""
    if setup.loss == "plain":
        copies = SOFTCAP_LOGITS_COPIES * element if facts.logit_softcap else 0
        loss_fixed, loss_phase = 0.0, (LOGITS_BYTES + copies) * facts.vocab
    else:
        loss_fixed = FUSED_LOSS_CHUNKS * min(tokens, chunk_rows(facts.vocab)) * facts.vocab * 4
        loss_phase = FUSED_LOSS_HIDDEN_COPIES * facts.hidden * element
    return loss_fixed + tokens * loss_phase


def _dequantised_moments(facts: ArchFacts, setup: MemorySetup, element: int, gpu: str,
                         tokens: int) -> tuple[float, float]:
    """(bytes at the start of backward, bytes at the forward's MLP up-projection) of the 4-bit
    weight dequantised for a matmul; (0, 0) for an unquantised base.

    At the start of backward it is down_proj's, beside every activation (the loss phase is over).
    In the forward, the MLP's first matmul (Phi-3's fused gate_up is twice as wide) runs before the
    last layer's MLP activations exist, beside its own output (measured on a 1-layer Phi-3.5 shape,
    where that moment is the peak)."""
    width = max(facts.hidden, facts.heads * facts.head_dim)
    copies = DEQUANTISED_COPIES[gpu] * element if setup.quantize == "4bit" else 0
    fused = facts.model_type in FUSED_PROJECTION_TYPES
    down = copies * width * max(facts.intermediate, facts.hidden)
    up_width = facts.intermediate * (2 if fused else 1)
    up = copies * width * up_width
    mlp_tail = (1 + ACTIVATION_MARGIN) * ACTIVATION_COEFFICIENTS[(4 if element >= 4 else 2, setup.lora_dropout)][2] \
        * facts.intermediate  # per token: the last layer's MLP activations, not made yet
    up_moment = (up + tokens * (up_width * element - mlp_tail)) if copies else 0
    return down, up_moment


def _fsdp_gathered(facts: ArchFacts, setup: MemorySetup, quantized: int, lora: int, element: int) -> float:
    """Bytes a card holds gathered from the others under FSDP: FSDP_GATHERED_LAYERS layers whole
    (their 4-bit weights, 16-bit norms and fp32 LoRA weights; MoE experts stay 16-bit) and the
    lm_head for the loss (in the compute dtype). Both counted together: errs high."""
    layer = ((quantized * NF4_BYTES_PER_PARAM + (facts.total_params - quantized - 2 * facts.vocab * facts.hidden)
              * element) / facts.layers + lora * LORA_BYTES_PER_PARAM / facts.layers)
    return FSDP_GATHERED_LAYERS * max(0.0, layer) + facts.vocab * facts.hidden * element


def _checkpointed_inputs(facts: ArchFacts, setup: MemorySetup, tokens: int, element: int, gpu: str) -> tuple[int, int]:
    """(bytes on the card, bytes in host RAM) of the blocks' inputs checkpointing keeps. Offloaded,
    two layers' stay on the card at a time: the one being copied out in forward, the one copied
    back for its recompute in backward."""
    offloaded = setup.offload_checkpoints and gpu == "cuda"
    inputs = tokens * (min(facts.layers, 2) if offloaded else facts.layers) * 2 * facts.hidden * element
    return inputs, tokens * facts.layers * facts.hidden * element if offloaded else 0


def _tiled_mlp_terms(facts: ArchFacts, setup: MemorySetup, element: int, per_layer: float) -> tuple[float, float]:
    """(bytes a token keeps per layer, bytes of one MLP tile's rerun in backward). With the MLP over
    tiles a layer keeps no MLP intermediates (the coefficients' i term), only its input, and one
    tile's come back at a time in backward. The LoRA inputs of gate and up (h terms) are not taken
    off: the estimate errs high by them."""
    tile = setup.mlp_tile
    if not tile or facts.experts or tile >= setup.seq_len:
        return per_layer, 0.0
    per_i = ACTIVATION_COEFFICIENTS[(4 if element >= 4 else 2, setup.lora_dropout)][2]
    mlp = (1 + ACTIVATION_MARGIN) * per_i * facts.intermediate
    return per_layer - mlp, setup.micro_batch * tile * mlp


def tiles_layers(facts: ArchFacts, setup: MemorySetup) -> bool:
    """Whether `setup`'s checkpointed layers run over tiles (train/memory_savers/tiled_layer.py: dense layers,
    an attention function it can meet, a sequence longer than one tile)."""
    return bool(setup.layer_tile) and setup.layer_tile < setup.seq_len and not facts.experts \
        and setup.attention != "eager"


def _tiled_layer_bytes(facts: ArchFacts, setup: MemorySetup, element: int, gpu: str) -> tuple[float, float]:
    """(bytes per token a tiled layer's backward holds for the whole sequence throughout, bytes per
    token more while the attention core runs its backward).

    Throughout: the query, key and value, the attention output, its gradient (filled tile by tile)
    and the layer input's gradient. During the attention core's backward also the query, key and
    value gradients and the log-sum-exp; attention that repeats kv heads keeps the repeated key and
    value and makes their gradients (4 x (q - kv)); on CUDA flash-attn 2's backward accumulates the
    query gradient in fp32 and, for grouped kv heads, makes key/value gradients per query head
    before summing them (not yet measured on a GPU: counted). A tile's rerun (the caller's term)
    comes after the attention core's backward, not beside it. The layer's input and its output's
    gradient are the checkpointed inputs' term. Measured on the CPU (benchmarks/results/
    long_context-cpu.md: the demo's shape at 16,384 tokens in tiles of 1,024, 576 MiB a step, 665
    predicted; SmolLM2-1.7B's at 4,096 tokens in tiles of 512, 501 MiB, 588 predicted)."""
    q, kv = facts.heads * facts.head_dim, facts.kv_heads * facts.head_dim
    throughout = element * ((q + 2 * kv) + 2 * q + facts.hidden)
    attention = element * (q + 2 * kv) + 4 * facts.heads
    if repeats_kv_heads(setup):
        attention += 4 * (q - kv) * element
    if gpu == "cuda":
        attention += 4 * q + (2 * q * element if kv < q else 0)
    return (1 + ACTIVATION_MARGIN) * throughout, (1 + ACTIVATION_MARGIN) * attention


def repeats_kv_heads(setup: MemorySetup) -> bool:
    """Whether the attention of `setup` keeps key/value heads repeated for backward."""
    if setup.attention in REPEATING_ATTENTION:
        return True
    return setup.micro_batch > 1 and setup.attention != FLASH  # padded rows with a mask: SDPA repeats


def activation_bytes_per_token_layer(facts: ArchFacts, element: int, dropout: bool) -> float:
    """Bytes one token leaves behind in one decoder layer for backward (see the coefficients)."""
    per_h, per_kv, per_i = ACTIVATION_COEFFICIENTS[(4 if element >= 4 else 2, dropout)]
    if dropout and facts.model_type in FUSED_PROJECTION_TYPES:
        # dropout copies each LoRA input: 6 per layer of hidden width (q, k, v, o, gate, up), 3 when
        # q/k/v and gate/up are one Linear each
        plain_h = ACTIVATION_COEFFICIENTS[(4 if element >= 4 else 2, False)][0]
        per_h = plain_h + (per_h - plain_h) * 3 / 6
    kv = facts.kv_heads * facts.head_dim
    width = facts.experts_per_token * facts.intermediate if facts.experts else facts.intermediate
    extra_norm_width = 2 * facts.hidden if facts.model_type in FOUR_NORM_TYPES else 0
    if facts.model_type in QK_NORM_TYPES:
        extra_norm_width += facts.heads * facts.head_dim + kv
    # one q/k/v Linear: the value heads attention keeps are a view of its whole output, which
    # stays alive (query and key widths more than three separate projections keep)
    fused_view = (facts.heads * facts.head_dim + kv) * element if facts.model_type in FUSED_PROJECTION_TYPES else 0
    return (1 + ACTIVATION_MARGIN) * (per_h * facts.hidden + per_kv * kv + per_i * width
                                      + EXTRA_NORM_BYTES * extra_norm_width + fused_view)
