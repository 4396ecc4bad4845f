"""Export a trained run: the adapter, a merged model whose logits match base + adapter, and a GGUF
file that reads back, with a Modelfile whose template renders prompts like the chat template; an
existing folder is never touched without --force, and a full disk is refused up front."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from app import cli
from app.core.errors import ExportError
from app.core.export.exporter import ExportOptions, export_run
from app.core.export.modelfile import ollama_modelfile
from conftest import adapter_of_a_hub_base

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
    " + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def test_the_adapter_export_has_the_adapter_the_tokenizer_and_a_model_card(tiny_run, tmp_path):
    result = export_run(tiny_run.run_id, "adapter", tmp_path / "adapter")
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "README.md"} <= set(
        result.files)
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card and "chats.jsonl" in card and "rank 16" in card
    assert "4 of 4" in card and "Final training loss" in card


def test_the_merged_model_loads_in_plain_transformers_and_matches_base_plus_adapter(tiny_run, tiny_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from app.core.export.tensor_merge import as_trained, was_quantised

    result = export_run(tiny_run.run_id, "merged", tmp_path / "merged", ExportOptions(dtype="f32"))
    assert result.checks["max_logit_diff"] < 1e-4 and result.checks["top_token_agreement"] == 1.0
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md"} <= set(result.files)
    assert any(name.endswith(".safetensors") for name in result.files)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():  # the base as the QLoRA run trained against it: its linear weights NF4-rounded
        for name, param in base.named_parameters():
            if was_quantised(name, param):
                param.copy_(as_trained(param, "float32"))
    adapted = PeftModel.from_pretrained(base, Path(tiny_run.run_dir) / "adapter")
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)
        with adapted.disable_adapter():
            assert not torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)  # the adapter is in
    assert "largest logit difference" in (tmp_path / "merged" / "README.md").read_text()


@pytest.mark.parametrize("fmt", ["merged", "adapter"])
def test_the_run_it_command_after_an_export_runs_it(fmt, tiny_run, tmp_path, capsys):
    """What `export` prints under "Run it:" (and the Export tab shows) is run here in a shell, in a
    folder with a space and a quote in its name: it loads the export and answers."""
    import subprocess

    out = tmp_path / "my export's folder" / fmt
    assert cli.main(["export", tiny_run.run_id, "--format", fmt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    [command] = [line.split(": ", 1)[1] for line in printed.split("Run it:\n")[1].splitlines()]
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-2000:]


def test_the_gguf_export_reads_back_and_comes_with_a_valid_modelfile(tiny_run, tmp_path):
    from app.core.export.gguf_check import verify_gguf

    result = export_run(tiny_run.run_id, "gguf", tmp_path / "gguf", ExportOptions(quant="q8_0"))
    [name] = [f for f in result.files if f.endswith(".gguf")]
    assert set(result.files) == {name, "Modelfile", "README.md", "export.json"}  # no merged leftovers
    from app.core.export.usage import how_to_run

    commands = dict(how_to_run("gguf", result.out_dir, result.files))
    assert commands["Ollama"] == f"ollama create gguf -f {tmp_path / 'gguf' / 'Modelfile'} && ollama run gguf"
    assert commands["llama.cpp"] == f"llama-cli -m {tmp_path / 'gguf' / name} -cnv"
    assert commands["LM Studio"] == f"lms import {tmp_path / 'gguf' / name}"
    assert result.checks["gguf_tensors"] == 21
    assert verify_gguf(tmp_path / "gguf" / name, _merged_for_check(tiny_run, tmp_path)).ok
    instructions = parse_modelfile((tmp_path / "gguf" / "Modelfile").read_text())
    assert instructions[0] == ("FROM", f"./{name}")
    kinds = [kind for kind, _ in instructions]
    assert kinds.count("TEMPLATE") == 1 and ("PARAMETER", 'stop "<|im_end|>"') in instructions


def _merged_for_check(run, tmp_path) -> Path:
    export_run(run.run_id, "merged", tmp_path / "merged-check", ExportOptions(dtype="bf16"))
    return tmp_path / "merged-check"


# SmolLM2's own template: a default system turn when the chat has none
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATION = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Ahoy"},
                {"role": "user", "content": "Bread?"}, {"role": "assistant", "content": "Bake it, matey."},
                {"role": "user", "content": "And butter?"}]


@pytest.mark.parametrize("template", [None, LLAMA3_TEMPLATE, DEFAULT_SYSTEM_TEMPLATE],
                         ids=["chatml", "llama3", "default-system"])
def test_the_modelfile_template_renders_multi_turn_chats_token_for_token(tiny_tokenizer, template):
    tokenizer = _copy(tiny_tokenizer)
    if template:
        tokenizer.chat_template = template
    text = parse_modelfile(ollama_modelfile("m.gguf", tokenizer))
    go = dict(text)["TEMPLATE"].strip('"')
    for system in ("Be brief.", ""):
        for turns in (1, 3, 5):
            messages = ([{"role": "system", "content": system}] if system else []) + CONVERSATION[:turns]
            expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            rendered = render_go(go, system, messages)
            assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == \
                tokenizer(expected, add_special_tokens=False)["input_ids"], (system, turns)
            assert rendered == expected


def test_the_modelfile_stops_on_every_end_token_and_takes_the_sampling_defaults(tiny_tokenizer):
    tokenizer = _copy(tiny_tokenizer)
    tokenizer.chat_template = LLAMA3_TEMPLATE
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                                "<|eot_id|>", "<|eom_id|>"]})
    eot, eom = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|eom_id|>"])
    config = {"eos_token_id": [tokenizer.eos_token_id, eom, eot], "temperature": 0.6, "top_p": 0.9,
              "do_sample": True}
    instructions = parse_modelfile(ollama_modelfile("m.gguf", tokenizer, config))
    stops = [value for kind, value in instructions if kind == "PARAMETER" and value.startswith("stop ")]
    assert {'stop "<|eot_id|>"', 'stop "<|eom_id|>"', f'stop "{tokenizer.eos_token}"'} <= set(stops)
    assert len(stops) == len(set(stops))
    assert ("PARAMETER", "temperature 0.6") in instructions and ("PARAMETER", "top_p 0.9") in instructions


def test_a_template_whose_turns_do_not_repeat_is_refused(tiny_tokenizer):
    tokenizer = _copy(tiny_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}{% if loop.index > 2 %}[{{ loop.index }}]{% endif %}"
                               "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with pytest.raises(ExportError, match="TEMPLATE"):
        ollama_modelfile("m.gguf", tokenizer)


def test_a_folder_of_the_users_is_never_replaced_even_with_force(tiny_run, tmp_path, capsys):
    target = tmp_path / "existing"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    (target / "photos").mkdir()
    (target / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    for force in ([], ["--force"]):
        code = cli.main(["export", tiny_run.run_id, "--format", "adapter", "--out", str(target), *force])
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(target) in err and "did not write" in err
        assert sorted(p.name for p in target.iterdir()) == ["keep.txt", "photos"]
        assert (target / "keep.txt").read_text() == "mine" and (target / "photos" / "cat.jpg").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folders left


def test_an_earlier_export_is_replaced_only_with_force(tiny_run, tmp_path, capsys):
    target = tmp_path / "export"
    assert cli.main(["export", tiny_run.run_id, "--format", "adapter", "--out", str(target)]) == 0
    marker = json.loads((target / ".tunesmith-export").read_text())
    assert set(marker["files"]) == {p.relative_to(target).as_posix() for p in target.rglob("*")
                                    if p.is_file() and p.name != ".tunesmith-export"}
    assert marker["files"]["README.md"]["sha256"] and marker["files"]["adapter_model.safetensors"]["bytes"] > 0
    first = (target / "adapter_model.safetensors").stat().st_ino
    assert cli.main(["export", tiny_run.run_id, "--format", "adapter", "--out", str(target)]) == 2
    assert "earlier export; pass --force" in capsys.readouterr().err
    assert cli.main(["export", tiny_run.run_id, "--format", "adapter", "--out", str(target), "--force"]) == 0
    assert (target / "adapter_model.safetensors").stat().st_ino != first  # really written anew
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_force_keeps_every_file_added_to_an_export_and_refuses_in_one_line(tiny_run, tmp_path, capsys):
    """The audit's reproduction: notes and a GGUF of the user's put into an earlier export."""
    target = tmp_path / "exp"
    assert cli.main(["export", tiny_run.run_id, "--format", "adapter", "--out", str(target)]) == 0
    (target / "NOTES.md").write_text("notes\n")
    (target / "quants").mkdir()
    (target / "quants" / "model-q3.gguf").write_text("q\n")
    before = {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli.main(["export", tiny_run.run_id, "--format", "adapter", "--out", str(target), "--force"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "holds NOTES.md, quants/ that the export did not write" in line and "even with --force" in line
    assert {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    (target / "NOTES.md").unlink()
    shutil.rmtree(target / "quants")
    (target / "README.md").write_text((target / "README.md").read_text().replace("rank 16", "rank 61"))
    assert cli.main(["export", tiny_run.run_id, "--format", "adapter", "--out", str(target), "--force"]) == 2
    assert "holds README.md changed since it was written" in capsys.readouterr().err
    assert "rank 61" in (target / "README.md").read_text()


def test_a_copied_or_empty_marker_is_no_licence_to_replace(tiny_run, tmp_path, capsys):
    real = tmp_path / "real"
    assert cli.main(["export", tiny_run.run_id, "--format", "adapter", "--out", str(real)]) == 0
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "thesis.tex").write_text("\\documentclass{article}")
    shutil.copy2(real / ".tunesmith-export", forged / ".tunesmith-export")
    assert cli.main(["export", tiny_run.run_id, "--format", "adapter", "--out", str(forged), "--force"]) == 2
    assert "holds thesis.tex that the export did not write" in capsys.readouterr().err
    (forged / ".tunesmith-export").write_text("{}")  # a marker that lists nothing (or an older Tunesmith's)
    assert cli.main(["export", tiny_run.run_id, "--format", "adapter", "--out", str(forged), "--force"]) == 2
    assert "does not list what the export wrote" in capsys.readouterr().err
    assert (forged / "thesis.tex").read_text() == "\\documentclass{article}"


def test_an_out_inside_a_run_is_refused(tiny_run, capsys):
    from app.core.paths import runs_dir

    inside = runs_dir() / tiny_run.run_id / "sub" / "inside"
    capsys.readouterr()
    assert cli.main(["export", tiny_run.run_id, "--format", "adapter", "--out", str(inside)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"it is inside the run {tiny_run.run_id}" in line
    assert not (runs_dir() / tiny_run.run_id / "sub").exists()


def test_force_never_replaces_home_cwd_the_run_store_a_run_or_their_parents(tiny_run, tmp_path, monkeypatch, capsys):
    from app.core.paths import data_dir, runs_dir

    home, work = tmp_path / "home", tmp_path / "home" / "work"
    work.mkdir(parents=True)
    (work / "report.txt").write_text("draft")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    # a marker planted in a protected folder does not make it replaceable
    (work / ".tunesmith-export").write_text("{}")
    run_dir = runs_dir() / tiny_run.run_id
    before = {p: sorted(q.name for q in p.iterdir()) for p in (home, work, runs_dir(), run_dir)}
    for out in (home, work, ".", runs_dir(), data_dir(), data_dir().parent, run_dir, run_dir / "adapter",
                tmp_path):
        code = cli.main(["export", tiny_run.run_id, "--format", "adapter", "--out", str(out), "--force"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "refused" in err, (out, err)
    assert {p: sorted(q.name for q in p.iterdir()) for p in before} == before
    assert (work / "report.txt").read_text() == "draft"


def test_a_full_disk_is_refused_before_anything_is_written(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ExportError, match=r"1 KiB free, but this export needs about \d+ KiB"):
        export_run(tiny_run.run_id, "merged", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_unknown_runs_and_formats_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["export", "no-such-run", "--format", "merged", "--out", str(tmp_path / "x")]) == 2
    assert "no run 'no-such-run'" in capsys.readouterr().err
    with pytest.raises(ExportError, match="unknown export format"):
        export_run("x", "onnx", tmp_path / "y")


def test_chat_answers_one_prompt_from_the_command_line(tiny_run, capsys):
    code = cli.main(["chat", tiny_run.run_id, "--prompt", "Hi", "--temperature", "0", "--max-new-tokens", "5"])
    captured = capsys.readouterr()
    assert code == 0 and captured.out.strip() and "5 tokens" in captured.err


@pytest.fixture(scope="module")
def _demo_references() -> dict:
    return {}


@pytest.fixture
def demo_reference_once(_demo_references, monkeypatch) -> dict:
    """Base + adapter as tested (merged_model.tested_reference: the demo's base with its adapter run
    on the check prompts, most of a demo export's time on CPU) computed once per module for each
    adapter and base, where this module's demo exports would compute the same thing again each time
    (it depends on nothing an export chooses); each export still merges, writes its files and checks
    the merged model against it. The dict: (adapter, base) -> the reference."""
    from app.core.export import merged_model

    real = merged_model.tested_reference

    def once(source, info, tokenizer, progress=lambda message: None, trust_remote_code=False):
        key = (str(source.adapter_dir), str(info.path), trust_remote_code)
        if key not in _demo_references:
            reference = real(source, info, tokenizer, progress, trust_remote_code)
            if isinstance(reference, str):  # skipped (RAM): nothing to keep
                return reference
            _demo_references[key] = reference
        return _demo_references[key]

    monkeypatch.setattr(merged_model, "tested_reference", once)
    return _demo_references


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first user of the session's demo run trains it
def test_the_merged_demo_model_answers_in_the_sample_datas_voice(demo_run, demo_reference_once, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.core.export.gguf_check import verify_gguf
    from test_demo import _pirate_score

    export_run(str(demo_run), "merged", tmp_path / "merged", ExportOptions(dtype="f32"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "How do I make garlic bread?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=60, do_sample=False, repetition_penalty=1.1)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert _pirate_score(answer) >= 1, answer
    result = export_run(str(demo_run), "gguf", tmp_path / "gguf", ExportOptions(dtype="f32", quant="f16"))
    [name] = [f for f in result.files if f.endswith(".gguf")]
    check = verify_gguf(tmp_path / "gguf" / name, tmp_path / "merged")
    assert check.ok and check.tensor_count == 272, check.problems


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first user of the session's demo run trains it
def test_the_demo_merged_by_default_is_the_model_that_was_tested(demo_run, demo_reference_once, tmp_path):
    """The default merged export (automatic precision: f16 for SmolLM2, whose largest activation,
    28,241, is under half of f16's range) picks base + adapter's next token at >= 99.5 % of
    positions; bf16, which keeps 3 fewer bits of each weight, rounds away part of what the adapter
    changed."""
    result = export_run(str(demo_run), "merged", tmp_path / "merged")
    assert result.checks["dtype"] == "f16", result.checks
    assert result.checks["dtype_choice"].startswith("f16: the largest activation on the check prompts")
    assert result.checks["top_token_agreement"] >= 0.995, result.checks
    card = (tmp_path / "merged" / "README.md").read_text()
    assert f"{result.checks['top_token_agreement']:.1%} of positions" in card
    assert "merged model (f16 safetensors)" in card and "Stored in f16: the largest activation" in card
    bf16 = export_run(str(demo_run), "merged", tmp_path / "bf16", ExportOptions(dtype="bf16"))
    assert bf16.checks["dtype"] == "bf16" and "dtype_choice" not in bf16.checks
    assert bf16.checks["max_logit_diff"] > result.checks["max_logit_diff"]


def test_the_automatic_precision_is_bf16_where_activations_near_f16s_range_or_unmeasured():
    from app.core.export.merged_model import _Reference, choose_dtype

    def reference(largest: float) -> _Reference:
        return _Reference([], [], largest, "NF4-rounded base")

    assert choose_dtype("auto", reference(2_500.0))[0] == "f16"  # Llama 2's "massive activations"
    assert choose_dtype("auto", reference(28_241.0))[0] == "f16"  # SmolLM2-135M's
    dtype, why = choose_dtype("auto", reference(40_000.0))
    assert dtype == "bf16" and "40,000" in why and "65,504" in why
    assert choose_dtype("auto", "skipped: ...")[0] == "bf16"
    assert choose_dtype("f16", reference(1e6)) == ("f16", "")  # asked for by name: written as asked
    assert choose_dtype("bf16", reference(1.0)) == ("bf16", "")


def _loud_copy(tiny_model: Path, folder: Path) -> Path:
    """The tiny model with its embeddings scaled to ~1e5: past f16's largest value (65,504), well
    inside bf16's range."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_model, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] * 1e5
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("headroom", [2.0, 0.0])
def test_a_model_whose_activations_overflow_f16_is_merged_in_bf16(headroom, tiny_run, tiny_model, tmp_path,
                                                                  monkeypatch):
    """Measured before the merge (the residual stream reaches ~1e5), or, with the measurement made
    to say f16 (headroom 0), found by the check after it: the f16 merge's logits overflow, and it is
    merged again in bf16."""
    from app.core.adapters import find_adapter
    from app.core.adapters import adapter_tokenizer
    from app.core.export import merged_model as merged
    from app.core.models.resolve import resolve_model

    monkeypatch.setattr(merged, "F16_HEADROOM", headroom)
    source = find_adapter(tiny_run.run_id)
    info = resolve_model(str(_loud_copy(tiny_model, tmp_path / "loud")))
    messages: list[str] = []
    (tmp_path / "out").mkdir()
    checks = merged.merge_adapter(source, info, adapter_tokenizer(source, info, False), tmp_path / "out",
                                  progress=messages.append)
    assert checks["dtype"] == "bf16" and "finite" not in checks
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert checks["top_token_agreement"] >= 0.9, checks
    if headroom:
        assert "too near f16's largest value" in checks["dtype_choice"]
        assert not any("merging again in bf16" in m for m in messages)
    else:
        assert checks["dtype_choice"] == "bf16: in f16 the merged model overflowed on the check prompts"
        assert any("merging again in bf16" in m for m in messages)


# -- Ollama's Modelfile, as its parser reads it --------------------------------------------------------
def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """Instructions of a Modelfile by Ollama's rules: `KEYWORD value` per line, a value in triple
    quotes may span lines, keywords are case-insensitive, # starts a comment."""
    keywords = {"FROM", "ADAPTER", "TEMPLATE", "SYSTEM", "PARAMETER", "LICENSE", "MESSAGE", "REQUIRES"}
    instructions, rest = [], text
    while rest.strip():
        rest = rest.lstrip()
        if rest.startswith("#"):
            rest = rest.split("\n", 1)[1] if "\n" in rest else ""
            continue
        match = re.match(r"(\w+)[ \t]+", rest)
        assert match and match.group(1).upper() in keywords, f"not a Modelfile instruction: {rest[:40]!r}"
        keyword, rest = match.group(1).upper(), rest[match.end():]
        if rest.startswith('"""'):
            end = rest.index('"""', 3)
            value, rest = rest[:end + 3], rest[end + 3:]
        else:
            value, _, rest = rest.partition("\n")
        if keyword == "PARAMETER":
            key, _, argument = value.partition(" ")
            assert key in {"stop", "temperature", "top_p", "top_k", "min_p", "num_ctx", "repeat_penalty"}, key
            json.loads(argument)  # a quoted stop string must be valid
        instructions.append((keyword, value.strip()))
    return instructions


def render_go(template: str, system: str, messages: list[dict]) -> str:
    """Ollama's Go text/template, for the constructs our TEMPLATE uses: if/else if/else/end on
    .System, $last, not $last and eq .Role "..."; range over .Messages with $last; .System, .Content.
    (Ollama itself cannot run here; this follows Go's semantics for exactly those.)"""
    tokens = [t for t in re.split(r"(\{\{.*?\}\})", template) if t]
    position = 0

    def block():
        nonlocal position
        nodes = []
        while position < len(tokens):
            token = tokens[position]
            position += 1
            if not token.startswith("{{"):
                nodes.append(("text", token))
                continue
            action = token[2:-2].strip()
            if action == "end" or action.startswith("else"):
                return nodes, action
            if action.startswith("if "):
                nodes.append(if_node(action[3:]))
            elif action.startswith("range "):
                body, end = block()
                assert end == "end"
                nodes.append(("range", body))
            else:
                nodes.append(("action", action))
        return nodes, None

    def if_node(condition):
        then, end = block()
        if end == "else":
            otherwise, end = block()
            assert end == "end"
            return ("if", condition, then, otherwise)
        if end.startswith("else if "):
            return ("if", condition, then, [if_node(end[len("else if "):])])
        assert end == "end"
        return ("if", condition, then, [])

    def truth(condition, scope):
        if condition.startswith("not "):
            return not truth(condition[4:], scope)
        if condition.startswith("eq .Role "):
            return scope["role"] == json.loads(condition[len("eq .Role "):])
        return bool({".System": system, "$last": scope.get("last")}[condition])

    def run(nodes, scope):
        out = ""
        for node in nodes:
            if node[0] == "text":
                out += node[1]
            elif node[0] == "if":
                out += run(node[2] if truth(node[1], scope) else node[3], scope)
            elif node[0] == "range":
                for index, message in enumerate(messages):
                    out += run(node[1], {"role": message["role"], "content": message["content"],
                                         "last": index == len(messages) - 1})
            elif node[1] == ".System":
                out += system
            elif node[1] == ".Content":
                out += scope["content"]
            else:
                assert node[1] == "$last := eq (len (slice $.Messages $i)) 1", node[1]
        return out

    tree, end = block()
    assert end is None
    return run(tree, {})


def _copy(tokenizer):
    import copy

    return copy.deepcopy(tokenizer)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first user of the session's demo run trains it
def test_the_demo_exports_4_bit_gguf_that_llama_cpp_runs_in_the_pirate_voice(demo_run, demo_reference_once,
                                                                           tmp_path):
    """q4_0 everywhere, q4_k_m where llama.cpp's quantizer is installed; llama.cpp answers a new
    question (two turns, prompted through the Modelfile's TEMPLATE) in the tuned voice and stops
    on the Modelfile's stop token."""
    import importlib.util

    from test_demo import _pirate_score

    quants = ["q4_0"] + (["q4_k_m"] if importlib.util.find_spec("llama_cpp") else [])
    for quant in quants:
        result = export_run(str(demo_run), "gguf", tmp_path / quant, ExportOptions(quant=quant))
        assert result.checks["top_token_agreement"] >= 0.995 and result.checks["merged_into"] == "original"
        [name] = [f for f in result.files if f.endswith(".gguf")]
        assert (tmp_path / quant / name).stat().st_size < 0.45 * 2 * 134_515_008  # under half of f16
        if importlib.util.find_spec("llama_cpp") is None:
            continue  # q4_0 was still written and read back; llama.cpp itself is not here to run it
        from llama_cpp import Llama

        instructions = parse_modelfile((tmp_path / quant / "Modelfile").read_text())
        template = dict(instructions)["TEMPLATE"].strip('"')
        stops = [json.loads(v.split(" ", 1)[1]) for k, v in instructions if k == "PARAMETER" and v.startswith("stop ")]
        llm = Llama(model_path=str(tmp_path / quant / name), n_ctx=1024, verbose=False, seed=0)
        try:
            messages = [{"role": "user", "content": "How do I make garlic bread?"}]
            for follow_up in ("And how long should it bake?", None):
                reply = llm.create_completion(render_go(template, "", messages), max_tokens=120, temperature=0.0,
                                              repeat_penalty=1.1, stop=stops)["choices"][0]
                assert reply["finish_reason"] == "stop", (quant, reply)
                assert _pirate_score(reply["text"]) >= 1, (quant, reply["text"])
                messages += [{"role": "assistant", "content": reply["text"]}] + (
                    [{"role": "user", "content": follow_up}] if follow_up else [])
        finally:
            llm.close()



def test_an_adapters_hub_base_is_downloaded_only_with_download(tiny_run, tmp_path, capsys):
    """The tests run with HF_HUB_OFFLINE=1: the size cannot be read, and a download would fail."""
    adapter = adapter_of_a_hub_base(tiny_run, tmp_path)
    for command in (["export", str(adapter), "--format", "adapter", "--out", str(tmp_path / "out")],
                    ["chat", str(adapter), "--prompt", "Hi"]):
        assert cli.main(command) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line == ("tunesmith: error: someone/not-here-7b: the base model is not on this machine (its size "
                        "could not be read from the Hub); pass --download to download it from the Hugging Face "
                        "Hub, or copy it into the Hugging Face cache"), command
    assert cli.main(["export", str(adapter), "--format", "adapter", "--out", str(tmp_path / "out"), "--download"]) == 2
    assert "could not download from the Hugging Face Hub" in capsys.readouterr().err  # asked, so it tried
    assert not (tmp_path / "out").exists()
