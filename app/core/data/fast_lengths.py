"""Token lengths for a plan in a fraction of a second: the `tokenizers` library and jinja2 directly.

Importing transformers costs several seconds on a laptop CPU, which is most of what `tunesmith
plan --data` would spend. A plan only needs each example's length, so this reads the folder's
`tokenizer.json` with `tokenizers` (the library transformers' fast tokenizers wrap) and renders the
chat template with a jinja2 sandbox set up like transformers' own (trim_blocks, lstrip_blocks, its
`raise_exception`, `tojson` and `strftime_now`). The texts are the ones `tokenize.py` builds, so
the lengths match; tests compare them on the demo model. Training measures again with the real
tokenizer, so a rare difference moves a plan preview, never a run. Any folder this cannot read
(no tokenizer.json, a template it cannot render) returns None and the caller takes the slow path.
"""

from __future__ import annotations

import json
from pathlib import Path

from app.core.data.formats import Example
from app.core.data.tokenize import DEFAULT_CHAT_TEMPLATE
from app.core.models.template_guard import check_template, compile_template

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def fast_lengths(model_dir: str | Path, examples: list[Example]) -> list[int] | None:
    """Untruncated token count of each example as training would tokenise it, or None."""
    folder = Path(model_dir)
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        settings = _tokenizer_settings(folder)
        source = _chat_template(folder, settings)
    except Exception:  # noqa: BLE001 - anything unusual: let transformers handle it
        return None
    check_template(source, str(folder))  # untrusted: tried within limits first (ModelError past them)
    try:
        template = compile_template(source)
    except Exception:  # noqa: BLE001 - a template jinja cannot compile: the slow path reports it
        return None
    special = {name: _token_text(settings.get(name)) for name in SPECIAL_TOKENS}
    eos = special["eos_token"] or ""
    lengths = []
    try:
        for example in examples:
            if example.messages:
                chats = [example.messages + side for side in (example.chosen, example.rejected)] \
                    if example.is_pair else [example.messages]  # a pair: both sides, end to end
                texts = [template.render(messages=chat, add_generation_prompt=False, **special) for chat in chats]
                lengths.append(sum(len(tokenizer.encode(text, add_special_tokens=False).ids) for text in texts))
            else:
                body = (example.prompt + example.completion if example.format == "prompt_completion"
                        else example.text)
                lengths.append(len(tokenizer.encode(body + eos, add_special_tokens=True).ids))
    except Exception:  # noqa: BLE001 - a template that rejects a row: the slow path reports it
        return None
    return lengths


def _tokenizer_settings(folder: Path) -> dict:
    """tokenizer_config.json over special_tokens_map.json (older folders keep the tokens there)."""
    settings = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            settings.update({k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items()
                             if v is not None})
    return settings


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, settings: dict) -> str:
    """chat_template.jinja (transformers 4.43+), else tokenizer_config.json's, else our default."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = settings.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else DEFAULT_CHAT_TEMPLATE
