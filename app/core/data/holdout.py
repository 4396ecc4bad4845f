"""The held-out examples a run is judged on: by default a slice of the training file, chosen by
the seed, whole groups of examples that ask the same thing at a time, so that a prompt repeated
(or nearly: case, spacing and punctuation aside) is never on both sides; and the exact duplicates
and train/eval overlaps the dataset check reports.
"""

from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass

from app.core.data.formats import Example
from app.core.data.tokenize import Tokenized

AUTO_PERCENT = 5.0
AUTO_MIN, AUTO_MAX = 8, 200
AUTO_SMALLEST_SET = 5 * AUTO_MIN  # below this, holding 8 out would take more than a fifth of the set


@dataclass(frozen=True)
class HoldOut:
    """Which examples (by index into the examples given) are held out, and why that many."""

    held: frozenset[int]
    reason: str


def _normal(text: str) -> str:
    """Text compared as a reader would: case, accents' forms, spacing and punctuation aside."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


def prompt_key(example: Example) -> str:
    """What an example asks: its system and user turns (chats), its prompt, or, for plain text, the
    text itself. Examples with the same key are one group and never straddle train and eval."""
    if example.messages:
        asked = [str(m.get("content", "")) for m in example.messages if m.get("role") in ("system", "user")]
        return _normal("\n".join(asked)) or _normal(str(example.messages[0].get("content", "")))
    if example.prompt:
        return _normal(example.prompt)
    return _normal(example.text or example.completion)


def content_key(example: Example) -> str:
    """The whole example, exactly (an exact duplicate has the same)."""
    if example.is_pair:
        return "\x1d".join("\x1e".join(f"{m['role']}\x1f{m['content']}" for m in turns)
                           for turns in (example.messages, example.chosen, example.rejected))
    if example.messages:
        return "\x1e".join(f"{m.get('role')}\x1f{m.get('content')}" for m in example.messages)
    return f"{example.prompt}\x1f{example.completion}\x1f{example.text}"


def auto_count(examples: int) -> tuple[int, str]:
    """How many to hold out when the user said nothing: 5 %, at least 8, at most 200; none when the
    set is too small to spare them."""
    if examples < AUTO_SMALLEST_SET:
        return 0, (f"no held-out examples: {examples} are too few to spare {AUTO_MIN} "
                   f"(at least {AUTO_SMALLEST_SET} needed); give eval data to judge the run")
    count = min(AUTO_MAX, max(AUTO_MIN, round(examples * AUTO_PERCENT / 100)))
    return count, f"{AUTO_PERCENT:g} % of the examples (at least {AUTO_MIN}, at most {AUTO_MAX})"


def hold_out(examples: list[Example], percent: float | None, seed: int) -> HoldOut:
    """Choose the held-out examples: `percent` % of them (None: the automatic share, 0: none), whole
    prompt groups at a time in an order the seed decides, so the same seed holds out the same ones."""
    if percent is None:
        count, why = auto_count(len(examples))
    elif percent <= 0 or len(examples) < 2:
        count, why = 0, "no held-out examples (set by you)"
    else:
        count = min(len(examples) - 1, max(1, round(len(examples) * percent / 100)))
        why = f"{percent:g} % of the examples (set by you)"
    if not count:
        return HoldOut(frozenset(), why)
    groups: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(prompt_key(example), []).append(index)
    order = sorted(groups)  # the file's order does not decide, the seed does
    random.Random(seed).shuffle(order)
    held: list[int] = []
    for key in order:
        members = groups[key]
        if len(members) > count:
            continue  # a prompt repeated more often than the share stays in training, whole
        held += members
        if len(held) >= count:
            break  # at most one group over the share
    if not held or len(held) >= len(examples):  # a prompt or two repeated throughout the set
        return HoldOut(frozenset(), "no held-out examples: the examples repeat so few prompts that none can be "
                                    "held out without its twin in training; give eval data to judge the run")
    grouped = len(held) - len({prompt_key(examples[i]) for i in held})
    extra = f"; {grouped} repeat{'s' * (grouped != 1)} of a held-out prompt held out with it" if grouped else ""
    return HoldOut(frozenset(held), f"{len(held)} of {len(examples)} held out: {why}, whole prompts at a time{extra}")


def exact_duplicates(examples: list[Example]) -> list[tuple[int, int]]:
    """(line, line of its first copy) for every example that repeats an earlier one exactly."""
    first: dict[str, int] = {}
    repeats = []
    for example in examples:
        key = content_key(example)
        if key in first:
            repeats.append((example.line, first[key]))
        else:
            first[key] = example.line
    return repeats


def overlap(train: list[Example], held: list[Example]) -> list[tuple[int, int]]:
    """(eval line, training line) for each eval example whose prompt is also in the training data."""
    seen: dict[str, int] = {}
    for example in train:
        seen.setdefault(prompt_key(example), example.line)
    return [(example.line, seen[key]) for example in held if (key := prompt_key(example)) in seen]


def lines_text(pairs: list[tuple[int, int]], limit: int = 3) -> str:
    """'line 9 = line 2, line 14 = line 3 and 4 more'."""
    shown = ", ".join(f"line {a} = line {b}" for a, b in pairs[:limit])
    more = len(pairs) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def training_lengths(rows: list[Example] | None, lengths: list[int], percent: float | None,
                     seed: int) -> tuple[list[int], HoldOut | None]:
    """The token lengths the run will train on once its held-out examples are set aside (a plan
    before the run), and the hold-out. `lengths` are the usable rows' in order; where they are not
    one per row (rows the chat template rejected), the rows that tokenised are not known and the
    share is taken from the end."""
    if rows is not None and len(rows) == len(lengths):
        choice = hold_out(rows, percent, seed)
        return [n for i, n in enumerate(lengths) if i not in choice.held], choice
    count = len(hold_out(rows or [], percent, seed).held) if rows else 0
    return (lengths[:-count] if count else lengths), None


def split_tokenized(rows: list[Example], examples: list[Tokenized], percent: float | None,
                    seed: int) -> tuple[list[Tokenized], list[Tokenized], str]:
    """(train, held out, why): `percent` % of the examples held out (None: the automatic share),
    whole prompt groups at a time, chosen by the seed (hold_out). `rows` are the file's examples,
    `examples` the same tokenised (rows that failed to tokenise are not among them)."""
    by_line = {row.line: row for row in rows}
    usable = [by_line[e.line] for e in examples if e.line in by_line]
    choice = hold_out(usable, percent, seed)
    held_lines = {usable[i].line for i in choice.held}
    return ([e for e in examples if e.line not in held_lines], [e for e in examples if e.line in held_lines],
            choice.reason)
