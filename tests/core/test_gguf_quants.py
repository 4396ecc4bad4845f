"""GGUF quantisation types: q4_0 and q5_0 written by us anywhere, the K-quants by llama.cpp's own
quantizer where llama-cpp-python is installed, and a clear refusal (naming the extra) where not."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest

from app.core.errors import ExportError
from app.core.export import quantize
from app.core.export.gguf import write_gguf
from app.core.export.gguf_check import verify_gguf
from conftest import build_tiny_model

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (pip install 'tunesmith[gguf]')")


def types_of(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def llama_256(tmp_path_factory) -> Path:
    """A random Llama whose rows are multiples of 256, so that K-quant blocks fit."""
    return build_tiny_model(tmp_path_factory.mktemp("llama-256"), hidden=256, intermediate=512,
                            initializer_range=0.05)


def test_q4_0_and_q5_0_are_written_without_llama_cpp_and_read_back(tiny_model, tmp_path):
    sizes = {}
    for quant, kind in (("q4_0", "Q4_0"), ("q5_0", "Q5_0")):
        summary = write_gguf(tiny_model, tmp_path / f"{quant}.gguf", quant)
        types = types_of(summary.path)
        assert types["blk.0.ffn_down.weight"] == types["blk.1.attn_q.weight"] == kind
        assert types["output.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
        check = verify_gguf(summary.path, tiny_model)
        assert check.ok, check.problems
        sizes[quant] = summary.bytes
    sizes["q8_0"] = write_gguf(tiny_model, tmp_path / "q8_0.gguf", "q8_0").bytes
    assert sizes["q4_0"] < sizes["q5_0"] < sizes["q8_0"]


def test_the_read_back_check_fails_a_4_bit_file_that_holds_other_weights(tiny_model, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    summary = write_gguf(tiny_model, tmp_path / "q4.gguf", "q4_0")
    other = tmp_path / "other"
    other.mkdir()
    for file in tiny_model.iterdir():
        (other / file.name).write_bytes(file.read_bytes())
    weights = load_file(other / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    weights[name] = torch.flip(weights[name], [0])
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    check = verify_gguf(summary.path, other)
    assert not check.ok and any("blk.1.attn_q.weight" in p for p in check.problems)


def test_a_k_quant_without_llama_cpp_names_the_extra_and_writes_nothing(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize, "llama_cpp_installed", lambda: False)  # as on a machine without it
    assert quantize.quant_problem("q4_0") == ""
    with pytest.raises(ExportError, match=r"q4_k_m needs llama\.cpp.*pip install 'tunesmith\[gguf\]'"):
        write_gguf(tiny_model, tmp_path / "out" / "m.gguf", "q4_k_m")
    assert not (tmp_path / "out").exists()


def test_the_export_tab_greys_out_what_this_machine_cannot_write(qtbot, monkeypatch):
    from app.gui.tabs.export_tab import quant_picker

    monkeypatch.setattr(quantize, "llama_cpp_installed", lambda: False)
    box, note = quant_picker()
    qtbot.addWidget(box)
    enabled = {box.itemData(i): box.model().item(i).isEnabled() for i in range(box.count())}
    assert enabled == {q: q not in quantize.BY_LLAMA_CPP for q in quantize.ALL_QUANTS}
    assert "tunesmith[gguf]" in note.text() and not note.isHidden()
    assert "8B model: 4.6 GiB" in box.itemText(box.findData("q4_k_m"))  # 8.03e9 x 0.61 bytes
    monkeypatch.setattr(quantize, "llama_cpp_installed", lambda: True)
    box, note = quant_picker()
    qtbot.addWidget(box)
    assert all(box.model().item(i).isEnabled() for i in range(box.count())) and note.isHidden()


@needs_llama_cpp
@pytest.mark.parametrize("quant, kinds", [("q4_k_m", {"Q4_K", "Q6_K"}), ("q5_k_m", {"Q5_K", "Q6_K"}),
                                          ("q6_k", {"Q6_K"})])
def test_llama_cpp_writes_the_k_quants_and_they_read_back(llama_256, tmp_path, quant, kinds):
    summary = write_gguf(llama_256, tmp_path / "out" / f"{quant}.gguf", quant)
    types = types_of(summary.path)
    assert kinds <= set(types.values()), types
    assert types["output_norm.weight"] == "F32"
    assert field_value(summary.path, "general.file_type") == getattr(gguf.LlamaFileType, "MOSTLY_" + quant.upper())
    check = verify_gguf(summary.path, llama_256)
    assert check.ok, check.problems
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{quant}.gguf"]  # no 16-bit file left
    assert summary.bytes < 0.45 * write_gguf(llama_256, tmp_path / "f16.gguf", "f16").bytes


@needs_llama_cpp
def test_llama_cpp_runs_its_k_quant_close_to_transformers(llama_256, tmp_path):
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    ids = [5, 17, 99, 200, 33, 250, 7, 120, 64, 300] * 6
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(llama_256, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    path = write_gguf(llama_256, tmp_path / "m.gguf", "q6_k").path
    llm = Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        got = np.array(llm.scores[:len(ids)])
    finally:
        llm.close()
    agreement = (got.argmax(-1) == expected.numpy().argmax(-1)).mean()
    assert agreement >= 0.9, agreement
    assert np.abs(got - expected.numpy()).max() < 0.25 * np.abs(expected.numpy()).max()


@needs_llama_cpp
def test_a_cancelled_quantisation_leaves_nothing_behind(llama_256, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.gguf").write_text("previous export")
    seen = []

    def cancel_when_quantising(message: str, fraction: float) -> None:
        seen.append(message)
        if "llama.cpp" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_gguf(llama_256, out / "m.gguf", "q4_k_m", progress=cancel_when_quantising)
    assert sorted(p.name for p in out.iterdir()) == ["m.gguf"] and (out / "m.gguf").read_text() == "previous export"


def field_value(path: Path, key: str):
    found = gguf.GGUFReader(path).get_field(key)
    return found.contents() if found is not None else None
