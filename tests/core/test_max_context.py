"""`tunesmith plan --max-context`: the longest sequence each rung of the long-context ladder fits,
by the planner's own estimator, within the card's budget and this machine's RAM."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from app.core.models.architecture import arch_facts
from app.core.models.catalog import find_in_catalog
from app.core.plan.context import STEP, best, longest_context
from app.core.plan.memory import MemorySetup, estimate_memory
from app.core.units import GIB

LLAMA_8B = arch_facts(find_in_catalog("Llama-3.1-8B-Instruct").config())
SETUP = MemorySetup(rank=16, compute_dtype="bfloat16", loss="chunked", device="cuda", optimizer="paged_adamw_8bit",
                    attention="tunesmith_packed_flash")


def test_each_rung_reaches_further_and_its_answer_is_the_longest_that_fits():
    usable = int(22.5 * GIB)
    rungs = longest_context(LLAMA_8B, SETUP, usable, host_free=64 * GIB)
    lengths = [r.seq_len for r in rungs]
    assert lengths == sorted(lengths) and lengths[0] > 0 and lengths[2] > 2 * lengths[0] and lengths[3] > 2 * lengths[2]
    for rung, adds in zip(rungs, ({}, {"offload_checkpoints": True}, {"offload_checkpoints": True, "mlp_tile": 4096},
                                  {"offload_checkpoints": True, "layer_tile": 2048}), strict=True):
        setup = replace(SETUP, grad_checkpointing=True, **adds)
        assert estimate_memory(LLAMA_8B, replace(setup, seq_len=rung.seq_len)).peak == rung.peak <= usable
        assert estimate_memory(LLAMA_8B, replace(setup, seq_len=rung.seq_len + STEP)).peak > usable
    assert rungs[0].host == 0 and rungs[1].host == 32 * rungs[1].seq_len * 4096 * 2


def test_offloading_stops_at_this_machines_ram_and_is_cuda_only():
    rungs = longest_context(LLAMA_8B, SETUP, int(22.5 * GIB), host_free=2 * GIB)
    assert rungs[1].note == "stopped by this machine's RAM" and rungs[1].host <= 2 * GIB
    assert rungs[1].seq_len == 8192  # 32 layers x 8,192 x 4,096 x 2 bytes = 2 GiB exactly
    cpu = longest_context(LLAMA_8B, replace(SETUP, device="cpu", compute_dtype="float32"), 64 * GIB, 64 * GIB)
    assert cpu[1].seq_len == 0 and cpu[1].note.startswith("CUDA only")
    assert cpu[3].seq_len > cpu[2].seq_len > cpu[0].seq_len and cpu[3].host == 0  # tiles count on the CPU too


def test_a_model_whose_own_context_fits_says_so():
    small = arch_facts(find_in_catalog("SmolLM2-135M-Instruct").config())
    rungs = longest_context(small, SETUP, 80 * GIB, 64 * GIB)
    assert rungs[-1].seq_len == small.max_positions and rungs[-1].note == "the model's own context"


@pytest.mark.parametrize("preset", ["24gb", "16gb"])
def test_the_cli_answers_with_the_rung_that_gets_there(preset, capsys, monkeypatch):
    from app import cli
    from app.core import host

    monkeypatch.setattr(host, "available_ram", lambda: 64 * GIB)  # not this machine's RAM: the test's
    assert cli.main(["plan", "--model", "Llama-3.1-8B-Instruct", "--preset", preset, "--max-context"]) == 0
    out = capsys.readouterr().out
    assert "RUNG" in out and "+ MLP tiles of 4,096" in out and "Longest: " in out
    assert cli.main(["plan", "--model", "Llama-3.1-8B-Instruct", "--preset", preset, "--max-context", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["longest"] == answer["rungs"][-1]["seq_len"] > answer["rungs"][0]["seq_len"]
    assert answer["rung"] == "+ layer tiles of 2,048" and answer["rungs"][-1]["peak"] <= answer["usable_bytes"]
    # the acceptance: 64k tokens on 24 GB, 32k on 16 GB, host RAM within the machine's
    assert answer["longest"] >= {"24gb": 65536, "16gb": 32768}[preset]
    assert answer["rungs"][-1]["host"] <= answer["host_free_bytes"]


def test_moe_models_get_no_layer_tiles():
    config = dict(find_in_catalog("Llama-3.1-8B-Instruct").config(), model_type="mixtral",
                  architectures=["MixtralForCausalLM"], num_local_experts=4, num_experts_per_tok=2,
                  intermediate_size=4096)
    rungs = longest_context(arch_facts(config), SETUP, 80 * GIB, host_free=256 * GIB)
    assert rungs[-1].seq_len == 0 and rungs[-1].note.startswith("not for this model")
    assert rungs[2].seq_len == rungs[1].seq_len > 0  # the tiled MLP leaves MoE blocks alone too
    assert best(rungs).name == "+ offloaded checkpoints"
