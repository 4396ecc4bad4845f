"""The plan's fast token counts equal what training's transformers tokenizer produces."""

from __future__ import annotations

import json

import pytest

from app.core.data.fast_lengths import fast_lengths
from app.core.data.tokenize import tokenize_examples
from app.core.data.validate import check_file
from app.core.resources import sample_dataset
from conftest import EXAMPLES


def _slow(tokenizer, path) -> list[int]:
    report = check_file(path)
    return [len(e.input_ids) for e in tokenize_examples(tokenizer, report.examples, report.file).examples]


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.iterdir()) + ["sample"])
def test_lengths_match_the_demo_tokenizer(demo_model_path, name):
    from transformers import AutoTokenizer

    path = sample_dataset() if name == "sample" else EXAMPLES / name
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    lengths = fast_lengths(demo_model_path, check_file(path).examples)
    assert lengths is not None
    assert lengths == _slow(tokenizer, path)


def test_lengths_match_a_folder_without_a_template(tmp_path, tiny_model):
    """The tiny model's tokenizer_config.json carries its own template; without it both sides
    fall back to the default ChatML template."""
    from transformers import AutoTokenizer

    from app.core.data.tokenize import ensure_chat_template

    config_file = tiny_model / "tokenizer_config.json"
    folder = tmp_path / "model"
    folder.mkdir()
    for item in tiny_model.iterdir():
        if item.name not in ("chat_template.jinja", "tokenizer_config.json"):
            (folder / item.name).symlink_to(item)
    settings = json.loads(config_file.read_text())
    settings.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert ensure_chat_template(tokenizer)
    for path in (EXAMPLES / "messages.jsonl", EXAMPLES / "prompt_completion.jsonl", EXAMPLES / "text.jsonl"):
        assert fast_lengths(folder, check_file(path).examples) == _slow(tokenizer, path)


def test_a_folder_without_tokenizer_json_takes_the_slow_path(tmp_path):
    assert fast_lengths(tmp_path, check_file(EXAMPLES / "messages.jsonl").examples) is None


def test_a_template_that_rejects_a_row_takes_the_slow_path(tmp_path, tiny_model):
    folder = tmp_path / "model"
    folder.mkdir()
    for item in tiny_model.iterdir():
        if item.name != "chat_template.jinja":
            (folder / item.name).symlink_to(item)
    (folder / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
    assert fast_lengths(folder, check_file(EXAMPLES / "messages.jsonl").examples) is None
