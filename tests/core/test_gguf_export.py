"""GGUF export: tiny random models round-trip through gguf's reader; the demo model matches the GGUF
file llama.cpp's own converter wrote for it."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from app.core.errors import ExportError
from app.core.export.gguf import permute, write_gguf
from app.core.export.gguf_check import verify_gguf
from conftest import build_tiny_model, build_tiny_tokenizer

BLOCK_PARTS = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
               "ffn_down"]


def field(reader: gguf.GGUFReader, key: str):
    found = reader.get_field(key)
    return found.contents() if found is not None else None


def stored(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    tensor = next(t for t in reader.tensors if t.name == name)
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


def export_and_read(model: Path, path: Path, quant: str, arch: str):
    """Write `model` as GGUF at `quant`, check llama.cpp's architecture name, and read it back:
    (summary, reader, tensor names)."""
    summary = write_gguf(model, path, quant)
    assert summary.arch == arch
    reader = gguf.GGUFReader(summary.path)
    return summary, reader, {t.name for t in reader.tensors}


def hf_tensor(model_dir: Path, name: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as handle:
        return handle.get_tensor(name).float().numpy()


def build_tiny_qwen2(path: Path, family: str = "qwen2") -> Path:
    """A 2-layer random Qwen2 (q/k/v biases, tied embeddings, rows of 48 that q8_0 cannot block), or
    Qwen3 (per-head q/k norms, a head_dim of 16 that hidden / heads does not give)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config_class, model_class = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (Qwen3Config,
                                                                                            Qwen3ForCausalLM)
    extra = {"head_dim": 16} if family == "qwen3" else {}
    config = config_class(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=True, initializer_range=0.3, eos_token_id=tokenizer.eos_token_id,
                          **extra)
    model = model_class(config)
    with torch.no_grad():
        for layer in model.model.layers:  # random biases and norms, so that a lost or misplaced one shows
            for part in (layer.self_attn.q_proj.bias, layer.self_attn.k_proj.bias, layer.self_attn.v_proj.bias,
                         getattr(layer.self_attn, "q_norm", None), getattr(layer.self_attn, "k_norm", None)):
                if part is not None:
                    (part.weight if hasattr(part, "weight") else part).normal_(1.0, 0.3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


def build_tiny_gemma(path: Path, family: str) -> Path:
    """A 2-layer random Gemma 2 (soft-capped attention and logits) or Gemma 3 (q/k norms), norms
    random around 0 (Gemma adds 1 to them), a sliding window longer than the test's sequence."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config_class, model_class = {"gemma2": (Gemma2Config, Gemma2ForCausalLM),
                                 "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}[family]
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                          max_position_embeddings=512, sliding_window=256, initializer_range=0.3,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return save_with_random_norms(model_class(config), tokenizer, path, mean=0.0)


def save_with_random_norms(model, tokenizer, path: Path, mean: float) -> Path:
    """Save `model` with its norms drawn around `mean` (0 for Gemma, which adds 1 to them; else 1),
    so that a norm in the wrong place, or its +1 left out, shows in the logits."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(mean, 0.3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


FAMILIES = ("olmo2", "mixtral", "qwen2moe", "qwen3moe")


def build_tiny_family(path: Path, family: str) -> Path:
    """A 2-layer random OLMo 2 (norms after attention and the MLP, q/k norms over all heads) or MoE
    model: Mixtral, Qwen2-MoE (with a shared expert) or Qwen3-MoE, 4 experts with 2 used per token."""
    import torch
    import transformers

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    name, extra = {"olmo2": ("Olmo2", {}),
                   "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
                   "qwen2moe": ("Qwen2Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                 shared_expert_intermediate_size=64, norm_topk_prob=False)),
                   "qwen3moe": ("Qwen3Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                 norm_topk_prob=True))}[family]
    config = getattr(transformers, f"{name}Config")(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **extra)
    return save_with_random_norms(getattr(transformers, f"{name}ForCausalLM")(config), tokenizer, path, mean=1.0)


def build_tiny_phi3(path: Path, longrope: bool = False) -> Path:
    """A 2-layer random Phi-3 (fused qkv and gate_up) with Phi-3's kind of tokenizer: SentencePiece
    plus <|endoftext|>, <|user|>, <|assistant|> and <|end|> added after it, and a vocabulary padded
    beyond them; with `longrope`, Phi-3.5's RoPE scaling with random short and long factors (the
    short ones apply below the pre-training context)."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    size = build_tiny_spm_tokenizer(path, added=["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>"])
    torch.manual_seed(0)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": list(np.linspace(1.0, 2.0, 8)),
            "long_factor": list(np.linspace(1.0, 8.0, 8))} if longrope else None
    config = Phi3Config(vocab_size=size + 4, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048 if longrope else 512,
                        original_max_position_embeddings=512, rope_parameters=rope, initializer_range=0.3,
                        bos_token_id=1, eos_token_id=size - 2, pad_token_id=size - 4, tie_word_embeddings=False)
    Phi3ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_phi3(tmp_path_factory) -> Path:
    return build_tiny_phi3(tmp_path_factory.mktemp("tiny-phi3"))


@pytest.fixture(scope="module")
def tiny_phi3_longrope(tmp_path_factory) -> Path:
    return build_tiny_phi3(tmp_path_factory.mktemp("tiny-phi3-longrope"), longrope=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_olmo2_and_moe_models_export_with_their_own_tensors_and_read_back_equal(family, tmp_path):
    model = build_tiny_family(tmp_path / family, family)
    summary = write_gguf(model, tmp_path / f"{family}.gguf", "f16")
    reader = gguf.GGUFReader(summary.path)
    arch = {"mixtral": "llama"}.get(family, family)
    assert summary.arch == arch
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    if family == "olmo2":
        assert {"blk.1.post_attention_norm.weight", "blk.1.post_ffw_norm.weight", "blk.1.attn_q_norm.weight"} <= set(types)
        assert "blk.1.attn_norm.weight" not in types
    else:
        assert field(reader, f"{arch}.expert_count") == 4 and field(reader, f"{arch}.expert_used_count") == 2
        assert types["blk.1.ffn_gate_inp.weight"] == "F32" and types["blk.1.ffn_up_exps.weight"] == "F16"
        assert "blk.1.ffn_up.weight" not in types
        hidden, inter = 64, 128 if family == "mixtral" else 32
        assert stored(reader, "blk.1.ffn_down_exps.weight").shape == (4, hidden, inter)
        source = "block_sparse_moe.experts.3.w3" if family == "mixtral" else "mlp.experts.3.up_proj"
        np.testing.assert_allclose(stored(reader, "blk.1.ffn_up_exps.weight")[3],
                                   hf_tensor(model, f"model.layers.1.{source}.weight"), atol=2e-3)
        if family == "qwen2moe":
            assert field(reader, "qwen2moe.expert_shared_feed_forward_length") == 64
            assert {"blk.0.ffn_gate_inp_shexp.weight", "blk.0.ffn_down_shexp.weight"} <= set(types)
    check = verify_gguf(summary.path, model)
    assert check.ok, check.problems


def test_moe_models_llama_cpp_would_compute_differently_are_refused_in_the_plan(tmp_path):
    from app.core.models.support import gguf_problem

    qwen3 = {"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 128, "num_experts_per_tok": 8}
    assert gguf_problem({**qwen3, "norm_topk_prob": True}) == ""
    assert "needs norm_topk_prob true" in gguf_problem({**qwen3, "norm_topk_prob": False})
    assert "dense layers" in gguf_problem({**qwen3, "norm_topk_prob": True, "mlp_only_layers": [0]})
    assert "dense layers" in gguf_problem({**qwen3, "norm_topk_prob": True, "decoder_sparse_step": 2})
    model = build_tiny_family(tmp_path / "mixtral", "mixtral")
    (model / "model.safetensors").rename(tmp_path / "full.safetensors")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "full.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w1.weight"]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"blk\.1\.ffn_gate_exps\.weight needs 4 experts of one shape, found 3"):
        write_gguf(model, tmp_path / "broken.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_phi3_exports_its_fused_projections_and_longrope_factors(tiny_phi3_longrope, tmp_path):
    summary, reader, names = export_and_read(tiny_phi3_longrope, tmp_path / "phi3.gguf", "f16", "phi3")
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight", "rope_factors_long.weight"} <= names
    assert not names & {"blk.0.attn_q.weight", "blk.0.ffn_gate.weight"}
    np.testing.assert_allclose(stored(reader, "rope_factors_long.weight"), np.linspace(1.0, 8.0, 8), rtol=1e-6)
    assert field(reader, "phi3.rope.scaling.original_context_length") == 512
    assert field(reader, "phi3.rope.scaling.attn_factor") == pytest.approx(math.sqrt(1 + math.log(4) / math.log(512)))
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens[402] == "<|end|>" and tokens[-1].startswith("[PAD")  # added tokens, then padding
    check = verify_gguf(summary.path, tiny_phi3_longrope)
    assert check.ok, check.problems


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory) -> Path:
    return build_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma2"), "gemma2")


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory) -> Path:
    return build_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma3"), "gemma3")


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory) -> Path:
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3")


def test_tiny_llama_f16_reads_back_with_names_shapes_metadata_and_values(tiny_model, tmp_path):
    summary = write_gguf(tiny_model, tmp_path / "tiny.gguf", "f16")
    config = json.loads((tiny_model / "config.json").read_text())
    reader = gguf.GGUFReader(summary.path)
    names = {t.name for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    expected |= {f"blk.{i}.{part}.weight" for i in range(2) for part in BLOCK_PARTS}
    assert names == expected and summary.tensor_count == len(expected)
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert shapes["token_embd.weight"] == (64, 512)  # GGUF lists the fastest dimension first
    assert shapes["blk.0.attn_k.weight"] == (64, 32)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.block_count") == 2
    assert field(reader, "llama.attention.head_count_kv") == 2
    assert field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert field(reader, "llama.context_length") == 512
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert field(reader, "general.quantization_version") == gguf.GGML_QUANT_VERSION
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config["vocab_size"] and tokens[3] == "<|im_end|>"
    assert field(reader, "tokenizer.ggml.token_type")[:4] == [3, 3, 3, 3]
    assert field(reader, "tokenizer.ggml.eos_token_id") == 3
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert "<|im_start|>" in field(reader, "tokenizer.chat_template")
    assert len(field(reader, "tokenizer.ggml.merges")) > 100
    # values: embeddings as they are, q permuted into llama.cpp's rotary layout
    embed = hf_tensor(tiny_model, "model.embed_tokens.weight")
    np.testing.assert_allclose(stored(reader, "token_embd.weight"), embed, rtol=1e-3, atol=1e-3)
    q = hf_tensor(tiny_model, "model.layers.1.self_attn.q_proj.weight")
    assert not np.allclose(stored(reader, "blk.1.attn_q.weight"), q, atol=1e-2)
    np.testing.assert_allclose(permute(stored(reader, "blk.1.attn_q.weight"), 4, inverse=True), q, atol=2e-3)
    check = verify_gguf(summary.path, tiny_model)
    assert check.ok, check.problems
    assert check.tensor_count == check.expected_count == 21 and check.values_checked >= 5


def test_tiny_llama_q8_0_dequantizes_close_to_the_weights(tiny_model, tmp_path):
    summary = write_gguf(tiny_model, tmp_path / "tiny-q8.gguf", "q8_0")
    reader = gguf.GGUFReader(summary.path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    down = hf_tensor(tiny_model, "model.layers.0.mlp.down_proj.weight")
    assert np.abs(stored(reader, "blk.0.ffn_down.weight") - down).max() < 1e-2 * np.abs(down).max()
    check = verify_gguf(summary.path, tiny_model)
    assert check.ok, check.problems
    assert 0 < check.max_abs_diff < 0.05
    assert summary.bytes < (tmp_path / "tiny-q8.gguf").stat().st_size + 1
    assert summary.bytes < write_gguf(tiny_model, tmp_path / "tiny-f16.gguf").bytes


def test_qwen2_exports_biases_unpermuted_and_f16_where_rows_do_not_fit_q8_blocks(tiny_qwen2, tmp_path):
    summary, reader, names = export_and_read(tiny_qwen2, tmp_path / "qwen.gguf", "q8_0", "qwen2")
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.1.attn_v.bias"} <= names
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert field(reader, "general.architecture") == "qwen2"
    assert field(reader, "qwen2.block_count") == 2
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.bias"] == "F32"
    assert types["blk.0.attn_q.weight"] == "F16"  # rows of 48 are no multiple of 32
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 96 are
    bias = hf_tensor(tiny_qwen2, "model.layers.0.self_attn.k_proj.bias")
    np.testing.assert_array_equal(stored(reader, "blk.0.attn_k.bias"), bias)
    q = hf_tensor(tiny_qwen2, "model.layers.0.self_attn.q_proj.weight")
    np.testing.assert_allclose(stored(reader, "blk.0.attn_q.weight"), q, atol=2e-3)
    check = verify_gguf(summary.path, tiny_qwen2)
    assert check.ok, check.problems


def test_tied_llama_has_no_output_and_llama3_rope_writes_rope_freqs(tmp_path):
    model = build_tiny_model(tmp_path / "tied", tie=True)
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64}
    (model / "config.json").write_text(json.dumps(config))
    summary = write_gguf(model, tmp_path / "tied.gguf")
    reader = gguf.GGUFReader(summary.path)
    names = [t.name for t in reader.tensors]
    assert "output.weight" not in names and names[0] == "rope_freqs.weight"
    factors = stored(reader, "rope_freqs.weight")
    assert factors.shape == (8,) and factors[0] == 1.0 and factors[-1] == pytest.approx(8.0)
    assert field(reader, "llama.rope.freq_base") == pytest.approx(500000.0)
    assert verify_gguf(summary.path, model).ok


def test_sharded_checkpoint_exports_the_same_file_as_a_single_one(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    single, sharded = tmp_path / "a" / "tiny", tmp_path / "b" / "tiny"  # same name: same general.name
    shutil.copytree(tiny_model, single)
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).save_pretrained(sharded, max_shard_size="50KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model / name, sharded / name)
    assert len(list(sharded.glob("*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").exists()
    one = write_gguf(single, tmp_path / "one.gguf")
    many = write_gguf(sharded, tmp_path / "many.gguf")
    assert many.tensors == one.tensors
    assert many.path.read_bytes() == one.path.read_bytes()


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    model = tmp_path / "falcon"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}))
    with pytest.raises(ExportError, match="FalconForCausalLM.*LlamaForCausalLM"):
        write_gguf(model, model / "out.gguf")
    assert list(model.iterdir()) == [model / "config.json"]


def test_unknown_quantization_and_sentencepiece_tokenizer_are_refused(tiny_model, tmp_path):
    with pytest.raises(ExportError, match="q4_k.*f16, q8_0"):
        write_gguf(tiny_model, tmp_path / "out.gguf", "q4_k")
    model = tmp_path / "spm"
    shutil.copytree(tiny_model, model)
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["model"]["byte_fallback"] = True
    (model / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match="SentencePiece"):
        write_gguf(model, tmp_path / "out.gguf")
    assert not any(p.name.endswith((".gguf", ".tmp")) for p in tmp_path.iterdir())


def test_failure_midway_leaves_no_temp_file_and_keeps_the_old_output(tiny_model, tmp_path):
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    out.write_text("previous export")
    seen = []

    def cancel_after_three(message: str, fraction: float) -> None:
        seen.append(message)
        if len(seen) > 3:
            assert any(p.name.endswith(".tmp") for p in out.parent.iterdir())  # really mid-way
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_gguf(tiny_model, out, progress=cancel_after_three)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]
    assert out.read_text() == "previous export"

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ExportError, match="truncated"):
        write_gguf(broken, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]


ORIGINAL_TOKENIZER_KEYS = ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                           "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                           "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                           "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                           "tokenizer.chat_template"]
ORIGINAL_MODEL_KEYS = ["general.architecture", "llama.block_count", "llama.context_length",
                       "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
                       "llama.attention.head_count_kv", "llama.rope.freq_base", "llama.rope.dimension_count",
                       "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size"]


@pytest.fixture(scope="module")
def demo_gguf(demo_model_path, tmp_path_factory) -> Path:
    return write_gguf(demo_model_path, tmp_path_factory.mktemp("demo-gguf") / "demo.gguf", "f16").path


@pytest.mark.slow
def test_demo_model_matches_the_gguf_llama_cpp_wrote(demo_gguf, demo_model_path):
    from app.core.models.demo_model import find_demo_gguf

    original, mine = gguf.GGUFReader(find_demo_gguf()), gguf.GGUFReader(demo_gguf)
    for key in ORIGINAL_TOKENIZER_KEYS + ORIGINAL_MODEL_KEYS:
        assert field(mine, key) == field(original, key), key
    assert field(mine, "tokenizer.ggml.pre") == "smollm"
    shapes = {t.name: tuple(t.shape) for t in original.tensors}
    assert {t.name: tuple(t.shape) for t in mine.tensors} == shapes
    # llama.cpp permuted q/k when it wrote the original; ours must agree with it, not with HF's layout
    for name in ("blk.0.attn_q.weight", "blk.29.attn_k.weight"):
        theirs, ours = stored(original, name), stored(mine, name)
        assert np.abs(theirs - ours).max() < 0.05 * np.abs(theirs).max(), name
    check = verify_gguf(demo_gguf, demo_model_path)
    assert check.ok, check.problems


needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed")


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_loads_the_demo_gguf_and_answers_coherently(demo_gguf):
    from llama_cpp import Llama

    llm = Llama(model_path=str(demo_gguf), n_ctx=512, verbose=False, seed=0)
    try:
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                           max_tokens=24, temperature=0.0)
        assert "Paris" in reply["choices"][0]["message"]["content"]
        assert llm.tokenize(b"Hello world 12345", add_bos=False) == [19556, 905, 216, 33, 34, 35, 36, 37]
    finally:
        llm.close()


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "phi3_longrope", *FAMILIES])
def test_llama_cpp_logits_match_transformers(arch, request, tmp_path):
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    if arch in FAMILIES:
        model = build_tiny_family(tmp_path / arch, arch)
    else:
        model = request.getfixturevalue("tiny_model" if arch == "llama" else f"tiny_{arch}")
    ids = [5, 17, 99, 200, 33, 250, 7, 120, 64, 300] * 6
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    # MoE models at f32: at f16, the router's near-ties between the 2nd and 3rd expert flip at some
    # positions (measured: Qwen3-MoE 24 of 60 positions off by 0.1-2.9, top-1 still 98 %)
    quant = "f32" if arch in ("mixtral", "qwen2moe", "qwen3moe") else "f16"
    llm = Llama(model_path=str(write_gguf(model, tmp_path / "m.gguf", quant).path), n_ctx=128,
                logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        got = np.array(llm.scores[:len(ids)])
    finally:
        llm.close()
    # a wrong q/k permutation gives differences of ~10 and argmax agreement near 0; llama.cpp's f16
    # weights and KV cache move logits by up to ~0.03, so positions whose two best tokens are within 0.05 of
    # each other are ties that neither side decides, and are left out of the agreement
    expected = expected.numpy()
    assert np.abs(got - expected).max() < 0.1
    top2 = np.sort(expected, axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 0.05
    assert decided.mean() >= 0.8
    assert (got.argmax(-1) == expected.argmax(-1))[decided].mean() >= 0.99


def test_token_ids_outside_the_vocabulary_are_refused_by_name(tiny_model, tmp_path):
    for bad_id in (-1, 10**6, "7"):
        model = tmp_path / f"bad-{bad_id}"
        shutil.copytree(tiny_model, model)
        spec = json.loads((model / "tokenizer.json").read_text())
        added = {a["content"] for a in spec.get("added_tokens", [])}
        text = next(t for t in spec["model"]["vocab"] if t not in added)
        spec["model"]["vocab"][text] = bad_id
        (model / "tokenizer.json").write_text(json.dumps(spec))
        with pytest.raises(ExportError, match=rf"token {text!r} has id {bad_id!r}, outside 0\.\."):
            write_gguf(model, tmp_path / "out.gguf")
    assert not any(p.name.endswith((".gguf", ".tmp")) for p in tmp_path.iterdir())


def test_an_unknown_pre_tokenizer_is_refused_unless_named_by_hand(tiny_model, tmp_path):
    """It was written as 'default' with a warning: a GGUF that mis-tokenises silently."""
    from gguf import GGUFReader

    model = tmp_path / "odd"
    shutil.copytree(tiny_model, model)
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\s+|[a-z]+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (model / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match="pre-tokenizer not recognised.*--pre-tokenizer NAME"):
        write_gguf(model, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
    with pytest.raises(ExportError, match="--pre-tokenizer llama-4: not one we can write"):
        write_gguf(model, tmp_path / "out.gguf", pre_tokenizer="llama-4")
    summary = write_gguf(model, tmp_path / "out.gguf", pre_tokenizer="gpt-2")
    assert summary.pre_tokenizer == "gpt-2" and "set by hand" in summary.warnings[0]
    field = GGUFReader(tmp_path / "out.gguf").fields["tokenizer.ggml.pre"]
    assert bytes(field.parts[field.data[0]]).decode() == "gpt-2"


def test_the_read_back_check_reads_big_tensors_in_chunks_and_still_finds_a_bad_last_row(tiny_model, tmp_path,
                                                                                       monkeypatch):
    """With chunks of 640 values (10 rows of the tiny model's output matrix), a changed value in
    the very last row is still found; the check holds one chunk, not the tensor (8B: 2 GB -> 64 MB)."""
    import app.core.export.gguf_check as check

    write_gguf(tiny_model, tmp_path / "m.gguf", "f32")
    monkeypatch.setattr(check, "CHUNK_VALUES", 640)
    assert verify_gguf(tmp_path / "m.gguf", tiny_model).ok
    reader = gguf.GGUFReader(tmp_path / "m.gguf", "r+")
    output = next(t for t in reader.tensors if t.name == "output.weight")
    output.data[-1, -1] += 1.0
    del reader
    found = verify_gguf(tmp_path / "m.gguf", tiny_model)
    assert not found.ok and any(p.startswith("output.weight: values differ by up to 1") for p in found.problems)


def test_an_architecture_we_train_but_cannot_export_is_named_in_the_plan(capsys, tmp_path):
    from transformers import Qwen3MoeConfig

    from app.core.config import TrainConfig
    from app.core.plan.preview import preview_plan

    moe = tmp_path / "qwen3-moe"  # a config is all the planner needs
    moe.mkdir()
    config = Qwen3MoeConfig(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                            num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512, norm_topk_prob=False)
    (moe / "config.json").write_text(json.dumps({**config.to_dict(), "architectures": ["Qwen3MoeForCausalLM"]}))
    plan = preview_plan(TrainConfig(model=str(moe), preset="24gb"))
    assert "GGUF export of Qwen3MoeForCausalLM needs norm_topk_prob true" in plan.export_note
    assert plan.to_dict()["export_note"] == plan.export_note
    for exportable in ("Llama-3.1-8B-Instruct", "Qwen3-8B", "gemma-2-9b-it", "Phi-3.5-mini-instruct",
                       "Mistral-7B-Instruct-v0.3"):
        assert preview_plan(TrainConfig(model=exportable, preset="24gb")).export_note == "", exportable
    config.norm_topk_prob = True  # as Qwen3-30B-A3B ships
    (moe / "config.json").write_text(json.dumps({**config.to_dict(), "architectures": ["Qwen3MoeForCausalLM"]}))
    assert preview_plan(TrainConfig(model=str(moe), preset="24gb")).export_note == ""
    (moe / "config.json").write_text(json.dumps({**config.to_dict(), "architectures": ["GraniteForCausalLM"],
                                                 "model_type": "granite"}))
    from app import cli

    assert cli.main(["plan", "--model", str(moe), "--preset", "24gb"]) == 0
    assert "Export  GGUF export does not support the architecture GraniteForCausalLM" in capsys.readouterr().out


def test_qwen3_exports_its_q_and_k_norms_and_head_size(tiny_qwen3, tmp_path):
    summary, reader, names = export_and_read(tiny_qwen3, tmp_path / "qwen3.gguf", "f16", "qwen3")
    assert {"blk.0.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= names and "output.weight" not in names
    assert field(reader, "qwen3.attention.key_length") == 16 == field(reader, "qwen3.attention.value_length")
    norm = hf_tensor(tiny_qwen3, "model.layers.1.self_attn.k_norm.weight")
    np.testing.assert_allclose(stored(reader, "blk.1.attn_k_norm.weight"), norm, atol=1e-6)
    check = verify_gguf(summary.path, tiny_qwen3)
    assert check.ok, check.problems


needs_sentencepiece = pytest.mark.skipif(
    importlib.util.find_spec("sentencepiece") is None or importlib.util.find_spec("google.protobuf") is None,
    reason="sentencepiece and protobuf are not installed (pip install -e '.[dev]')")


def build_tiny_spm_tokenizer(path: Path, added: list[str] = ()) -> int:
    """A SentencePiece BPE tokenizer (byte fallback, no normalisation: Llama 2's, Mistral 7B's and
    Phi-3's kind) trained on the sample data, saved as tokenizer.model and tokenizer.json, with the
    `added` special tokens after its 400 pieces; returns its size."""
    import sentencepiece
    from transformers import AutoTokenizer

    from app.core.resources import sample_dataset

    path.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in sample_dataset().read_text(encoding="utf-8").splitlines()]
    (path / "corpus.txt").write_text("\n".join(m["content"] for r in rows for m in r["messages"]), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(path / "corpus.txt"), model_prefix=str(path / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (path / "corpus.txt").unlink()
    (path / "tokenizer.vocab").unlink()
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                            "eos_token": "</s>", "unk_token": "<unk>",
                                                            "add_bos_token": True}))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"additional_special_tokens": list(added)})
    tokenizer.save_pretrained(path)  # writes tokenizer.json beside tokenizer.model
    return len(tokenizer)


def build_tiny_spm_llama(path: Path) -> Path:
    """A 2-layer random Llama with a SentencePiece tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tiny_spm_tokenizer(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.slow
@needs_sentencepiece
@needs_llama_cpp
def test_a_sentencepiece_llama_exports_and_llama_cpp_tokenizes_and_predicts_like_transformers(tmp_path):
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = build_tiny_spm_llama(tmp_path / "spm-llama")
    summary = write_gguf(model, tmp_path / "spm.gguf", "f16")
    reader = gguf.GGUFReader(summary.path)
    assert field(reader, "tokenizer.ggml.model") == "llama" and len(field(reader, "tokenizer.ggml.scores")) == 400
    check = verify_gguf(summary.path, model)
    assert check.ok, check.problems
    tokenizer = AutoTokenizer.from_pretrained(model)
    llm = Llama(model_path=str(summary.path), n_ctx=256, logits_all=True, verbose=False)
    try:
        for text in ("Ahoy matey, the bread be ready!", "Bake it at 220 degrees for 12 minutes.",
                     "Arr, ye need flour, water and salt. Knead it well, me hearty."):
            assert llm.tokenize(text.encode(), add_bos=True) == tokenizer(text).input_ids, text
        ids = tokenizer("Ahoy matey, bake the bread at 220 degrees and serve it with garlic butter.").input_ids
        with torch.no_grad():
            expected = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)(torch.tensor([ids])).logits[0]
        llm.eval(ids)
        got = np.array(llm.scores[:len(ids)])
    finally:
        llm.close()
    assert (got.argmax(-1) == expected.numpy().argmax(-1)).mean() >= 0.99
    assert np.abs(got - expected.numpy()).max() < 0.1


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_exports_its_four_norms_shifted_by_one_and_its_soft_caps(family, request, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}")
    summary, reader, names = export_and_read(model, tmp_path / f"{family}.gguf", "f16", family)
    assert {"blk.1.post_attention_norm.weight", "blk.1.ffn_norm.weight", "blk.1.post_ffw_norm.weight"} <= names
    assert ("blk.0.attn_q_norm.weight" in names) == (family == "gemma3") and "output.weight" not in names
    norm = hf_tensor(model, "model.layers.1.post_feedforward_layernorm.weight")
    np.testing.assert_allclose(stored(reader, "blk.1.post_ffw_norm.weight"), norm + 1, atol=1e-6)
    if family == "gemma2":
        assert field(reader, "gemma2.attn_logit_softcapping") == 50.0
        assert field(reader, "gemma2.final_logit_softcapping") == 30.0
    assert field(reader, f"{family}.attention.sliding_window") == 256
    check = verify_gguf(summary.path, model)
    assert check.ok, check.problems
