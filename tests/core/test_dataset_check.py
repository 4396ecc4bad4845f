"""One dataset check for every face: check-data, the Train tab and training see the same rows, the
same problems (a row the chat template rejects included) and the same token lengths, and the
tokenizer is loaded at most once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from app.core.data.check import DataCheck, check_dataset
from conftest import EXAMPLES, REPO

NO_SYSTEM = ("{% for message in messages %}{% if message['role'] == 'system' %}"
             "{{ raise_exception('this model takes no system turn') }}{% endif %}"
             "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture
def strict_model(tiny_model, tmp_path):
    """The tiny model with a chat template that refuses system turns."""
    model = tmp_path / "strict"
    shutil.copytree(tiny_model, model)
    settings = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(settings | {"chat_template": NO_SYSTEM}))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    return model


@pytest.fixture
def mixed_data(tmp_path):
    """Two good chats, one with a system turn (line 3) and one bad JSON line (line 4)."""
    path = tmp_path / "mixed.jsonl"
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy!"}]}
    system = {"messages": [{"role": "system", "content": "Be a pirate."}] + chat["messages"]}
    path.write_text("\n".join([json.dumps(chat), json.dumps(chat), json.dumps(system), "{oops"]) + "\n")
    return path


def test_a_row_the_template_rejects_is_a_problem_on_its_line_for_every_face(strict_model, mixed_data, window,
                                                                           qtbot):
    summary = check_dataset(DataCheck(str(mixed_data), str(strict_model)), "preview")
    assert [p.line for p in summary.problems] == [3, 4]
    assert "this model takes no system turn" in str(summary.problems[0])
    assert summary.usable_rows == 2 and len(summary.lengths) == 2 and summary.preview_line == 1
    cli = subprocess.run([sys.executable, "-m", "app", "check-data", str(mixed_data), "--model", str(strict_model)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 2
    assert f"{mixed_data}:3: " in cli.stdout and f"{mixed_data}:4: " in cli.stdout
    assert "4 (2 usable, 2 with problems)" in cli.stdout
    tab = window.train_tab
    tab.model_box.setCurrentText(str(strict_model))
    tab.model_picker.look_up()
    tab.load_dataset(str(mixed_data))
    qtbot.waitUntil(lambda: tab.summary is not None, timeout=120_000)
    assert [p.line for p in tab.summary.problems] == [3, 4]
    assert "2 with problems" in tab.report.summary.text()


def test_training_reads_the_same_lengths_the_check_reported(tiny_model):
    """The fast path (tokenizers + jinja2) and the real tokenizer training uses agree row by row."""
    from app.core.data.tokenize import ensure_chat_template
    from app.core.models.load import load_tokenizer
    from app.core.models.resolve import resolve_model

    for name in ("messages.jsonl", "sharegpt.jsonl", "alpaca.json", "text.jsonl"):
        fast = check_dataset(DataCheck(str(EXAMPLES / name), str(tiny_model)))
        tokenizer = load_tokenizer(resolve_model(str(tiny_model)))
        ensure_chat_template(tokenizer)
        exact = check_dataset(DataCheck(str(EXAMPLES / name)), "train", tokenizer=tokenizer)
        assert fast.tokenized is None and exact.tokenized is not None
        assert fast.lengths == exact.lengths and len(fast.lengths) == fast.usable_rows > 0, name


@pytest.mark.parametrize("preview, strict, loads", [(False, False, 0), (True, False, 1), (True, True, 1)],
                         ids=["cli-fast", "gui-fast", "gui-slow"])
def test_the_tokenizer_is_loaded_at_most_once(tiny_model, strict_model, mixed_data, monkeypatch, preview, strict,
                                              loads):
    import app.core.models.load as models

    calls = []
    real = models.load_tokenizer
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = mixed_data if strict else EXAMPLES / "messages.jsonl"
    summary = check_dataset(DataCheck(str(data), str(strict_model if strict else tiny_model)),
                            "preview" if preview else "report")
    assert len(calls) == loads and summary.lengths
    assert bool(summary.preview) == preview
