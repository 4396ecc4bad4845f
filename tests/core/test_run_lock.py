"""One writer per run: a second resume, a delete or an export into the run is refused while a
process holds the run's lock, and "running" means a live lock, not a PID that happens to exist."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from app.core.errors import ExportError, RunError
from app.core.export.exporter import export_run
from app.core.run_lock import RunLock, in_use
from app.core.runs import delete_run, open_run
from app.core.train.trainer import resume_training
from conftest import REPO, train_tiny

HOLD = "import sys, time; from app.core.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"


def test_while_another_process_holds_a_run_resume_delete_and_export_into_it_are_refused(tiny_model, chat_data):
    stopped = train_tiny(tiny_model, chat_data, steps=6, stop_at=2)
    run = open_run(stopped.run_id)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run.dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for attempt in (lambda: resume_training(run.id), lambda: delete_run(run.id)):
            with pytest.raises(RunError, match=rf"run {run.id} is in use by process {holder.pid} \(python, training\) since"):
                attempt()
        with pytest.raises(ExportError, match=f"it is inside the run {run.id}"):  # never into a run, held or not
            export_run(run.id, "adapter", run.dir / "exports" / "a")
        assert run.dir.is_dir() and not (run.dir / "exports").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed outright: the lock went with it, nothing to clean up
    assert resume_training(run.id).status == "finished"
    delete_run(run.id)
    assert not run.dir.exists()


def test_running_means_a_live_lock_not_a_live_pid(tiny_model, chat_data):
    run = open_run(train_tiny(tiny_model, chat_data, steps=2).run_id)
    # a status left "running" by a killed trainer, naming a PID that is alive (ours: as good as a reused one)
    status = dict(run.raw_status(), status="running", pid=os.getpid())
    (run.dir / "status.json").write_text(json.dumps(status))
    assert run.status()["status"] == "interrupted"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run.dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert in_use(run.dir) and run.status()["status"] == "running"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        assert not in_use(run.dir) and run.status()["status"] == "interrupted"
    finally:
        if holder.poll() is None:
            holder.kill()


def test_two_opens_in_one_process_conflict(tmp_path):
    """The Train tab and the Runs tab live in one process: they must not both write a run."""
    first = RunLock(tmp_path, "training").acquire()
    with pytest.raises(RunError, match="in use by process"):
        RunLock(tmp_path, "deleting").acquire()
    first.release()
    with RunLock(tmp_path):
        assert in_use(tmp_path)
    assert not in_use(tmp_path)


def test_two_real_resumes_at_once_exactly_one_trains(tiny_model, chat_data, tunesmith_home):
    stopped = train_tiny(tiny_model, chat_data, steps=200, stop_at=2)
    cmd = [sys.executable, "-m", "app", "resume", stopped.run_id]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=os.environ.copy(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = sorted((proc.wait(timeout=600), proc.stderr.read()) for proc in procs)
    (ok, _), (refused, message) = outcomes
    assert (ok, refused) == (0, 2), outcomes
    assert len(message.strip().splitlines()) == 1 and f"run {stopped.run_id} is in use by process" in message
    run = open_run(stopped.run_id)
    assert (run.status()["status"], run.status()["step"]) == ("finished", 200)
    steps = [e["step"] for e in run.events() if e["event"] == "StepMetrics"]
    assert steps == list(range(1, 201))  # one writer: no step logged twice, none missing
    assert not in_use(run.dir)


def test_runs_started_in_the_same_second_get_their_own_folders_each_locked(monkeypatch):
    """The clock is stopped at one second, so both runs are started in it."""
    from datetime import datetime

    import app.core.runs as runs
    from app.core.config import Plan, TrainConfig
    from app.core.runs import create_run

    class Clock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 12, 2, 4, 50, 0)

    monkeypatch.setattr(runs, "datetime", Clock)
    config = TrainConfig(model="demo", data="chats.jsonl", name="my run: v2!")
    first, second = create_run(config, Plan(), {}), create_run(config, Plan(), {})
    try:
        assert first.id == "20261202-045000-my-run-v2" and second.id == first.id + "-2"
        assert in_use(first.dir) and in_use(second.dir)
    finally:
        first.lock.release()
        second.lock.release()


def test_a_run_named_like_a_killed_delete_gets_its_own_name_and_deletes(monkeypatch):
    """CI's case: a delete killed while removing run X leaves `.X.deleting`; a run started in the same
    second as X (the clock is stopped) must not be named X, and deleting a run X must not trip on it."""
    from datetime import datetime

    import app.core.runs as runs
    from app.core.config import Plan, TrainConfig
    from app.core.runs import create_run, delete_run, runs_dir

    class Clock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 12, 7, 5, 57, 29)

    monkeypatch.setattr(runs, "datetime", Clock)
    config = TrainConfig(model="demo", data="chats.jsonl", name="chats")
    left = runs_dir() / ".20261207-055729-chats.deleting"
    (left / "adapter").mkdir(parents=True)
    (left / "adapter" / "weights").write_text("what the killed delete had not removed")
    run = create_run(config, Plan(), {})
    run.lock.release()
    assert run.id == "20261207-055729-chats-2"
    run.dir.rename(runs_dir() / "20261207-055729-chats")  # as if named so before the fix
    delete_run("20261207-055729-chats")
    assert sorted(p.name for p in runs_dir().iterdir()) == []
