"""Turn examples into token ids and labels, with loss taken only where the model should learn.

Chat examples are rendered with the model's chat template (or `DEFAULT_CHAT_TEMPLATE`, a plain
ChatML template, when the model has none) and only the assistant turns, including the token that
ends each turn, carry labels. Prompt/completion examples learn the completion and the end token;
plain text learns everything. Truncation to the sequence length happens later, once it is planned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app.core.data.formats import Example
from app.core.data.read import Problem

IGNORE = -100

# Used when a model ships no chat template: ChatML, as used by Qwen and SmolLM.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Tokenized:
    """One example as the model sees it: ids, labels (IGNORE where no loss), source line."""

    line: int
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


@dataclass
class TokenizedSet:
    """Tokenised examples (untruncated) and the rows the chat template could not render."""

    examples: list[Tokenized] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def ensure_chat_template(tokenizer) -> bool:
    """Give the tokenizer the default template if it has none; True when the default was applied."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def tokenize_examples(tokenizer, examples: list[Example], file: str) -> TokenizedSet:
    """Tokenise all examples, untruncated; rows the chat template rejects become problems."""
    result = TokenizedSet()
    for example in examples:
        try:
            ids, labels = tokenize_example(tokenizer, example)
        except TemplateError as err:
            result.problems.append(Problem(file, example.line, "messages", str(err)))
            continue
        result.examples.append(Tokenized(example.line, ids, labels))
    return result


class TemplateError(Exception):
    """The chat template could not render an example."""


def tokenize_example(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """Ids and labels of one example, untruncated."""
    if example.messages:
        text, spans = _render_chat(tokenizer, example.messages)
        special = False
    elif example.format == "prompt_completion":
        end = example.prompt + example.completion + (tokenizer.eos_token or "")
        text, spans, special = end, [(len(example.prompt), len(end))], True
    else:
        text = example.text + (tokenizer.eos_token or "")
        spans, special = [(0, len(text))], True
    encoded = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [IGNORE] * len(ids)
    for index, (start, end) in enumerate(encoded["offset_mapping"]):
        if end > start and any(a <= start < b for a, b in spans):
            labels[index] = ids[index]
    return ids, labels


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja raises its own types, templates call raise_exception
        raise TemplateError(f"the model's chat template rejected this conversation: {err}") from err


def _render_chat(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The full text and the character spans of each assistant turn (with its end-of-turn text)."""
    full = _render(tokenizer, messages, generation_prompt=False)
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        span = None
        if i > 0:
            before = _render(tokenizer, messages[:i], generation_prompt=True)
            upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
            if full.startswith(upto) and upto.startswith(before) and len(before) >= cursor:
                span = (len(before), len(upto))
        if span is None:  # template not prefix-stable: find the content itself
            start = full.find(message["content"], cursor)
            if start < 0:
                raise TemplateError("the chat template dropped an assistant turn's text; "
                                    "check the model's template or use another format")
            end = start + len(message["content"])
            eos = tokenizer.eos_token or ""
            if eos and full.startswith(eos, end):
                end += len(eos)
            span = (start, end)
        spans.append(span)
        cursor = span[1]
    return full, spans


def truncate(examples: list[Tokenized], seq_len: int) -> tuple[list[Tokenized], int, int]:
    """Examples cut to `seq_len`, how many were cut, and how many were dropped (nothing to learn)."""
    kept, cut, dropped = [], 0, 0
    for example in examples:
        if len(example.input_ids) <= seq_len:
            kept.append(example)
            continue
        cut += 1
        short = Tokenized(example.line, example.input_ids[:seq_len], example.labels[:seq_len])
        if short.trained_tokens:
            kept.append(short)
        else:
            dropped += 1
    return kept, cut, dropped
