"""The outside suite, chat templates: a model's template is untrusted input. The audit's three that took
a machine down (a gigabyte string, nested loops, recursion without end) each end `check-data` in one
line within the time cap, the processes' memory under 2 GB; a sound template is unaffected."""

from __future__ import annotations

import os
import shutil
import signal
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


# A process's peak RSS (ru_maxrss) starts at its parent's: Linux carries the high-water mark across
# fork and exec, so a child of pytest "reaches" whatever pytest reached after the tests before it (CI
# saw 3.3 GiB for every template). This small launcher, started fresh, forks the command itself and
# reports wait4's figure for it: the command's own peak and that of the processes it waited for.
LAUNCHER = """
import os, signal, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
if os.WIFSIGNALED(status):
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(args, folder, timeout):
    """Run `args` to its end; its exit code, stderr and the peak resident memory (KiB) of it and the
    processes it waited for, not of pytest or any other test's children."""
    peak = folder / "peak_kib"
    with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
        process = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(peak), *args], cwd=REPO,
                                   stdout=out, stderr=err, start_new_session=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, (folder / "stderr").read_text(), int(peak.read_text())


def test_the_measure_is_the_commands_own_not_its_parents(tmp_path):
    ballast = bytearray(1024 * 2**20)  # pytest itself now holds 1 GiB
    ballast[::4096] = b"\x01" * len(ballast[::4096])
    touch_300_mib = "x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096])"
    code, _, peak_kib = run_measured([sys.executable, "-c", touch_300_mib], tmp_path, timeout=60)
    del ballast
    assert code == 0 and 300 * 2**10 < peak_kib < 600 * 2**10, peak_kib


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_template_is_one_line_within_the_caps(name, tiny_model, tmp_path):
    template, said = HOSTILE[name]
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").write_text(template)
    started = time.monotonic()
    code, stderr, peak_kib = run_measured([sys.executable, "-m", "app", "check-data",
                                           str(EXAMPLES / "messages.jsonl"), "--model", str(model)],
                                          tmp_path, timeout=120)
    took = time.monotonic() - started
    assert code == 2, stderr[-2000:]
    [line] = stderr.strip().splitlines()
    assert f"{model}: the model's chat template {said}" in line and "it is not used" in line, line
    assert took < 40  # the 10 s cap, plus starting Python twice and loading the tokenizer
    assert peak_kib < 2 * 2**20, f"a process reached {peak_kib / 2**20:.1f} GiB"


def test_a_sound_template_is_tried_once_and_used(tiny_model):
    from app.core.models import template_guard

    source = (tiny_model / "chat_template.jinja").read_text()
    assert template_guard.template_problem(source) == ""
    started = time.monotonic()
    assert template_guard.template_problem(source) == ""  # the verdict is kept: no second child
    assert time.monotonic() - started < 0.01
