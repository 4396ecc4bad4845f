"""Architecture facts from config.json alone: shapes and parameter counts by part, no weights.

Covers the Llama, Mistral, Qwen2/Qwen3 (and their MoE variants), Gemma 2/3, Phi-3 and SmolLM
families: anything with the standard decoder layout of q/k/v/o attention (grouped-query where
num_key_value_heads < num_attention_heads) and a gated MLP (gate, up, down), or MoE experts.
The memory estimator and planner work from these facts before a download.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Families whose q/k/v projections carry a bias vector.
QKV_BIAS_TYPES = {"qwen2", "qwen2_moe"}
# Families with extra per-head norms on q and k.
QK_NORM_TYPES = {"qwen3", "qwen3_moe", "gemma3", "gemma3_text", "olmo2"}
# Families with four norms per layer (pre and post, attention and MLP).
FOUR_NORM_TYPES = {"gemma2", "gemma3", "gemma3_text"}
# one Linear for q, k and v, and one for gate and up: LoRA (and its dropout) sees each input once
FUSED_PROJECTION_TYPES = {"phi3"}


@dataclass(frozen=True)
class ArchFacts:
    """Shapes and parameter counts of a decoder-only model."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    tied_embeddings: bool
    experts: int  # 0 for a dense MLP
    experts_per_token: int
    # parameter counts by part
    embedding_params: int
    attention_params: int  # all layers
    mlp_params: int  # all layers (all experts and routers for MoE)
    norm_params: int
    lm_head_params: int  # 0 when tied to the embeddings
    sliding_window: int = 0  # attention window in tokens, 0 when attention sees the whole sequence
    logit_softcap: bool = False  # logits pass through cap * tanh(x / cap) (Gemma 2)
    attention_softcap: bool = False  # attention scores soft-capped too: SDPA cannot run it (Gemma 2)

    @property
    def total_params(self) -> int:
        return (self.embedding_params + self.attention_params + self.mlp_params + self.norm_params
                + self.lm_head_params)

    @property
    def linear_params(self) -> int:
        """Parameters in the blocks' linear layers: what QLoRA stores in 4 bits."""
        return self.attention_params + self.mlp_params - self._bias_params

    @property
    def _bias_params(self) -> int:
        if self.model_type in QKV_BIAS_TYPES:
            return self.layers * (self.heads + 2 * self.kv_heads) * self.head_dim
        return 0

    def to_dict(self) -> dict:
        return {**asdict(self), "total_params": self.total_params}


def arch_facts(config: dict) -> ArchFacts:
    """Facts of the model described by `config` (a parsed config.json). Raises KeyError/ValueError
    when a required field is missing."""
    config = {**config, **(config.get("text_config") or {})}  # multimodal wrappers (Gemma 3)
    model_type = config.get("model_type", "")
    hidden = int(config["hidden_size"])
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    vocab = int(config["vocab_size"])
    intermediate = int(config.get("intermediate_size") or 4 * hidden)
    tied = bool(config.get("tie_word_embeddings", model_type.startswith("gemma")))

    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    attention = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    if model_type in QKV_BIAS_TYPES or config.get("attention_bias"):
        attention += q_out + 2 * kv_out
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    per_token = int(config.get("num_experts_per_tok") or 0)
    if experts:
        expert_inter = int(config.get("moe_intermediate_size") or intermediate)
        mlp = experts * 3 * hidden * expert_inter + hidden * experts  # experts + router
        shared = int(config.get("shared_expert_intermediate_size") or 0)
        if shared:
            mlp += 3 * hidden * shared + hidden  # shared expert and its gate
    else:
        mlp = 3 * hidden * intermediate
    norms_per_layer = (4 if model_type in FOUR_NORM_TYPES else 2) * hidden
    if model_type in QK_NORM_TYPES:
        norms_per_layer += 2 * head_dim
    return ArchFacts(
        model_type=model_type, layers=layers, hidden=hidden, intermediate=intermediate, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, vocab=vocab,
        max_positions=int(config.get("max_position_embeddings") or 2048), tied_embeddings=tied,
        experts=experts, experts_per_token=per_token,
        embedding_params=vocab * hidden, attention_params=layers * attention, mlp_params=layers * mlp,
        norm_params=layers * norms_per_layer + hidden, lm_head_params=0 if tied else vocab * hidden,
        sliding_window=int(config.get("sliding_window") or 0) if config.get("use_sliding_window", True) else 0,
        logit_softcap=bool(config.get("final_logit_softcapping")),
        attention_softcap=bool(config.get("attn_logit_softcapping")))
