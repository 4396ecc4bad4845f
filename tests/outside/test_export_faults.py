"""The outside suite, exports: the CLI as a subprocess, killed at each rename of replacing an earlier
export and mid-write, met by a second export while it writes, and writing onto a real disk too
small for it. What is held: `--out` is the old export or the new one after the next command, never
missing; nothing a killed export left survives the next one; every failure is one line, exit 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

FAULTS = Path(__file__).with_name("faults.py")


def tunesmith(*args: str, fault: str = "", flag: Path | None = None, wait: bool = True):
    plain = [sys.executable, *args] if args[:1] == ("-c",) else [sys.executable, "-m", "app", *args]
    command = [sys.executable, str(FAULTS), fault, "--", *args] if fault else plain
    env = dict(os.environ, FAULT_FLAG=str(flag or ""))
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def export_state(out: Path) -> str:
    """"new"/"old" by the marker's source note, after checking the export is whole."""
    marker = json.loads((out / ".tunesmith-export").read_text())
    for name, entry in marker["files"].items():
        assert (out / name).stat().st_size == entry["bytes"], name
    return marker["format"]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.parametrize("fault, missing_between", [
    ("kill:replace:1:.old|", False),  # before the earlier export is moved aside
    ("kill:replace:1:.tmp -> {out}|", True),  # moved aside, the new one not yet in place
    ("kill:rmtree:1:.old|", False),  # swapped, the earlier one not yet removed
])
def test_killed_at_each_step_of_the_swap_the_next_export_finds_old_or_new_never_nothing(
        tiny_run, tmp_path, fault, missing_between):
    out = tmp_path / "exp"
    assert tunesmith("export", tiny_run.run_id, "--format", "adapter", "--out", str(out)).returncode == 0
    killed = tunesmith("export", tiny_run.run_id, "--format", "merged", "--dtype", "f32", "--out", str(out),
                       "--force", fault=fault.format(out=out))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert out.exists() != missing_between
    assert leftovers(out)  # the killed export left its folders (and lock file) behind
    again = tunesmith("export", tiny_run.run_id, "--format", "merged", "--dtype", "f32", "--out", str(out), "--force")
    assert again.returncode == 0, again.stderr[-2000:]
    assert export_state(out) == "merged"
    assert leftovers(out) == []
    if missing_between:
        assert "finished replacing the earlier export, which a stopped export had left half done" in again.stderr
    else:
        assert "a stopped export had left beside exp" in again.stderr


def test_killed_while_writing_its_staging_folder_is_removed_by_the_next_export_and_counted(tiny_run, tmp_path):
    out = tmp_path / "exp"
    killed = tunesmith("export", tiny_run.run_id, "--format", "merged", "--dtype", "f32", "--out", str(out),
                       fault="kill:replace:1:README.md|")
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists() and any(name.endswith(".tmp") for name in leftovers(out))
    again = tunesmith("export", tiny_run.run_id, "--format", "adapter", "--out", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "removed 1 folder a stopped export had left beside exp (" in again.stderr
    assert export_state(out) == "adapter" and leftovers(out) == []


def test_a_second_export_into_the_same_folder_is_refused_while_the_first_writes(tiny_run, tmp_path):
    out, flag = tmp_path / "exp", tmp_path / "flag"
    first = tunesmith("export", tiny_run.run_id, "--format", "adapter", "--out", str(out), fault="pause:copy2:1:",
                      flag=flag, wait=False)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        second = tunesmith("export", tiny_run.run_id, "--format", "adapter", "--out", str(out))
        assert second.returncode == 2
        [line] = second.stderr.strip().splitlines()
        assert f"another export is writing {out} (process {first.pid}" in line
    finally:
        first.kill()
        first.wait()
    third = tunesmith("export", tiny_run.run_id, "--format", "adapter", "--out", str(out))
    assert third.returncode == 0, third.stderr[-2000:]
    assert export_state(out) == "adapter" and leftovers(out) == []


@pytest.mark.parametrize("fmt, size", [("merged", "256k"),  # safetensors' writer fails (tensor_merge.py)
                                       ("gguf", "448k")])  # the merge fits, the GGUF writer fails
def test_a_disk_that_fills_up_while_an_export_is_written_is_one_line_and_nothing_stays(tiny_run, tmp_path, fmt,
                                                                                        size):
    """A real tmpfs just too small; the free-space check before writing is passed by a wrapper that
    reports plenty (a disk filling up from elsewhere while the export runs cannot be staged otherwise)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()[:80]})")
    try:
        report_plenty = ("import shutil, sys; shutil.disk_usage = lambda p: shutil._ntuple_diskusage(2**40, 0, 2**40);"
                         " from app.launch import main; sys.exit(main(sys.argv[1:]))")
        extra = ["--quant", "f16"] if fmt == "gguf" else ["--dtype", "f32"]
        failed = subprocess.run([sys.executable, "-c", report_plenty, "export", tiny_run.run_id, "--format", fmt,
                                 "--out", str(mount / "exp"), *extra], cwd=REPO, capture_output=True, text=True,
                                timeout=300)
        assert failed.returncode == 2, failed.stderr[-3000:]
        [line] = [line for line in failed.stderr.strip().splitlines() if "error" in line]
        assert "the disk filled up while the export was written" in line and "nothing was kept" in line
        assert "Traceback" not in failed.stderr
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        shutil.rmtree(mount, ignore_errors=True)
