"""The card catalogue, planning for a named card, precision by compute capability, and a budget
that leaves other programs' GPU memory alone. No GPU exists here: NVML's readings are faked where
a test needs a card, and say so."""

import json
import re
import subprocess
import sys

import pytest

from app.cli import main
from app.core.errors import ConfigError
from app.core.plan.cards import card_catalog, find_card, match_card, precision_for
from app.core.units import GIB

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
ISSUE_CARDS = ["RTX 2060", "RTX 2070", "RTX 2080", "RTX 2080 Ti", "RTX 3060", "RTX 3070", "RTX 3080",
               "RTX 3080 12GB", "RTX 3090", "RTX 4060 Ti", "RTX 4060 Ti 16GB", "RTX 4070", "RTX 4070 Ti", "RTX 4080",
               "RTX 4090", "RTX 5070", "RTX 5080", "RTX 5090", "T4", "V100", "A10", "L4", "A100 40GB",
               "A100 80GB", "H100", "H200"]


def plan_json(capsys, *args) -> dict:
    assert main(["plan", "--model", LLAMA_8B, "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_catalogue_has_every_card_the_issue_names_with_consistent_facts():
    for name in ISSUE_CARDS:
        assert find_card(name) is not None
    for card in card_catalog():
        assert card.bf16 == (card.capability >= (8, 0)), card.name
        assert not card.flash_attention_2 or card.capability >= (8, 0), card.name
        assert 5 * GIB < card.memory_bytes < 150 * GIB, card.name
    assert find_card("RTX 3060").memory_bytes == 12 * 1024 ** 3
    assert find_card("rtx4090").capability == (8, 9)
    assert find_card("RTX 4060 Ti").memory_bytes == 8188 * 2**20  # the 8 GB one the preset table names
    assert find_card("RTX 4060 Ti 16GB").memory_bytes == 16380 * 2**20


def test_driver_names_match_catalogue_rows():
    assert match_card("NVIDIA GeForce RTX 4090").name == "RTX 4090"
    assert match_card("Tesla T4").name == "Tesla T4"
    assert match_card("NVIDIA A100-SXM4-80GB").name == "A100 80GB"
    assert match_card("NVIDIA H100 80GB HBM3").name == "H100"
    assert match_card("NVIDIA GeForce RTX 3080 Ti").name == "RTX 3080 12GB"
    assert match_card("Some Other Card") is None


def test_precision_follows_the_card():
    assert precision_for(find_card("RTX 4090"))[0] == "bfloat16"
    dtype, reason = precision_for(find_card("RTX 2080 Ti"))
    assert dtype == "float16" and "gradient scaler" in reason
    with pytest.raises(ConfigError, match="GTX 1080 Ti.*6.1.*too old.*7.0"):
        precision_for(find_card("GTX 1080 Ti"))


def test_plan_for_a_2080_ti_uses_fp16_and_no_flash_attention(capsys):
    out = plan_json(capsys, "--gpu", "RTX 2080 Ti")
    plan = out["plan"]
    assert plan["compute_dtype"] == "float16" and "no bf16" in plan["reasons"]["compute_dtype"]
    assert plan["attention"] not in ("flash_attention_2", "tunesmith_packed_flash")
    assert "compute capability 8.0+" in plan["reasons"]["attention"]
    assert plan["gpu"] == "RTX 2080 Ti" and plan["gpu_capability"] == "7.5"
    assert out["budget"]["total_bytes"] == 11 * GIB  # the card's memory, not this machine's
    assert out["gpu"]["name"] == "RTX 2080 Ti"


def test_plan_for_a_4090_uses_bf16(capsys):
    plan = plan_json(capsys, "--gpu", "RTX 4090")["plan"]
    assert plan["compute_dtype"] == "bfloat16" and plan["optimizer"] == "paged_adamw_8bit"
    assert plan["attention"] != "tunesmith_packed_masked"  # Ada runs a varlen flash kernel


def test_an_unknown_card_exits_2_with_the_closest_names(capsys):
    assert main(["plan", "--model", LLAMA_8B, "--gpu", "RTX 4900"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and '"RTX 4090"' in err and "no card called" in err


def test_a_card_too_old_and_a_kernel_it_cannot_run_are_refused(capsys):
    assert main(["plan", "--model", LLAMA_8B, "--gpu", "P40"]) == 2
    assert "too old" in capsys.readouterr().err
    assert main(["plan", "--model", LLAMA_8B, "--gpu", "RTX 2080 Ti", "--attention", "flash"]) == 2
    assert "compute capability 8.0+" in capsys.readouterr().err
    assert main(["plan", "--model", LLAMA_8B, "--loss-kernel", "cce"]) == 2  # no CUDA here
    assert "--loss-kernel cce cannot run here" in capsys.readouterr().err


def test_kernel_overrides_are_kept(capsys):
    plan = plan_json(capsys, "--gpu", "RTX 4090", "--attention", "varlen", "--loss-kernel", "chunked")["plan"]
    assert plan["attention"] == "tunesmith_packed_loop" and "set by you" in plan["reasons"]["attention"]
    assert plan["loss"] == "chunked" and "set by you" in plan["reasons"]["loss"]


def test_gpu_list_prints_every_card(capsys):
    assert main(["gpu", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(card.name in out for card in card_catalog())


def test_plan_for_a_catalogued_model_does_not_import_torch():
    """`tunesmith plan` must answer in under a second on a machine without a GPU, where importing
    torch alone takes one to several seconds."""
    code = ("import sys; from app.cli import main; "
            f"rc = main(['plan', '--model', '{LLAMA_8B}', '--preset', '24gb']); "
            "rc2 = main(['plan', '--model', 'Qwen/Qwen2.5-0.5B-Instruct', '--gpu', 'RTX 3060']); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc, rc2)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("NO-TORCH 0 0")


def test_the_budget_on_this_card_leaves_other_programs_memory_alone(monkeypatch):
    """NVML cannot exist here: its reading of a 24 GiB card with 3 GiB used by others is faked."""
    from app.core import host
    from app.core.plan import presets
    from app.gpu import nvml

    class Use:
        total_bytes, used_bytes, ours_bytes, others_bytes = 24 * GIB, 3 * GIB, 0, 3 * GIB
        per_process, note = True, ""

    monkeypatch.setattr(host, "local_device", lambda: "cuda")
    monkeypatch.setattr(presets, "detected_card", lambda index=0: find_card("RTX 4090"))
    monkeypatch.setattr(nvml, "memory_use", lambda index=0, pid=None: Use())
    monkeypatch.setattr(nvml, "detect_gpus", lambda: nvml.GpuReport(False, None, []))
    auto = presets.resolve_budget(presets.get_preset("auto"))
    assert auto.usable_bytes == 21 * GIB - 1 * GIB  # total - others - the auto margin
    assert "3.0 GiB used by other programs" in auto.source and auto.card.name == "RTX 4090"
    preset = presets.resolve_budget(presets.get_preset("16gb"))
    assert preset.usable_bytes == 16 * GIB - 1 * GIB  # the preset fits in what is free
    big = presets.resolve_budget(presets.get_preset("24gb"))
    assert big.usable_bytes == int(21 * GIB - 1.5 * GIB) and "more than is free" in big.source


def test_a_counterfactual_in_a_reason_is_the_estimators_own_figure_for_that_setting(capsys):
    fixed = ["--gpu", "RTX 4090", "--batch", "2", "--seq-len", "2048", "--rank", "16"]
    reason = plan_json(capsys, *fixed)["plan"]["reasons"]["grad_checkpointing"]
    without = re.search(r"without it the peak would be ([\d.]+ GiB)", reason)[1]
    assert main(["plan", "--model", LLAMA_8B, *fixed, "--no-grad-checkpointing"]) == 2
    error = capsys.readouterr().err
    assert f"the settings you fixed need at least {without} " in error
    assert "--batch 1" in error and "--grad-checkpointing" in error  # neither was given: both are ways out
    assert main(["plan", "--model", LLAMA_8B, *fixed[:2], "--batch", "1", "--seq-len", "65536",
                 "--no-grad-checkpointing", "--rank", "16"]) == 2
    error = capsys.readouterr().err
    assert "--batch 1" not in error.split("try ")[1]  # never suggests what was already given
