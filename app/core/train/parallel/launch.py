"""A run on several processes: torchrun starts the workers, this process follows them (issue 20).

The run folder is created (or reopened for a resume) here, in the process the user started, which
holds the run's lock throughout. `torch.distributed.run` (torchrun, PyTorch's own launcher) starts
`--gpus` workers of `app.core.train.parallel.worker` on this machine with no restarts: when one dies,
torchrun ends the others and exits non-zero. Rank 0 writes the run's events, status and
checkpoints as a one-process run does; this process reads the new lines of metrics.jsonl and
passes them on as events (the CLI's progress, the GUI's graphs), turns a stop into the stop
request the workers read after each step, and, when a worker died, records the run as failed
with which worker and how (its last checkpoint resumable). The workers' output goes to the run's
workers.log.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from app.core.events import Event, LogLine, RunFailed, event_from_dict
from app.core.portable import child_env, python_command
from app.core.runs import Run, checkpoint_step
from app.core.train.loop import RunResult
from app.core.train.parallel.distributed import STOP_FILE
from app.core.train.parallel.worker import MISMATCH

FOLLOW_EVERY_S = 0.5


def run_workers(run: Run, gpus: int, on_event: Callable[[Event], None], stop: threading.Event):
    """Train `run` (its folder written, its lock held) on `gpus` workers; returns the RunResult
    its status.json ends with."""
    (run.dir / STOP_FILE).unlink(missing_ok=True)
    config = run.config()
    why = run.plan().reasons.get("gpus", "torchrun")
    message = f"Training on {gpus} process{'es' * (gpus != 1)} ({why}); their output: workers.log"
    if config.node_rank > 0:
        message += (f". This machine is node {config.node_rank} of {config.nodes}: the run's progress, checkpoints "
                    f"and adapter are on node 0 ({config.master_addr})")
    run.log(message)
    on_event(LogLine(message))
    checkpoint = run.verified_checkpoint(lambda note: on_event(LogLine(note, "warning")))  # rewound here, not by rank 0, so that the follower reads on
    run.rewind_metrics(checkpoint_step(checkpoint))
    follower = _Follower(run.dir / "metrics.jsonl", on_event)
    command = python_command("-m", "torch.distributed.run", *_rendezvous(config),
                             "--nproc-per-node", str(gpus), "--max-restarts", "0", "--monitor-interval", "1",
                             "-m", "app.core.train.parallel.worker", str(run.dir))
    with open(run.dir / "workers.log", "ab") as log:
        worker = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env(), **_detached())
        try:
            while worker.poll() is None:
                if stop.is_set():
                    (run.dir / STOP_FILE).touch()
                follower.read()
                time.sleep(FOLLOW_EVERY_S)
        except BaseException:  # Ctrl-C twice, or the caller going away: the workers go too
            worker.send_signal(signal.SIGTERM)
            worker.wait()
            raise
    follower.read()
    status = run.raw_status()
    root = root_cause(run.dir / "workers.log") if worker.returncode != 0 else None
    # a worker that died first is the cause, even where rank 0 already failed on the broken collective;
    # processes that disagreed (worker.MISMATCH) have said why in the status themselves
    died = root is not None and (root[0] != 0 or root[1] < 0) and root[1] != MISMATCH
    if worker.returncode != 0 and (status.get("status") in ("running", None)
                                   or (status.get("status") == "failed" and died)):
        step = status.get("step", 0)
        if status.get("reason"):
            run.log(f"rank 0 reported: {status['reason']}")
        reason = worker_death(root, worker.returncode, step)
        run.write_status("failed", reason=reason)
        run.append_event(RunFailed(reason, step))
        follower.failure = RunFailed(reason, step)
        status = run.raw_status()
    if follower.failure is not None:  # one failure reaches the caller: the cause
        on_event(follower.failure)
    plan = run.plan()
    adapter = str(run.adapter_dir) if config.node_rank == 0 else ""  # another machine's: on node 0
    return RunResult(run.id, str(run.dir), status.get("status", "failed"), status.get("step", 0), plan.total_steps,
                     status.get("last_loss"), adapter, status.get("reason", ""))


def _rendezvous(config) -> list[str]:
    """torchrun's arguments for where the processes meet: this machine alone, or the cluster's
    first machine (static rendezvous: every machine is started with its own --node-rank)."""
    if config.nodes <= 1:
        return ["--standalone", "--nnodes", "1"]
    return ["--nnodes", str(config.nodes), "--node-rank", str(config.node_rank),
            "--master-addr", config.master_addr, "--master-port", str(config.master_port)]


def _detached() -> dict:
    """Popen arguments: the workers in a session of their own, so that a Ctrl-C in the terminal
    reaches only this process (which turns the first into a stop request, as a one-process run
    does); on Linux torchrun is also told to end when this process dies, so that no worker goes on
    writing a run whose lock is gone."""
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    if not sys.platform.startswith("linux"):
        return {"start_new_session": True}

    def end_with_parent() -> None:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return {"start_new_session": True, "preexec_fn": end_with_parent}


def root_cause(log: Path) -> tuple[int, int] | None:
    """(rank, exit code: negative for a signal) of the first worker that failed, from the report
    torchrun ends the workers' log with; None without one."""
    text = log.read_text(encoding="utf-8", errors="replace")[-20000:] if log.exists() else ""
    section = text[text.rfind("Root Cause"):] if "Root Cause" in text else ""
    found = re.search(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", section, re.S)
    return (int(found.group(1)), int(found.group(2))) if found else None


def worker_death(root: tuple[int, int] | None, returncode: int, step: int) -> str:
    """One line naming the worker that died and how."""
    rank, how = (str(root[0]), _exit_text(root[1])) if root else ("?", _exit_text(returncode))
    return (f"worker {rank} died ({how}) after step {step}; the others were stopped. "
            "Resume continues from the last checkpoint (details in workers.log)")


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Follower:
    """New lines of a metrics.jsonl, as events; a failure is held back (`failure`) until the
    workers have ended, since rank 0's may only be the others' death seen from a collective."""

    def __init__(self, path: Path, on_event: Callable[[Event], None]):
        self.path, self.on_event = path, on_event
        self.offset = path.stat().st_size if path.exists() else 0
        self.failure: RunFailed | None = None

    def read(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next read
        self.offset += len(complete)
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                event = event_from_dict(json.loads(line))
            except (ValueError, TypeError):
                continue
            if isinstance(event, RunFailed):
                self.failure = event
            elif event is not None:
                self.on_event(event)
