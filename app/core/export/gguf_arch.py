"""What llama.cpp needs to know of each architecture the GGUF writer supports: its name there,
how the Hugging Face tensor names map onto llama.cpp's, and the metadata beyond the common keys
(RoPE scaling, Gemma's soft-caps, Phi-3's long-context factors, MoE expert counts), as
`convert_hf_to_gguf.py` writes them, and which configurations llama.cpp would compute differently.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import gguf
import numpy as np

from app.core.errors import ExportError
from app.core.models.support import declared_architecture, experts


# Gemma's RMSNorm scales by (1 + weight); llama.cpp's by weight, so the files hold weight + 1
NORM_PLUS_ONE = {"gemma2", "gemma3"}

_BLOCK_PARTS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}
# per-head RMS norms on q and k (Qwen3), as llama.cpp's convert_hf_to_gguf.py names them
_QK_NORMS = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
# Gemma 2 and 3: a norm before and after both attention and the MLP
_GEMMA_PARTS = {**_BLOCK_PARTS, "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
# Phi-3: q, k and v in one matrix, gate and up in another (llama.cpp splits them as it runs)
_PHI3_PARTS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
# OLMo 2: norms after attention and the MLP only, q/k norms over all heads at once
_OLMO2_PARTS = {**{k: v for k, v in _BLOCK_PARTS.items() if "layernorm" not in k}, **_QK_NORMS,
                "post_attention_layernorm": "post_attention_norm", "post_feedforward_layernorm": "post_ffw_norm"}
ARCH_PARTS = {"llama": _BLOCK_PARTS, "qwen2": _BLOCK_PARTS, "qwen3": {**_BLOCK_PARTS, **_QK_NORMS},
              "gemma2": _GEMMA_PARTS, "gemma3": {**_GEMMA_PARTS, **_QK_NORMS}, "phi3": _PHI3_PARTS,
              "olmo2": _OLMO2_PARTS, "qwen2moe": _BLOCK_PARTS, "qwen3moe": {**_BLOCK_PARTS, **_QK_NORMS}}
# MoE: the router, an optional shared expert (Qwen2-MoE), and the experts' 2-D matrices, which are
# stacked into one 3-D tensor per layer as llama.cpp holds them
_ROUTER = {"block_sparse_moe.gate": "ffn_gate_inp", "mlp.gate": "ffn_gate_inp"}
_SHARED_EXPERT = {"mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
                  "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}
EXPERT_PARTS = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps",
                "gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
EXPERT_RE = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight")


def block_parts(config: dict, arch: str) -> dict[str, str]:
    """HF name within a block -> GGUF name, for every 2-D or 1-D tensor each block must have (the
    stacked experts are EXPERT_PARTS)."""
    parts = dict(ARCH_PARTS[arch])
    if experts(config):
        for dense in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            parts.pop(dense, None)
        router = "block_sparse_moe.gate" if declared_architecture(config) == "MixtralForCausalLM" else "mlp.gate"
        parts[router] = _ROUTER[router]
        if config.get("shared_expert_intermediate_size"):
            parts.update(_SHARED_EXPERT)
    return parts


def rope_parameters(config: dict) -> dict:
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope = dict(rope.get("full_attention") or rope)  # Gemma 3: the global layers' (llama.cpp fixes the local ones)
    rope.setdefault("rope_theta", config.get("rope_theta"))
    rope["rope_type"] = rope.get("rope_type", rope.get("type")) or "default"
    return rope


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    rope = rope_parameters(config)
    if rope["rope_type"].lower() != "llama3":
        return None
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / ((rope["rope_theta"] or 10000.0) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings") or config.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mixed = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mixed)).astype(np.float32)


def add_architecture(writer: gguf.GGUFWriter, config: dict, arch: str, where: Path) -> None:
    """The metadata of `arch` beyond the keys every architecture has; `where` names config.json in
    a refusal."""
    if arch in NORM_PLUS_ONE:
        add_gemma(writer, config)
    if arch == "llama":
        writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    if arch == "phi3":
        add_phi3(writer, config, rope_parameters(config))
    if experts(config):
        writer.add_expert_count(experts(config))
        writer.add_expert_used_count(int(config["num_experts_per_tok"]))
        if config.get("moe_intermediate_size"):
            writer.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
        if config.get("shared_expert_intermediate_size"):
            writer.add_expert_shared_feed_forward_length(int(config["shared_expert_intermediate_size"]))
    add_rope_scaling(writer, config, arch, where)


def add_gemma(writer: gguf.GGUFWriter, config: dict) -> None:
    """Gemma's extras, as convert_hf_to_gguf.py writes them: logit soft-caps and the sliding window."""
    if config.get("attn_logit_softcapping"):
        writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    if config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))


def add_phi3(writer: gguf.GGUFWriter, config: dict, rope: dict) -> None:
    """Phi-3's RoPE (rotary dimensions, the pre-training context, longrope's attention factor) and
    sliding window, as convert_hf_to_gguf.py writes them."""
    rotary = int(float(rope.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0)
                 * config["hidden_size"]) // config["num_attention_heads"]
    original = int(rope.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
                   or config["max_position_embeddings"])
    writer.add_rope_dimension_count(rotary)
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_sliding_window(int(config.get("sliding_window") or 0))
    scale = config["max_position_embeddings"] / original
    if rope["rope_type"] == "longrope":
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)


def add_rope_scaling(writer: gguf.GGUFWriter, config: dict, arch: str, where: Path) -> None:
    """RoPE scaling llama.cpp knows (linear, yarn; llama3 and longrope through their factor
    tensors); any other kind is refused naming `where`, since a wrong one is silently wrong."""
    rope = rope_parameters(config)
    kind = rope["rope_type"].lower()
    if kind in ("linear", "yarn") and rope.get("factor"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if kind == "yarn":
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind not in ("default", "llama3", "longrope") or (kind == "llama3" and arch != "llama") or (
            kind == "longrope" and arch != "phi3"):
        raise ExportError(f"{where}: RoPE scaling '{kind}' cannot be written to GGUF "
                          "for this model; only linear, yarn, llama3 (Llama) and longrope (Phi-3) scaling are supported")
