"""Code that came with a model or an adapter never runs without --trust-remote-code, on any path,
and a run folder's own settings are not consent: resume asks for the flags again.

Each folder here carries Python files that write a marker file when imported; no command may
leave the marker behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.errors import RunError
from app.core.runs import open_run
from app.core.train.trainer import resume_training
from conftest import EXAMPLES, REPO, train_tiny


def tunesmith(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=REPO, env=os.environ.copy(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def _plant(folder: Path, marker: Path, names: list[str]) -> None:
    for name in names:
        (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass Evil: pass\n")


def test_an_adapter_whose_tokenizer_maps_to_its_own_code_is_refused_by_chat_and_export(tiny_run, tmp_path):
    adapter = tmp_path / "downloaded-adapter"
    shutil.copytree(tiny_run.adapter_dir, adapter)
    marker = tmp_path / "CODE_RAN"
    _plant(adapter, marker, ["tokenization_evil"])
    config = json.loads((adapter / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.Evil", None]}
    (adapter / "tokenizer_config.json").write_text(json.dumps(config))
    for args in (["chat", str(adapter), "--prompt", "hi", "--max-new-tokens", "2"],
                 ["export", str(adapter), "--format", "adapter", "--out", str(tmp_path / "out")]):
        proc = tunesmith(*args)
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert "names its own Python code (tokenization_evil.py)" in last and "--trust-remote-code" in last
        assert "[y/N]" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
        assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_a_model_whose_config_and_tokenizer_map_to_its_own_code_runs_none_of_it(tiny_model, tiny_run, tmp_path):
    model = tmp_path / "evil-model"
    shutil.copytree(tiny_model, model)
    marker = tmp_path / "CODE_RAN"
    _plant(model, marker, ["configuration_evil", "modeling_evil", "tokenization_evil"])
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="evil-lm", architectures=["EvilForCausalLM"],
                  auto_map={"AutoConfig": "configuration_evil.Evil", "AutoModelForCausalLM": "modeling_evil.Evil"})
    (model / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer["auto_map"] = {"AutoTokenizer": ["tokenization_evil.Evil", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    adapter = tmp_path / "adapter-on-it"  # an adapter trained on that model, without a tokenizer of its own
    adapter.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy2(Path(tiny_run.adapter_dir) / name, adapter / name)
    settings = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(settings, base_model_name_or_path=str(model))))
    data = str(EXAMPLES / "messages.jsonl")
    for args in (["check-data", data, "--model", str(model)],
                 ["train", "--model", str(model), "--data", data, "--max-steps", "1"],
                 ["chat", str(adapter), "--prompt", "hi"],
                 ["export", str(adapter), "--format", "merged", "--out", str(tmp_path / "out")]):
        proc = tunesmith(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "own Python code" in proc.stderr and "--trust-remote-code" in proc.stderr, (args, proc.stderr)
        assert "[y/N]" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr, args
        assert not marker.exists(), args
    # planning reads config.json as data and runs nothing: it may answer
    proc = tunesmith("plan", "--model", str(model), "--data", data)
    assert "Traceback" not in proc.stderr and not marker.exists()


def test_resume_asks_again_for_the_consent_a_copied_in_run_folder_claims(tiny_model, chat_data):
    run = open_run(train_tiny(tiny_model, chat_data, steps=4, stop_at=2).run_id)
    config = json.loads((run.dir / "config.json").read_text())
    config.update(trust_remote_code=True, allow_pickle=True)  # as a run folder from elsewhere might say
    (run.dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match=r"was started with --trust-remote-code and --allow-pickle: resuming runs "
                                       r"that again; pass --trust-remote-code --allow-pickle to resume it"):
        resume_training(run.id)
    with pytest.raises(RunError, match=r"pass --allow-pickle to resume it"):
        resume_training(run.id, trust_remote_code=True)
    proc = tunesmith("resume", run.id)
    assert proc.returncode == 2 and "pass --trust-remote-code --allow-pickle" in proc.stderr
    assert open_run(run.id).status()["status"] == "stopped"
    proc = tunesmith("resume", run.id, "--trust-remote-code", "--allow-pickle")
    assert proc.returncode == 0, proc.stderr
    assert open_run(run.id).status()["status"] == "finished"


def test_a_model_whose_tokenizer_maps_to_its_own_code_is_refused_alike_by_train_plan_and_check_data(
        tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    marker = tmp_path / "CODE_RAN"
    _plant(model, marker, ["tokenization_evil"])
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": ["tokenization_evil.Evil", None]}, tokenizer_class="Evil")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    data = str(EXAMPLES / "messages.jsonl")
    for command in (["train", "--data", data, "--max-steps", "1"], ["plan", "--data", data], ["check-data", data]):
        done = tunesmith(*command, "--model", str(model))
        assert done.returncode == 2, (command, done.stderr[-2000:])
        [line] = done.stderr.strip().splitlines()
        assert line == (f"tunesmith: error: {model}: its tokenizer names its own Python code (tokenization_evil.py); "
                        "Tunesmith does not run it unless you pass --trust-remote-code for files you trust"), command
    assert not marker.exists()


def test_own_code_without_a_causal_lm_is_named_as_both(tiny_model, tmp_path):
    from app.core.errors import ModelError
    from app.core.models.files import inspect_folder

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="evilmodel", architectures=["EvilModel"],
                  auto_map={"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"})
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"needs the model's own Python code \(auto_map in config.json\), and that "
                                         r"code names no causal language model \(it maps AutoConfig, AutoModel, not "
                                         r"AutoModelForCausalLM\)"):
        inspect_folder(model)


def test_an_absurd_size_in_the_config_is_blamed_on_the_config_not_the_tokenizer(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config["hidden_size"] = 10**9
    (model / "config.json").write_text(json.dumps(config))
    done = tunesmith("train", "--model", str(model), "--data", str(EXAMPLES / "messages.jsonl"), "--max-steps", "1")
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert "the model alone needs" in line and "tokenizer" not in line, line
