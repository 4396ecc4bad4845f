"""Turn examples into token ids and labels, with loss taken only where the model should learn.

Chat examples are rendered with the model's chat template (or `DEFAULT_CHAT_TEMPLATE`, a plain
ChatML template, when the model has none) and only the assistant turns, including the token that
ends each turn, carry labels. Prompt/completion examples learn the completion and the end token;
plain text learns everything. Truncation to the sequence length happens later, once it is planned.

A preference pair is one `Tokenized` of both sides end to end: the shared conversation with the
chosen continuation, then the same conversation with the rejected one (`split` is where the second
starts). Each side learns only its own continuation's assistant turns; packed, each side attends
only to itself (packing.collate_packed), padded, each is a row of its own.
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
    split: int = 0  # a preference pair: where the rejected side starts (0: one sequence)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)

    def sides(self) -> list[tuple[int, int]]:
        """[start, end) of each sequence in `input_ids`: one, or a pair's chosen and rejected."""
        if not self.split:
            return [(0, len(self.input_ids))]
        return [(0, self.split), (self.split, len(self.input_ids))]

    def side(self, index: int) -> "Tokenized":
        """One sequence of a pair (0: chosen, 1: rejected) as an example of its own."""
        start, end = self.sides()[index]
        return Tokenized(self.line, self.input_ids[start:end], self.labels[start:end])


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
            result.examples.append(tokenize_one(tokenizer, example))
        except TemplateError as err:
            result.problems.append(Problem(file, example.line, "messages", str(err)))
    return result


def tokenize_one(tokenizer, example: Example) -> Tokenized:
    """One example (or preference pair) as training sees it, untruncated."""
    if not example.is_pair:
        return Tokenized(example.line, *tokenize_example(tokenizer, example))
    chosen = _tokenize_chat(tokenizer, example.messages + example.chosen, len(example.messages))
    rejected = _tokenize_chat(tokenizer, example.messages + example.rejected, len(example.messages))
    return Tokenized(example.line, chosen[0] + rejected[0], chosen[1] + rejected[1], split=len(chosen[0]))


def answers_of(examples: list[Tokenized]) -> list[Tokenized]:
    """The examples as an answer's loss judges them: each one, a preference pair by its chosen side."""
    return [example.side(0) if example.split else example for example in examples]


class TemplateError(Exception):
    """The chat template could not render an example."""


def tokenize_example(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """Ids and labels of one example, untruncated (a pair's: both sides end to end)."""
    if example.is_pair:
        pair = tokenize_one(tokenizer, example)
        return pair.input_ids, pair.labels
    if example.messages:
        return _tokenize_chat(tokenizer, example.messages, 0)
    if example.format == "prompt_completion":
        end = example.prompt + example.completion + (tokenizer.eos_token or "")
        text, spans, special = end, [(len(example.prompt), len(end))], True
    else:
        text = example.text + (tokenizer.eos_token or "")
        spans, special = [(0, len(text))], True
    return _encode(tokenizer, text, spans, special)


def _tokenize_chat(tokenizer, messages: list[dict], learn_from: int) -> tuple[list[int], list[int]]:
    """A conversation's ids, learning its assistant turns from message `learn_from` on."""
    text, spans = _render_chat(tokenizer, messages, learn_from)
    return _encode(tokenizer, text, spans, False)


def _encode(tokenizer, text: str, spans: list[tuple[int, int]], special: bool) -> tuple[list[int], list[int]]:
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


def _render_chat(tokenizer, messages: list[dict], learn_from: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The full text and the character spans of each assistant turn from message `learn_from` on
    (with its end-of-turn text)."""
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
        cursor = span[1]
        if i >= learn_from:
            spans.append(span)
    return full, spans


def truncate(examples: list[Tokenized], seq_len: int) -> tuple[list[Tokenized], int, int]:
    """Examples cut to `seq_len`, how many were cut, and how many were dropped (nothing to learn)."""
    kept, cut, dropped = [], 0, 0
    for example in examples:
        if len(example.input_ids) <= seq_len:
            kept.append(example)
            continue
        cut += 1
        short = _cut_pair(example, seq_len) if example.split else \
            Tokenized(example.line, example.input_ids[:seq_len], example.labels[:seq_len])
        if short is not None and short.trained_tokens:
            kept.append(short)
        else:
            dropped += 1
    return kept, cut, dropped


def _cut_pair(pair: Tokenized, seq_len: int) -> Tokenized | None:
    """A pair cut to `seq_len` tokens in all: each side keeps its start (the shared conversation), the
    shorter side whole when it fits in half, the longer the rest; None when a side has nothing left to learn."""
    chosen, rejected = pair.side(0), pair.side(1)
    half = seq_len // 2
    short = min(len(chosen.input_ids), len(rejected.input_ids))
    caps = (min(short, half), seq_len - min(short, half))
    cap_c, cap_r = caps if len(chosen.input_ids) <= len(rejected.input_ids) else caps[::-1]
    sides = [Tokenized(pair.line, s.input_ids[:cap], s.labels[:cap]) for s, cap in ((chosen, cap_c), (rejected, cap_r))]
    if not all(side.trained_tokens for side in sides):
        return None
    return Tokenized(pair.line, sides[0].input_ids + sides[1].input_ids, sides[0].labels + sides[1].labels,
                     split=len(sides[0].input_ids))
