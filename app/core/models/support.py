"""What a model's architecture lets Tunesmith do, from config.json alone: packed rows (several
examples in one row, kept apart by the attention), the fused loss (the lm_head and the loss
together, without the full logits), and GGUF export (the architectures llama.cpp reads as we write
them). The planner chooses with these and says before training what will not export; the kernels
are in train/memory_savers/, the GGUF writer in export/."""

from __future__ import annotations

from app.core.models.architecture import ArchFacts

# Families whose attention is causal self-attention with rotary positions and whose logits are
# lm_head(hidden) with no scaling or soft-capping: checked against transformers' modelling code.
PLAIN_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3"}


def packing_support(facts: ArchFacts | None, seq_len: int) -> str:
    """"" when packed rows train correctly for this model, else the reason they do not."""
    if facts is None or facts.model_type not in PLAIN_FAMILIES:
        family = facts.model_type if facts and facts.model_type else "this model's"
        return f"{family} attention is not known to keep packed examples apart"
    if facts.sliding_window and facts.sliding_window < seq_len:
        return f"its sliding attention window ({facts.sliding_window}) is shorter than the sequence"
    return ""


def fused_loss_support(facts: ArchFacts | None) -> str:
    """"" when the loss can be computed from the hidden states and a plain lm_head."""
    if facts is None or facts.model_type not in PLAIN_FAMILIES:
        family = facts.model_type if facts and facts.model_type else "this model"
        return f"{family} may scale or soft-cap its logits"
    return ""


# The GGUF writer's architectures (export/gguf_arch.py maps their tensors): HF class -> llama.cpp's name
GGUF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                      "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3",
                      "Phi3ForCausalLM": "phi3", "Olmo2ForCausalLM": "olmo2", "MixtralForCausalLM": "llama",
                      "Qwen2MoeForCausalLM": "qwen2moe", "Qwen3MoeForCausalLM": "qwen3moe"}
_BY_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
            "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "mixtral": "MixtralForCausalLM",
            "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# llama.cpp renormalises the chosen experts' weights for Mixtral and Qwen3-MoE, never for Qwen2-MoE
_NORM_TOP_K = {"MixtralForCausalLM": None, "Qwen2MoeForCausalLM": False, "Qwen3MoeForCausalLM": True}


def gguf_problem(config: dict) -> str:
    """Why a model with this config.json cannot be exported to GGUF ("" when it can): said in the
    plan, before training, as well as by the export."""
    declared = declared_architecture(config)
    if declared in GGUF_ARCHITECTURES:
        return _moe_problem(config, declared)
    shown = declared or config.get("model_type") or "unknown"
    return (f"GGUF export does not support the architecture {shown}; supported: {', '.join(GGUF_ARCHITECTURES)} "
            "(SmolLM is LlamaForCausalLM)")


def declared_architecture(config: dict) -> str:
    return (config.get("architectures") or [_BY_TYPE.get(config.get("model_type"), "")])[0]


def _moe_problem(config: dict, declared: str) -> str:
    """What of an MoE model llama.cpp would compute differently ("" when nothing)."""
    if not experts(config):
        return ""
    if int(config.get("decoder_sparse_step") or 1) != 1 or config.get("mlp_only_layers"):
        return (f"GGUF export of {declared} needs experts in every layer; this config has dense layers "
                "(decoder_sparse_step, mlp_only_layers), which llama.cpp does not read")
    want = _NORM_TOP_K.get(declared)
    if want is not None and bool(config.get("norm_topk_prob", False)) != want:
        return (f"GGUF export of {declared} needs norm_topk_prob {str(want).lower()} (llama.cpp "
                f"{'renormalises' if want else 'does not renormalise'} the chosen experts' weights)")
    return ""


def experts(config: dict) -> int:
    return int(config.get("num_local_experts") or config.get("num_experts") or 0)
