"""Forgetting probes: short general questions with answers a program can check, asked of the base
model and of the tuned one with greedy decoding. A model tuned too hard on one task loses what it
knew ("7 plus 5 is 23"); the probes say so in one line with both scores.

A probe file is JSONL, one probe a line: `prompt` (asked as the user's turn), `answer`, `match`
(how the answer is checked), optional `kind` (a label the report groups by), `tolerance` (for
numbers) and `reject` (words the answer must not contain). Matches:

- `number`: the first or the last number of the answer's first line equals `answer` (within
  `tolerance`): "12", "7 + 5 = 12" and "The answer is 12." are all right for 12.
- `word`: `answer` appears in the answer as a whole word or phrase, any case.
- `exact`: the whole answer is `answer`, any case, quotes, spaces and a final full stop aside.
- `regex`: `answer` is a Python regular expression searched in the answer (case matters; `(?i)`
  at its start ignores it).
- `no_refusal`: the answer is not empty and does not refuse ("I can't help with that").

The built-in set (resources/probes/general.jsonl, 50 probes written for Tunesmith: arithmetic, unit
conversion, capitals, spelling, following a format, not refusing harmless requests) is every run's;
`--probes FILE` adds the user's own.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from app.core.eval.lines import read_objects
from app.core.resources import resources_dir

MATCHES = ("number", "word", "exact", "regex", "no_refusal")
BUILTIN_NAME = "general questions"
PROBE_TOKENS = 16  # an answer's longest: the probes ask for a word, a number or a short line

_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_REFUSAL = re.compile(r"\b(i\s+(?:can ?not|can't|cannot|won't|will not|am unable|am not able|must decline)|"
                      r"i'm\s+(?:sorry|unable|not able)|i am sorry|as an ai\b|not able to (?:help|assist)|"
                      r"(?:can't|cannot) (?:help|assist|provide)|i apologi[sz]e)", re.IGNORECASE)


@dataclass(frozen=True)
class Probe:
    line: int
    prompt: str
    answer: object  # a number for `number`, else a string
    match: str
    kind: str = ""
    tolerance: float = 0.0
    reject: tuple[str, ...] = ()

    def right(self, reply: str) -> bool:
        """Whether `reply` answers the probe (see the module's docstring for each match)."""
        text = reply.strip()
        if any(_has_word(text, word) for word in self.reject):
            return False
        if self.match == "number":
            numbers = [float(n.replace(",", "")) for n in _NUMBER.findall(_first_line(text))]
            limit = self.tolerance or 1e-9 * max(1.0, abs(float(self.answer)))
            return any(abs(n - float(self.answer)) <= limit for n in numbers[:1] + numbers[-1:])
        if self.match == "word":
            return _has_word(text, str(self.answer))
        if self.match == "exact":
            return _plain(text) == _plain(str(self.answer))
        if self.match == "regex":
            return re.search(str(self.answer), text) is not None
        return bool(text) and _REFUSAL.search(text) is None  # no_refusal


@dataclass
class ProbeSet:
    name: str
    file: str
    probes: list[Probe] = field(default_factory=list)


def builtin_probes() -> ProbeSet:
    path = resources_dir() / "probes" / "general.jsonl"
    return ProbeSet(BUILTIN_NAME, str(path), load_probes(path))


def probe_sets(extra: str = "") -> list[ProbeSet]:
    """The built-in probes, and the user's file when given."""
    sets = [builtin_probes()]
    if extra:
        sets.append(ProbeSet(f"your probes ({Path(extra).name})", str(Path(extra).resolve()), load_probes(extra)))
    return sets


def load_probes(path: str | Path) -> list[Probe]:
    """Every probe of a JSONL file; a bad line raises one DatasetError naming it (and how many more)."""
    return read_objects(path, _probe, "no such probe file; give a JSONL file of probes (see `tunesmith eval --help`)",
                        "cannot read the probe file ({err})",
                        'no probes in the file; one JSON object a line: {"prompt": "...", "answer": "...", '
                        '"match": "word"}')


@dataclass
class SetScore:
    """One probe set asked of base and tuned: who got each probe right."""

    name: str
    file: str
    probes: list[Probe]
    base_answers: list[str]
    tuned_answers: list[str]

    @property
    def base_right(self) -> list[bool]:
        return [p.right(a) for p, a in zip(self.probes, self.base_answers)]

    @property
    def tuned_right(self) -> list[bool]:
        return [p.right(a) for p, a in zip(self.probes, self.tuned_answers)]

    @property
    def verdict(self) -> str:
        """"forgotten", "better" or "kept": a change of at least 3 probes and a tenth of the set counts."""
        base, tuned, total = sum(self.base_right), sum(self.tuned_right), len(self.probes)
        margin = max(3, math.ceil(total / 10))
        if base - tuned >= margin:
            return "forgotten"
        if tuned - base >= margin:
            return "better"
        return "kept"

    def line(self) -> str:
        """The one line the CLI, the log and the window show."""
        base, tuned, total = sum(self.base_right), sum(self.tuned_right), len(self.probes)
        head = f"{self.name}: base {base}/{total}, tuned {tuned}/{total}"
        if self.verdict == "forgotten":
            worst = self._worst_kind()
            return (f"{head} — the tuned model has forgotten{worst}; try fewer steps, a lower learning rate or a "
                    "smaller rank")
        if self.verdict == "better":
            return f"{head} — the tuned model answers more of them"
        return f"{head} — kept what it knew"

    def by_kind(self) -> dict[str, tuple[int, int, int]]:
        """kind -> (probes, base right, tuned right)."""
        kinds: dict[str, list[int]] = {}
        for probe, base, tuned in zip(self.probes, self.base_right, self.tuned_right):
            row = kinds.setdefault(probe.kind or "other", [0, 0, 0])
            row[0], row[1], row[2] = row[0] + 1, row[1] + base, row[2] + tuned
        return {kind: (n, b, t) for kind, (n, b, t) in kinds.items()}

    def _worst_kind(self) -> str:
        kinds = [(b - t, kind, n, b, t) for kind, (n, b, t) in self.by_kind().items() if b > t]
        if not kinds:
            return ""
        _, kind, n, b, t = max(kinds)
        return f" (most on {kind}: {b}/{n} -> {t}/{n})"

    def to_dict(self) -> dict:
        return {"name": self.name, "file": self.file, "total": len(self.probes), "base": sum(self.base_right),
                "tuned": sum(self.tuned_right), "verdict": self.verdict, "line": self.line(),
                "by_kind": {k: {"probes": n, "base": b, "tuned": t} for k, (n, b, t) in self.by_kind().items()},
                "items": [{"line": p.line, "kind": p.kind, "prompt": p.prompt, "expected": p.answer, "match": p.match,
                           "base": a, "tuned": b, "base_right": ra, "tuned_right": rb}
                          for p, a, b, ra, rb in zip(self.probes, self.base_answers, self.tuned_answers,
                                                     self.base_right, self.tuned_right)]}


def _probe(record, line: int) -> Probe:
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object with 'prompt', 'answer' and 'match'")
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("'prompt' must be a non-empty string (the question)")
    match = record.get("match")
    if "answer" not in record and match != "no_refusal":
        raise ValueError("'answer' is missing: give the answer to check (a number, or text for 'match': word, exact "
                         "or regex)")
    answer = record.get("answer", "")
    match = match or ("number" if isinstance(answer, (int, float)) else "word")
    if match not in MATCHES:
        raise ValueError(f"'match' is {match!r}; use one of {', '.join(MATCHES)}")
    if match == "number":
        try:
            answer = float(str(answer).replace(",", ""))
        except ValueError:
            raise ValueError(f"'answer' {answer!r} is not a number, which 'match': 'number' needs") from None
    elif match != "no_refusal" and (not isinstance(answer, str) or not answer.strip()):
        raise ValueError(f"'answer' must be a non-empty string for 'match': '{match}'")
    if match == "regex":
        try:
            re.compile(answer)
        except re.error as err:
            raise ValueError(f"'answer' is not a valid regular expression ({err})") from None
    tolerance = record.get("tolerance", 0)
    if not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise ValueError("'tolerance' must be a number of 0 or more")
    reject = record.get("reject", [])
    if isinstance(reject, str):
        reject = [reject]
    if not isinstance(reject, list) or not all(isinstance(word, str) and word for word in reject):
        raise ValueError("'reject' must be a list of words the answer must not contain")
    return Probe(line, prompt, answer, match, str(record.get("kind", "")), float(tolerance), tuple(reject))


def _first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word.strip())}(?!\w)", text, re.IGNORECASE) is not None


def _plain(text: str) -> str:
    text = text.strip().strip("`\"'“”‘’ ").rstrip(".!").strip("`\"'“”‘’ ")
    return " ".join(text.casefold().split())
