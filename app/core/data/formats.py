"""Detect a row's format and normalise it into an `Example`, or say exactly what is wrong.

Formats: OpenAI-style `messages`, ShareGPT `conversations`, Alpaca (`instruction`, `input`,
`output`), `prompt`/`completion`, and plain `text`. Chat-like formats (the first three) become a
list of {role, content} messages trained on the assistant turns; prompt/completion trains on the
completion; text trains on everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FORMAT_LABELS = {
    "messages": "OpenAI messages",
    "sharegpt": "ShareGPT conversations",
    "alpaca": "Alpaca",
    "prompt_completion": "prompt/completion",
    "text": "plain text",
}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}


@dataclass
class Example:
    """One usable training example, from `line` of its file."""

    line: int
    format: str
    messages: list[dict] = field(default_factory=list)
    prompt: str = ""
    completion: str = ""
    text: str = ""


class RowError(Exception):
    """A row that cannot be used: `field` names where in the row, `str()` says what and how to fix."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def detect_format(record: Any) -> str:
    """The format name of one row; raises RowError when it matches none."""
    if not isinstance(record, dict):
        raise RowError("", f"expected a JSON object, got {_type_name(record)}")
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise RowError("", f"no known format (keys: {keys}); use 'messages', 'conversations', "
                       "'instruction'+'output', 'prompt'+'completion' or 'text'")


def normalise(record: dict, fmt: str, line: int) -> Example:
    """Turn a row of format `fmt` into an Example; raises RowError naming the bad field."""
    if fmt == "messages":
        return Example(line, fmt, messages=_chat(record["messages"], "messages", "role", "content", None))
    if fmt == "sharegpt":
        return Example(line, fmt, messages=_chat(record["conversations"], "conversations", "from",
                                                 "value", SHAREGPT_ROLES))
    if fmt == "alpaca":
        instruction = _string(record, "instruction", allow_empty=False)
        extra = _string(record, "input", allow_empty=True, optional=True)
        output = _string(record, "output", allow_empty=False)
        system = _string(record, "system", allow_empty=True, optional=True)
        user = instruction + (f"\n\n{extra}" if extra.strip() else "")
        messages = ([{"role": "system", "content": system}] if system.strip() else [])
        return Example(line, fmt, messages=messages + [{"role": "user", "content": user},
                                                       {"role": "assistant", "content": output}])
    if fmt == "prompt_completion":
        return Example(line, fmt, prompt=_string(record, "prompt", allow_empty=True),
                       completion=_string(record, "completion", allow_empty=False))
    return Example(line, fmt, text=_string(record, "text", allow_empty=False))


def _chat(turns: Any, name: str, role_key: str, content_key: str, aliases: dict | None) -> list[dict]:
    if not isinstance(turns, list):
        raise RowError(name, f"expected a list of turns, got {_type_name(turns)}")
    if not turns:
        raise RowError(name, "is empty; add at least a user and an assistant turn")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise RowError(where, f"expected an object with '{role_key}' and '{content_key}', "
                                  f"got {_type_name(turn)}")
        if role_key not in turn:
            raise RowError(where, f"missing '{role_key}'")
        raw_role = turn[role_key]
        allowed = aliases or {r: r for r in ROLES}
        if not isinstance(raw_role, str) or raw_role not in allowed:
            names = ", ".join(dict.fromkeys(aliases or ROLES))
            raise RowError(f"{where}.{role_key}", f"unknown role {raw_role!r}; use one of {names}")
        role = allowed[raw_role]
        if role == "system" and i != 0:
            raise RowError(f"{where}.{role_key}", "a system turn can only come first")
        if content_key not in turn:
            raise RowError(where, f"missing '{content_key}'")
        content = _content(turn[content_key], f"{where}.{content_key}")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(name, 'no assistant turn; each example needs at least one '
                             '{"role": "assistant", ...} to learn from')
    if not any(m["role"] == "user" for m in messages):
        raise RowError(name, "no user turn; add the question the assistant answers")
    return messages


def _content(value: Any, where: str) -> str:
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                raise RowError(f"{where}[{j}]", f"only text parts {{\"type\": \"text\", \"text\": ...}} "
                                                f"are supported (got {kind!r})")
            texts.append(part["text"])
        value = "".join(texts)
    if not isinstance(value, str):
        raise RowError(where, f"expected a string, got {_type_name(value)}")
    if not value.strip():
        raise RowError(where, "empty content; write the text of this turn or remove the turn")
    return value


def _string(record: dict, key: str, allow_empty: bool, optional: bool = False) -> str:
    if key not in record or record[key] is None:
        if optional:
            return ""
        raise RowError(key, f"missing '{key}'")
    value = record[key]
    if not isinstance(value, str):
        raise RowError(key, f"expected a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise RowError(key, "is empty; write the text or remove the row")
    return value


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
