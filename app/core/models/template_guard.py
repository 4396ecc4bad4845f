"""A model's chat template is untrusted input: it comes with a downloaded model, and Jinja's sandbox
stops attribute access and huge ranges but not memory or time (`{% set s = 'x' * 1000000000 %}`
grew a check to 13.5 GB; three nested loops ran for minutes). Before Tunesmith renders a template,
`check_template` renders it on a few probe conversations (one turn to 64, a system prompt, long
content) in a child process within limits: at most LIMIT_CHARS of output, LIMIT_S seconds, and
LIMIT_BYTES of memory (an address-space limit where the platform has one; Windows gets the time
cap alone). A template past one is refused in one line and never rendered here; the verdict is
kept per template for the process. What the probes cannot show (a template that misbehaves only
on conversations unlike them) is the limit of this guard.

The sandbox is set up as transformers sets up its own (trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `tojson`, `strftime_now`): `compile_template` is shared with fast_lengths.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from datetime import datetime

from app.core.errors import ModelError
from app.core.portable import python_command

LIMIT_CHARS = 2_000_000  # a 64-turn probe renders to ~40,000 characters with any real template
LIMIT_S = 10.0
LIMIT_BYTES = 1 << 30
_VERDICTS: dict[str, str] = {}  # template hash -> "" (fine) or the problem


def compile_template(source: str):
    """`source` compiled in a sandbox set up like transformers' (see the module's docstring)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def template_problem(source: str) -> str:
    """"" when `source` renders every probe within the limits; else what it passed."""
    key = hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()
    if key not in _VERDICTS:
        _VERDICTS[key] = _try_in_child(source)
    return _VERDICTS[key]


def check_template(source, where: str) -> None:
    """ModelError naming `where` (the model or tokenizer folder) when a template of `source` (a
    string, or transformers' dict of named templates) is past a limit."""
    sources = source.values() if isinstance(source, dict) else [source]
    for text in sources:
        if isinstance(text, str) and text:
            problem = template_problem(text)
            if problem:
                raise ModelError(f"{where}: the model's chat template {problem}: it is not used. Use a model "
                                 "whose template is sound, or replace chat_template in its tokenizer_config.json")


def _try_in_child(source: str) -> str:
    command = python_command("-m", "app.core.models.template_guard")
    try:
        done = subprocess.run(command, input=json.dumps({"template": source}), capture_output=True, text=True,
                              timeout=LIMIT_S + 5, encoding="utf-8")
    except subprocess.TimeoutExpired:
        return f"ran longer than {LIMIT_S:.0f} s on a short conversation"
    verdict = (done.stdout.strip().splitlines() or [""])[-1]
    try:
        answer = json.loads(verdict)
    except ValueError:
        answer = {}
    if done.returncode == 0 and "problem" in answer:
        return answer["problem"]
    if "MemoryError" in done.stderr or done.returncode in (-9, 137):
        return f"needed more than {LIMIT_BYTES >> 20} MiB of memory on a short conversation"
    if done.returncode in (-24, 152) or "CPU time" in done.stderr:  # SIGXCPU
        return f"ran longer than {LIMIT_S:.0f} s on a short conversation"
    if "RecursionError" in done.stderr:
        return "recursed without end on a short conversation"
    return f"could not be tried ({(done.stderr.strip().splitlines() or ['no output'])[-1][:160]})"


def _probes() -> list[tuple[list[dict], bool]]:
    turn = [{"role": "user", "content": "What is 7 plus 5?"}, {"role": "assistant", "content": "12."}]
    long = "A long answer. " * 700
    return [(turn[:1], True), (turn, False),
            ([{"role": "system", "content": "Be brief."}] + turn, False),
            (turn * 32, False), ([turn[0], {"role": "assistant", "content": long}], False)]


def _child() -> None:
    """In the child: set the limits, render every probe, print {"problem": ...} ("" when fine)."""
    import jinja2

    if sys.platform != "win32":
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))
        resource.setrlimit(resource.RLIMIT_CPU, (int(LIMIT_S), int(LIMIT_S) + 1))
    sys.setrecursionlimit(2000)
    source = json.loads(sys.stdin.read())["template"]
    problem = ""
    try:
        template = compile_template(source)
        for messages, generation in _probes():
            try:
                text = template.render(messages=messages, add_generation_prompt=generation, bos_token="<s>",
                                       eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
            except (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError, IndexError):
                continue  # a template may refuse a conversation: that is said where it is used
            if len(text) > LIMIT_CHARS:
                problem = f"produced more than {LIMIT_CHARS:,} characters for a short conversation"
                break
    except jinja2.exceptions.TemplateSyntaxError:
        problem = ""  # not ours to judge: transformers reports it where the template is used
    except RecursionError:
        problem = "recursed without end on a short conversation"
    except MemoryError:
        problem = f"needed more than {LIMIT_BYTES >> 20} MiB of memory on a short conversation"
    print(json.dumps({"problem": problem}), flush=True)


if __name__ == "__main__":
    _child()
