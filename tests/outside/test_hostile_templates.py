"""The outside suite, chat templates: a model's template is untrusted input. The audit's three that took
a machine down (a gigabyte string, nested loops, recursion without end) each end `check-data` in one
line within the time cap, the processes' memory under 2 GB; a sound template is unaffected."""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import time

import pytest

from conftest import EXAMPLES, REPO

HOSTILE = {
    "huge string": ("{% set s = 'x' * 1000000000 %}{% for m in messages %}{{ m['content'] }}{% endfor %}",
                    "needed more than 1024 MiB of memory"),
    "nested loops": ("{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
                     "{% endfor %}{% endfor %}{% endfor %}{% for m in messages %}{{ m['content'] }}{% endfor %}",
                     "ran longer than 10 s"),
    "deep recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"
                       "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                       "recursed without end"),
    "endless output": ("{% for a in range(100000) %}{% for b in range(100) %}{{ 'yo ho ho ' }}{% endfor %}"
                       "{% endfor %}", "produced more than 2,000,000 characters"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_template_is_one_line_within_the_caps(name, tiny_model, tmp_path):
    template, said = HOSTILE[name]
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").write_text(template)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "app", "check-data", str(EXAMPLES / "messages.jsonl"),
                           "--model", str(model)], cwd=REPO, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    [line] = done.stderr.strip().splitlines()
    assert f"{model}: the model's chat template {said}" in line and "it is not used" in line, line
    assert took < 40  # the 10 s cap, plus starting Python twice and loading the tokenizer
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB, every process so far
    assert peak_kib < 2 * 2**20, f"a process reached {peak_kib / 2**20:.1f} GiB"


def test_a_sound_template_is_tried_once_and_used(tiny_model):
    from app.core.models import template_guard

    source = (tiny_model / "chat_template.jinja").read_text()
    assert template_guard.template_problem(source) == ""
    started = time.monotonic()
    assert template_guard.template_problem(source) == ""  # the verdict is kept: no second child
    assert time.monotonic() - started < 0.01
