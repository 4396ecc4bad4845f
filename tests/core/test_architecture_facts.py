"""Parameter counts from config.json alone match the real models, family by family.

Tiny random models of each family are built from their configs (no download) and their real
parameter count is compared with `arch_facts`; the demo model is checked against its weights.
"""

from __future__ import annotations

import json

import pytest

from app.core.models.architecture import arch_facts

SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "llama-tied": dict(model_type="llama", tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False),
    "qwen3": dict(model_type="qwen3", head_dim=32, tie_word_embeddings=True),
    "gemma2": dict(model_type="gemma2", head_dim=24),
    "gemma3_text": dict(model_type="gemma3_text", head_dim=24),
    "phi3": dict(model_type="phi3", num_key_value_heads=4, tie_word_embeddings=False, pad_token_id=0),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, tie_word_embeddings=False),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_counts_match_a_real_model_of_the_family(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {**SMALL, **FAMILIES[family]}
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    model = AutoModelForCausalLM.from_config(config)
    real = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    facts = arch_facts(json.loads(config.to_json_string()))
    assert facts.total_params == real
    assert facts.layers == 2 and facts.vocab == 320


def test_demo_model_count_equals_its_weights(demo_model_path):
    from app.core.models.files import inspect_folder

    config = json.loads((demo_model_path / "config.json").read_text())
    facts = arch_facts(config)
    assert facts.total_params == inspect_folder(demo_model_path).parameters == 134_515_008
    assert (facts.heads, facts.kv_heads, facts.head_dim, facts.tied_embeddings) == (9, 3, 64, True)
    assert facts.linear_params == 30 * (576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536)
