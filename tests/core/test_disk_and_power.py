"""A full disk ends a run cleanly with its last checkpoint intact and resumable; a checkpoint
torn by a power loss is never trusted; kill -9 at any moment never costs the run."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import app.core.train.failures as failures
from app.core.events import CheckpointSaved, LogLine
from app.core.runs import open_run
from app.core.train.trainer import resume_training
from conftest import REPO


def test_too_little_free_space_for_a_checkpoint_ends_the_run_failed_and_resumable(tiny_model, chat_data,
                                                                                  monkeypatch):
    """The free-space check before a checkpoint (disk_usage is replaced: no disk here is full)."""
    real = shutil.disk_usage
    full = lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 5_000_000, 5_000_000)  # noqa: E731
    monkeypatch.setattr(shutil, "disk_usage", full)
    result = _train(tiny_model, chat_data, steps=6, save_every=2)
    assert result.status == "failed" and result.step == 2
    assert re.match(r"disk full: a checkpoint needs about \d+ MiB free at ", result.reason), result.reason
    assert "there are 5 MiB; free some space, then resume (the last checkpoint is intact)" in result.reason
    run = open_run(result.run_id)
    assert run.status()["status"] == "failed" and run.checkpoints() == []
    assert "Traceback" not in run.status()["reason"]
    monkeypatch.setattr(shutil, "disk_usage", real)
    assert resume_training(result.run_id).status == "finished"


def test_a_really_full_disk_mid_checkpoint_keeps_the_last_good_one(tiny_model, chat_data, tmp_path, monkeypatch):
    """ENOSPC for real: the run store on a 16 MB tmpfs filled up after the first checkpoint."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()[:80]}); the free-space "
                    "check is tested above")
    try:
        monkeypatch.setenv("TUNESMITH_HOME", str(mount / "home"))
        # let the check pass, so that the checkpoint itself meets the full disk
        monkeypatch.setattr(failures, "CHECKPOINT_SPACE_FACTOR", 0.0)
        monkeypatch.setattr(failures, "CHECKPOINT_SPACE_SLACK", 0)
        filler = mount / "filler"

        def fill(event):
            if isinstance(event, CheckpointSaved) and event.step == 2:
                with open(filler, "wb") as handle:
                    try:
                        while True:
                            handle.write(b"\0" * 65536)
                            handle.flush()
                    except OSError:
                        pass
                with open(filler, "rb+") as handle:  # leave room for status.json, not a checkpoint
                    handle.truncate(max(0, filler.stat().st_size - 12_000))

        result = _train(tiny_model, chat_data, steps=6, save_every=2, on_event=fill)
        assert result.status == "failed" and result.step == 4, result.reason
        assert result.reason.startswith("disk full at step 4 (needs ") and "free some space, then resume" in result.reason
        run = open_run(result.run_id)
        assert [p.name for p in run.checkpoints()] == ["step-0000002"]
        assert run.verified_checkpoint() == run.checkpoints()[0]
        assert not [p for p in run.checkpoints_dir.iterdir() if p.name.startswith(".")]  # no half checkpoint
        assert run.status()["status"] in ("failed", "interrupted")  # "failed" when status.json still fitted
        filler.unlink()
        resumed = resume_training(result.run_id)
        assert (resumed.status, resumed.step) == ("finished", 6)
        steps = [e["step"] for e in open_run(result.run_id).events() if e["event"] == "StepMetrics"]
        assert steps == list(range(1, 7))
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_torn_checkpoint_is_skipped_for_the_one_before(tiny_model, chat_data):
    result = _train(tiny_model, chat_data, steps=6, save_every=2, stop_at=4)
    run = open_run(result.run_id)
    newest = run.checkpoints()[-1]
    assert newest.name == "step-0000004" and json.loads((newest / "manifest.json").read_text())["files"]
    # a power loss after state.json but before the tensors reached the disk: same size, other bytes
    optimizer = newest / "optimizer.pt"
    size = optimizer.stat().st_size
    optimizer.write_bytes(b"\0" * size)
    said = []
    assert run.verified_checkpoint(said.append).name == "step-0000002"
    assert said == ["Checkpoint step-0000004 is damaged (optimizer.pt does not match its checksum); using the "
                    "one before"]
    truncated = newest / "adapter_model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:100])
    assert [p.name for p in run.checkpoints()] == ["step-0000002"]  # sizes are checked even when listing
    events = []
    resumed = resume_training(run.id, events.append)
    assert (resumed.status, resumed.step) == ("finished", 6)
    lines = [(e.message, e.level) for e in events if isinstance(e, LogLine)]
    assert ("Resuming from step-0000002", "info") in lines
    [(damaged, level)] = [line for line in lines if "is damaged" in line[0]]  # said on the terminal and the window
    assert damaged.startswith("Checkpoint step-0000004 is damaged (adapter_model.safetensors has ") and level == "warning"


# Where a kill -9 can land in a run's life, each aimed at by what the run folder shows while the
# process trains (polled every few ms: a tiny model's step takes tens of ms) and each named afterwards
# by what the kill left (`_left`), so that a kill that came too late counts for what it hit instead
FIRST = "before the first checkpoint"  # the `train` process itself: the resume starts over from step 0
STAGING = "while a checkpoint is written"  # its staging folder (.step-N.*.tmp) left half written
SAVED = "just after a checkpoint"  # step-N complete and nothing logged past it (the prune, the next step)
BETWEEN = "between checkpoints"  # steps logged past the newest checkpoint: redone, and logged once
AIMED = (FIRST, SAVED, STAGING, BETWEEN)  # SAVED next: after FIRST the resume starts over, with none
RANDOM_KILLS = 3  # and at seeded random moments up to 0.6 s after training resumed, whatever those hit
MAX_KILLS = 14  # an aimed kill that lands elsewhere is tried again, up to this many kills in all


def test_kill_9_at_every_kind_of_moment_then_resume_always_finishes(tiny_model, chat_data, tunesmith_home):
    """Killed before the first checkpoint, while one is written, just after one, between two, and at
    random moments: every resume continues, and the run ends at the planned step with every step
    logged exactly once."""
    rng = random.Random(20261202)
    env = os.environ.copy()
    cmd = [sys.executable, "-m", "app", "train", "--model", str(tiny_model), "--data", str(chat_data),
           "--max-steps", "120", "--save-every", "2", "--batch", "2", "--seq-len", "64", "--lr", "1e-3"]
    runs_root = tunesmith_home / "data" / "runs"
    plan = [*AIMED, *["random"] * RANDOM_KILLS]
    run_id, kills = None, []
    while plan and len(kills) < MAX_KILLS:
        aim = plan[0]
        proc = subprocess.Popen(cmd if run_id is None else [sys.executable, "-m", "app", "resume", run_id],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while run_id is None and time.monotonic() < deadline:  # the run folder appears
            found = [p for p in runs_root.glob("*") if (p / "status.json").exists()] if runs_root.exists() else []
            run_id = found[0].name if found else None
            time.sleep(0.05)
        run_dir = runs_root / run_id
        before = _logged_steps(run_dir)
        while time.monotonic() < deadline and _logged_steps(run_dir) <= before and proc.poll() is None:
            time.sleep(0.002)  # training has started again (leftovers of the last kill removed)
        if aim == "random":
            time.sleep(rng.uniform(0.0, 0.6))
        else:
            _wait_for(aim, run_dir, proc, deadline)
        if proc.poll() is not None:
            break  # it finished before this kill
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        left = _left(run_dir)
        kills.append(f"{aim}: {left}")
        assert open_run(run_id).status()["status"] == "interrupted", kills
        if aim == "random" or left == aim:
            plan.pop(0)
        elif aim == FIRST:  # too late, the first checkpoint was in place: only a new run has none
            shutil.rmtree(run_dir)
            run_id = None
    final = subprocess.run([sys.executable, "-m", "app", "resume", run_id], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    run = open_run(run_id)
    if run.status()["status"] != "finished":
        assert final.returncode == 0, final.stderr
    assert not plan, f"not killed at {plan} (the kills, aimed: what they hit: {kills}); the run finished first " \
                     f"or the aimed kills kept landing elsewhere"
    status = run.status()
    assert (status["status"], status["step"], status["total_steps"]) == ("finished", 120, 120)
    steps = [e["step"] for e in run.events() if e["event"] == "StepMetrics"]
    assert steps == list(range(1, 121))
    losses = [e["loss"] for e in run.events() if e["event"] == "StepMetrics"]
    assert all(isinstance(x, float) for x in losses)
    print(f"{len(kills)} kills (aimed: hit): {kills}")


def _wait_for(aim: str, run_dir: Path, proc: subprocess.Popen, deadline: float) -> None:
    """Return (to kill at once) when the training process `proc` is at the moment `aim`, as its run
    folder shows it: a step logged (FIRST: the first one, the first checkpoint not yet written), a
    checkpoint's staging folder there (STAGING), a new complete checkpoint (SAVED), or one step
    logged past a checkpoint (BETWEEN: with --save-every 2, an odd step)."""
    checkpoints = run_dir / "checkpoints"
    had = set(checkpoints.glob("step-*")) if checkpoints.is_dir() else set()
    while time.monotonic() < deadline and proc.poll() is None:
        if aim == FIRST:
            return  # the first logged step was just seen: the kill lands in step 2 or its checkpoint
        if aim == STAGING and checkpoints.is_dir() and any(checkpoints.glob(".step-*.tmp")):
            return
        if aim == SAVED and checkpoints.is_dir() and set(checkpoints.glob("step-*")) - had:
            return
        if aim == BETWEEN and _logged_steps(run_dir) % 2 == 1:
            return
        time.sleep(0.002)


def _left(run_dir: Path) -> str:
    """Which moment a kill hit, from what the killed process left (it can no longer change it)."""
    run = open_run(run_dir.name)
    complete = run.checkpoints()
    if not complete:
        return FIRST
    if any(run.checkpoints_dir.glob(".step-*.tmp")):
        return STAGING
    newest = json.loads((complete[-1] / "state.json").read_text())["step"]
    return SAVED if _logged_steps(run_dir) == newest else BETWEEN


def _logged_steps(run_dir: Path) -> int:
    try:
        return sum(1 for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"StepMetrics"' in line)
    except OSError:
        return 0


def _train(model, data, steps: int, save_every: int, stop_at: int | None = None, on_event=None):
    import threading

    from app.core.config import TrainConfig
    from app.core.events import StepMetrics
    from app.core.train.trainer import run_training

    stop = threading.Event()

    def events(event):
        if on_event is not None:
            on_event(event)
        if stop_at is not None and isinstance(event, StepMetrics) and event.step >= stop_at:
            stop.set()

    config = TrainConfig(model=str(model), data=str(data), seq_len=128, micro_batch=4, grad_accum=1, lr=5e-3,
                         max_steps=steps, save_every=save_every, lora_dropout=0.0, quantize="4bit")
    return run_training(config, events, stop)
