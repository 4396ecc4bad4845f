"""Detect a row's format and normalise it into an `Example`, or say exactly what is wrong.

Formats: OpenAI-style `messages`, ShareGPT `conversations`, Alpaca (`instruction`, `input`,
`output`), `prompt`/`completion`, and plain `text`. Chat-like formats (the first three) become a
list of {role, content} messages trained on the assistant turns; prompt/completion trains on the
completion; text trains on everything.

Preference pairs (`chosen` and `rejected`, for DPO and ORPO) come in the shapes peers use: a
`prompt` and two answers as strings (an optional `system`), a `prompt` as a list of messages and
two answers as lists of messages, or two whole conversations that share their start. Each becomes
the shared conversation (`messages`) and the two continuations (`chosen`, `rejected`), each with
at least one assistant turn; a pair whose two sides are the same is refused (it teaches nothing).
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
    "preference": "preference pairs",
}
PREFERENCE_FORMAT = "preference"
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
    chosen: list[dict] = field(default_factory=list)  # a preference pair's two continuations of `messages`
    rejected: list[dict] = field(default_factory=list)

    @property
    def is_pair(self) -> bool:
        return bool(self.chosen)


class RowError(Exception):
    """A row that cannot be used: `field` names where in the row, `str()` says what and how to fix."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def detect_format(record: Any) -> str:
    """The format name of one row; raises RowError when it matches none."""
    if not isinstance(record, dict):
        raise RowError("", f"expected a JSON object, got {_type_name(record)}")
    if "chosen" in record or "rejected" in record:
        return PREFERENCE_FORMAT
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
    if fmt == PREFERENCE_FORMAT:
        return _pair(record, line)
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
        message = _turn(turn, f"{name}[{i}]", role_key, content_key, aliases)
        if message["role"] == "system" and i != 0:
            raise RowError(f"{name}[{i}].{role_key}", "a system turn can only come first")
        messages.append(message)
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(name, 'no assistant turn; each example needs at least one '
                             '{"role": "assistant", ...} to learn from')
    if not any(m["role"] == "user" for m in messages):
        raise RowError(name, "no user turn; add the question the assistant answers")
    return messages


def _turn(turn: Any, where: str, role_key: str, content_key: str, aliases: dict | None) -> dict:
    """One turn as {role, content}, its role one of ROLES (or of `aliases`' names)."""
    if not isinstance(turn, dict):
        raise RowError(where, f"expected an object with '{role_key}' and '{content_key}', got {_type_name(turn)}")
    if role_key not in turn:
        raise RowError(where, f"missing '{role_key}'")
    raw_role = turn[role_key]
    allowed = aliases or {r: r for r in ROLES}
    if not isinstance(raw_role, str) or raw_role not in allowed:
        names = ", ".join(dict.fromkeys(aliases or ROLES))
        raise RowError(f"{where}.{role_key}", f"unknown role {raw_role!r}; use one of {names}")
    if content_key not in turn:
        raise RowError(where, f"missing '{content_key}'")
    return {"role": allowed[raw_role], "content": _content(turn[content_key], f"{where}.{content_key}")}


def _pair(record: dict, line: int) -> Example:
    """A preference row: the shared conversation and its chosen and rejected continuations."""
    for side in ("chosen", "rejected"):
        if side not in record or record[side] is None:
            raise RowError(side, f"missing '{side}'; a preference row needs 'chosen' and 'rejected' answers")
    prompt = record.get("prompt")
    if prompt is None:
        if not all(isinstance(record[side], list) for side in ("chosen", "rejected")):
            raise RowError("prompt", "missing 'prompt'; give the question as 'prompt', or 'chosen' and 'rejected' "
                                     "as whole conversations that start the same")
        chosen = _turns(record["chosen"], "chosen")
        rejected = _turns(record["rejected"], "rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        while shared and chosen[shared - 1]["role"] == "assistant":  # the answers start at an assistant turn
            shared -= 1
        messages, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        messages = _prompt_turns(prompt, record)
        chosen, rejected = _answer(record["chosen"], "chosen"), _answer(record["rejected"], "rejected")
    if not any(m["role"] == "user" for m in messages):
        raise RowError("prompt", "no user turn before the answers; the pair needs the question both answers reply to")
    for side, turns in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in turns):
            raise RowError(side, "no assistant turn after the shared conversation; each side needs the answer "
                                 "it prefers or rejects")
    if chosen == rejected:
        raise RowError("rejected", "is the same as 'chosen'; a pair teaches nothing unless its answers differ")
    return Example(line, PREFERENCE_FORMAT, messages=messages, chosen=chosen, rejected=rejected)


def _turns(value: Any, name: str) -> list[dict]:
    """A list of {role, content} turns (no rule about which roles: a side may be answers only)."""
    if not isinstance(value, list):
        raise RowError(name, f"expected a string or a list of turns, got {_type_name(value)}")
    if not value:
        raise RowError(name, "is empty; write the answer")
    return [_turn(turn, f"{name}[{i}]", "role", "content", None) for i, turn in enumerate(value)]


def _prompt_turns(prompt: Any, record: dict) -> list[dict]:
    system = _string(record, "system", allow_empty=True, optional=True)
    turns = ([{"role": "system", "content": system}] if system.strip() else [])
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowError("prompt", "is empty; write the question both answers reply to")
        return turns + [{"role": "user", "content": prompt}]
    return turns + _turns(prompt, "prompt")


def _answer(value: Any, name: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise RowError(name, "is empty; write the answer")
        return [{"role": "assistant", "content": value}]
    return _turns(value, name)


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
