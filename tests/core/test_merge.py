"""The streamed merge: tensor by tensor it writes what PEFT's merge_and_unload gives, shards and
indexes like save_pretrained, peaks at about one shard of RAM (measured in a child process), and
says why when an adapter or a base model needs the whole-model merge instead. The export checks
RAM before merging and says when the logit check had to be skipped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.errors import ExportError
from app.core.export import tensor_merge as merge
from app.core.export.exporter import ExportOptions, export_run

REPO = Path(__file__).resolve().parents[2]


def make_adapter(base: Path, out: Path, rslora: bool = False, seed: int = 1) -> Path:
    """A LoRA adapter on all linear layers with random (non-zero) A and B, saved by PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=rslora))
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data.normal_(0, 0.05)
    model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def read_all(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_the_streamed_merge_writes_what_peft_merges(tiny_model, tmp_path, rslora):
    import torch

    adapter = make_adapter(tiny_model, tmp_path / "adapter", rslora)
    plan = merge.plan_merge(tiny_model, adapter)
    assert len(plan.lora) == 2 * 7  # q, k, v, o, gate, up, down in both layers
    summary = merge.merge_shards(plan, tmp_path / "out", "f32")
    assert summary.files == ["model.safetensors"] and summary.merged_weights == 14
    ours, theirs = read_all(tmp_path / "out"), peft_merged(tiny_model, adapter)
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor, atol=1e-6), name
    changed = [n for n in ours if not torch.equal(ours[n], read_all(tiny_model)[n])]
    assert len(changed) == 14  # every adapted weight moved; nothing else did


def test_bf16_output_is_the_fp32_merge_rounded_once(tiny_model, tmp_path):
    import torch

    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    plan = merge.plan_merge(tiny_model, adapter)
    merge.merge_shards(plan, tmp_path / "bf16", "bf16")
    merge.merge_shards(plan, tmp_path / "f32", "f32")
    low, high = read_all(tmp_path / "bf16"), read_all(tmp_path / "f32")
    for name in high:
        assert low[name].dtype == torch.bfloat16 and torch.equal(low[name], high[name].to(torch.bfloat16)), name


def test_small_shards_get_an_index_and_load_in_transformers(tiny_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    plan = merge.plan_merge(tiny_model, adapter)
    out = tmp_path / "out"
    out.mkdir()
    summary = merge.merge_shards(plan, out, "f32", shard_bytes=60_000)
    merge.write_merged_config(tiny_model, out, "f32")
    shards = [f for f in summary.files if f.endswith(".safetensors")]
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not list(out.glob(".shard-*")), "temporary shard names are all renamed"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(plan.tensors) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == summary.bytes
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), adapter)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 30, 2]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)


def test_tied_embeddings_merge_and_load(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from tests.conftest import build_tiny_model

    base = build_tiny_model(tmp_path / "tied", tie=True)
    adapter = make_adapter(base, tmp_path / "adapter")
    out = tmp_path / "out"
    out.mkdir()
    merge.merge_shards(merge.plan_merge(base, adapter), out, "f32")
    merge.write_merged_config(base, out, "f32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    for name, tensor in peft_merged(base, adapter).items():
        assert torch.allclose(merged.state_dict()[name], tensor, atol=1e-6), name


@pytest.mark.parametrize("change, reason", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 8}}, "per-layer ranks"),
    ({"peft_type": "IA3"}, "IA3"),
])
def test_adapters_the_stream_cannot_merge_say_why(tiny_model, tmp_path, change, reason):
    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | change))
    with pytest.raises(merge.CannotStream, match=reason):
        merge.plan_merge(tiny_model, adapter)


def test_a_4bit_checkpoint_is_not_streamed(tiny_model, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    tensors = load_file(base / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"].to(
        __import__("torch").uint8)
    save_file(tensors, base / "model.safetensors")
    with pytest.raises(merge.CannotStream, match="U8"):
        merge.plan_merge(base, make_adapter(tiny_model, tmp_path / "adapter"))


def test_the_export_falls_back_to_the_whole_model_merge_and_still_matches(tiny_run, tmp_path, monkeypatch):
    """plan_merge is made to refuse (as it does for DoRA or pickle weights) to take the other path."""
    def refuse(*_):
        raise merge.CannotStream("the adapter uses DoRA")

    monkeypatch.setattr(merge, "plan_merge", refuse)
    messages = []
    result = export_run(tiny_run.run_id, "merged", tmp_path / "merged", ExportOptions(dtype="f32"), progress=messages.append)
    assert any("whole: the adapter uses DoRA" in m for m in messages)
    assert result.checks["max_logit_diff"] < 1e-4 and result.checks["top_token_agreement"] == 1.0


def test_an_export_that_does_not_fit_in_ram_is_refused_before_writing(tiny_run, tmp_path, monkeypatch):
    """available_ram is patched: this machine has RAM to spare, a user's may not."""
    monkeypatch.setattr("app.core.host.available_ram", lambda: 100 * 2**20)
    with pytest.raises(ExportError, match=r"needs about .* GiB of RAM \(merging tensor by tensor\) and 0.1 GiB"):
        export_run(tiny_run.run_id, "merged", tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))


def test_the_logit_check_is_skipped_with_its_reason_when_the_model_does_not_fit(tiny_run, tmp_path, monkeypatch):
    """available_ram is patched to 0.6 GiB: enough for the streamed merge, not for the check's
    whole model plus its 1 GiB margin."""
    monkeypatch.setattr("app.core.host.available_ram", lambda: int(0.6 * 2**30))
    result = export_run(tiny_run.run_id, "merged", tmp_path / "merged", ExportOptions(dtype="bf16"))
    assert result.checks["logit_check"].startswith("skipped: comparing with base + adapter loads the model whole")
    assert "max_logit_diff" not in result.checks
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "skipped" in card and "W + scale x B x A" in card


PEAK_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch, safetensors.torch  # imported before the baseline: what a merge needs anyway
from app.core.export import tensor_merge as merge

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
    return int(line.split()[1]) * 1024

base, adapter, out, shard = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
plan = merge.plan_merge(base, adapter)
Path("/proc/self/clear_refs").write_text("5")  # the kernel's peak (VmHWM) starts again from here
before = status("VmRSS:")
merge.merge_shards(plan, out, "f32", shard_bytes=shard)
print(json.dumps({"before": before, "peak": status("VmHWM:"), "bound": merge.merge_ram(plan, "f32", shard)}))
"""


def test_the_merge_peaks_near_one_shard_not_the_model(tmp_path):
    """A 0.45 GiB f32 model in 8 shards merged with 64 MiB output shards, in a child process whose
    peak RSS (VmHWM, reset after the imports) is read from the kernel: the merge adds about one
    shard, far less than the model's size, and stays within merge_ram's bound."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    for param in model.parameters():
        param.data.normal_(0, 0.02)
    base = tmp_path / "base"
    model.save_pretrained(base, max_shard_size="64MB")
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    del model
    adapter = make_adapter(base, tmp_path / "adapter")
    out = tmp_path / "out"
    out.mkdir()
    shard = 64 * 2**20
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(base), str(adapter), str(out), str(shard)],
                          capture_output=True, text=True, cwd=REPO, check=True)
    peak = json.loads(done.stdout.splitlines()[-1])
    added = peak["peak"] - peak["before"]
    assert model_bytes > 450 * 2**20
    assert 0 < added < model_bytes / 3, f"the merge added {added / 2**20:.0f} MiB for a {model_bytes / 2**20:.0f} MiB model"
    assert added < peak["bound"], "merge_ram is an upper bound"
    assert len(list(out.glob("model-*.safetensors"))) >= 8


def test_the_nf4_rounding_is_what_the_4bit_base_holds_in_training(tiny_model):
    """as_trained() gives, for every weight bitsandbytes quantised on loading, exactly the values
    the 4-bit layer computes with; and was_quantised() picks exactly those weights."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional
    import torch
    from safetensors.torch import load_file

    from app.core.models.load import load_base_model
    from app.core.models.resolve import resolve_model

    model = load_base_model(resolve_model(str(tiny_model)), torch.float32, "cpu", quantize="4bit")
    quantised = {f"{name}.weight": module for name, module in model.named_modules()
                 if isinstance(module, bnb.nn.Linear4bit)}
    original = load_file(str(tiny_model / "model.safetensors"))
    assert set(quantised) == {name for name, tensor in original.items() if merge.was_quantised(name, tensor)}
    for name, module in quantised.items():
        held = bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        assert torch.equal(merge.as_trained(original[name], "float32"), held), name
        assert not torch.equal(held, original[name].float())  # NF4 really rounds


def test_merging_into_the_trained_weights_matches_the_4bit_run_better(tiny_run, tmp_path):
    """A QLoRA run: the default merge (into the NF4-rounded weights) gives, at f32, the logits of
    base + adapter as tested; the merge into the original weights is measurably further away."""
    trained = export_run(tiny_run.run_id, "merged", tmp_path / "trained", ExportOptions(dtype="f32"))
    original = export_run(tiny_run.run_id, "merged", tmp_path / "original", ExportOptions(dtype="f32", merge_into="original"))
    assert trained.checks["merged_into"] == "trained" and original.checks["merged_into"] == "original"
    assert trained.checks["checked_against"].startswith("NF4-rounded base")
    assert trained.checks["max_logit_diff"] < 1e-3 and trained.checks["top_token_agreement"] == 1.0
    assert original.checks["max_logit_diff"] > 10 * trained.checks["max_logit_diff"]
    card = (tmp_path / "trained" / "README.md").read_text()
    assert "NF4-rounded weights the adapter was trained against" in card and "NF4 with double quantisation" in card
