"""The catalogue's parameter counts hold against the published figures and real (meta) models."""

from __future__ import annotations

import shutil

import pytest

from app.core.errors import ModelError
from app.core.models.architecture import arch_facts
from app.core.models.catalog import catalog, find_in_catalog
from app.core.models.resolve import model_facts

ENTRIES = catalog()
REQUIRED = ["meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-70B-Instruct",
            "meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-3B-Instruct",
            "mistralai/Mistral-7B-Instruct-v0.3", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct",
            "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-14B-Instruct", "Qwen/Qwen2.5-32B-Instruct",
            "Qwen/Qwen3-8B", "google/gemma-2-9b-it", "microsoft/Phi-3.5-mini-instruct"]


def test_the_catalogue_has_the_models_users_ask_for():
    ids = {entry.id for entry in ENTRIES}
    assert set(REQUIRED) <= ids


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.id)
def test_count_within_one_percent_of_the_published_figure(entry):
    counted = arch_facts(entry.config()).total_params
    assert abs(counted - entry.published_params) <= 0.01 * entry.published_params, (counted, entry.published_params)


@pytest.mark.parametrize("entry", [e for e in ENTRIES if "70B" not in e.id and "32B" not in e.id],
                         ids=lambda e: e.id)
def test_count_equals_the_model_transformers_builds(entry):
    """Built on the meta device: shapes only, no memory, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**entry.config())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    real = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    assert arch_facts(entry.config()).total_params == real


def test_names_resolve_by_hub_id_or_short_name_in_any_case():
    assert find_in_catalog("meta-llama/Llama-3.1-8B-Instruct").id == "meta-llama/Llama-3.1-8B-Instruct"
    assert find_in_catalog("llama-3.1-8b-instruct").id == "meta-llama/Llama-3.1-8B-Instruct"
    assert find_in_catalog("no-such-model") is None
    facts = model_facts("Qwen2.5-7B-Instruct")
    assert facts.kind == "catalogue" and facts.arch.layers == 28


def test_a_folder_wins_over_the_catalogue(tmp_path):
    folder = tmp_path / "my-llama"
    folder.mkdir()
    shutil.copy(find_in_catalog("Llama-3.2-1B-Instruct").config_path, folder / "config.json")
    facts = model_facts(str(folder))
    assert facts.kind == "folder" and facts.config_path == folder / "config.json"


def test_an_unknown_model_lists_what_can_be_planned():
    with pytest.raises(ModelError, match="not in the catalogue.*Llama-3.1-8B-Instruct"):
        model_facts("someone/unknown-13b")


def test_a_folder_that_is_not_a_causal_lm_says_so(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    with pytest.raises(ModelError, match="config.json"):
        model_facts(str(tmp_path))
