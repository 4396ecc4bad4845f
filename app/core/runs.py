"""The run store: one folder per training run, written atomically, listed and reopened.

A run folder holds config.json (what was asked), plan.json (what is used), data.json (the data's
fingerprint and counts), status.json, metrics.jsonl (every event), train.log, checkpoints/ and,
once finished, adapter/ (a PEFT adapter). Whoever writes a run holds its lock (run_lock.py); a run
whose status says "running" while nobody holds the lock was killed: it is listed as "interrupted"
and can be resumed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from app.core.atomic import append_line, manifest_problem, read_jsonl, staged_dir, write_json, write_text
from app.core.config import Plan, TrainConfig
from app.core.errors import RunError
from app.core.events import Event, event_to_dict
from app.core.paths import runs_dir
from app.core.portable import RUN_INNER, path_problem, safe_name
from app.core.run_lock import RunLock, in_use

KEEP_CHECKPOINTS = 2
LABEL_MAX = 80
PROGRESS_EVENTS = ("StepMetrics", "EvalMetrics", "PreferenceMetrics", "CheckpointSaved")


class Run:
    """An existing run folder."""

    def __init__(self, path: Path):
        self.dir = Path(path)
        self.id = self.dir.name
        self.lock: RunLock | None = None  # held while this process writes the run

    # -- files -------------------------------------------------------------------------------
    @property
    def checkpoints_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        return self.dir / "adapter"

    @property
    def best_adapter_dir(self) -> Path:
        """The adapter at the best eval loss so far, while the run trains (overfit.py)."""
        return self.dir / "best-adapter"

    @property
    def last_adapter_dir(self) -> Path:
        """The last step's adapter, where an overfitting alarm made the best eval's the run's."""
        return self.dir / "last-adapter"

    @property
    def log_file(self) -> Path:
        return self.dir / "train.log"

    def config(self) -> TrainConfig:
        return TrainConfig.from_dict(self._json("config.json"))

    def plan(self) -> Plan:
        return Plan.from_dict(self._json("plan.json"))

    def write_plan(self, plan: Plan) -> None:
        """Replace plan.json (the OOM back-off records the plan it changed to)."""
        write_json(self.dir / "plan.json", plan.to_dict())

    def data_info(self) -> dict:
        return self._json("data.json")

    def raw_status(self) -> dict:
        return self._json("status.json")

    def _json(self, name: str) -> dict:
        try:
            return json.loads((self.dir / name).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise RunError(f"{self.dir / name}: cannot read ({err}); the run folder is damaged") from None

    # -- status and logs ---------------------------------------------------------------------
    def status(self) -> dict:
        """status.json, with "running" turned into "interrupted" when its process is gone."""
        status = self.raw_status()
        if status.get("status") == "running" and not in_use(self.dir):
            status = {**status, "status": "interrupted",
                      "reason": "the process ended without saying so (killed or crashed)"}
        return status

    def write_status(self, status: str, **fields) -> None:
        current = self.raw_status() if (self.dir / "status.json").exists() else {}
        current.update(fields, status=status, updated=time.time())
        if status == "running":
            current.update(pid=os.getpid(), host=socket.gethostname())
        write_json(self.dir / "status.json", current)

    def append_event(self, event: Event) -> None:
        append_line(self.dir / "metrics.jsonl", json.dumps({**event_to_dict(event), "time": time.time()}))

    def events(self) -> list[dict]:
        return read_jsonl(self.dir / "metrics.jsonl")

    def rewind_metrics(self, step: int) -> None:
        """Drop logged progress past `step`: a resumed run repeats those steps from its checkpoint."""
        kept = [e for e in self.events() if not (isinstance(e.get("step"), int) and e["step"] > step
                                                 and e.get("event") in PROGRESS_EVENTS)]
        write_text(self.dir / "metrics.jsonl", "".join(json.dumps(e) + "\n" for e in kept))

    def log(self, message: str) -> None:
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        with open(self.log_file, "a", encoding="utf-8") as handle:
            handle.write(f"{stamp} {message.rstrip()}\n")

    # -- the user's name for it --------------------------------------------------------------
    def label(self) -> str:
        """The name given in the Runs tab (label.txt), "" for none; the id never changes."""
        try:
            return (self.dir / "label.txt").read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return ""

    def set_label(self, text: str) -> None:
        """Name the run (or, with "", take its name away). The folder keeps its id: exports, resumes
        and the command line still find it by that."""
        text = " ".join(text.split())
        if len(text) > LABEL_MAX:
            raise RunError(f"a run's name has at most {LABEL_MAX} characters; this one has {len(text)}")
        if text:
            write_text(self.dir / "label.txt", text + "\n")
        else:
            (self.dir / "label.txt").unlink(missing_ok=True)

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / f"step-{step:07d}"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first: state.json and, for those written with one, every
        file the manifest lists at its size (a power loss can leave a torn one)."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoints_dir.glob("step-*") if not _checkpoint_problem(p, checksums=False))

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def verified_checkpoint(self, say: Callable[[str], None] | None = None) -> Path | None:
        """The newest checkpoint whose files also match their checksums; a damaged newer one is
        named in train.log (and to `say`: the terminal, the window) and skipped for the one before."""
        for path in sorted(self.checkpoints_dir.glob("step-*"), reverse=True):
            problem = _checkpoint_problem(path, checksums=True)
            if not problem:
                return path
            message = f"Checkpoint {path.name} is damaged ({problem}); using the one before"
            self.log(message)
            if say is not None:
                say(message)
        return None

    def prune_checkpoints(self) -> None:
        for old in self.checkpoints()[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)

    def remove_leftovers(self) -> int:
        """Remove what a process killed while writing left behind: a checkpoint's staging or swapped-out
        folder (.step-N.*.tmp, .step-N.*.old) and the run's half-written files (.NAME.*.tmp); the
        caller holds the run's lock, so nobody is writing them. The number removed."""
        removed = 0
        for pattern, folder in ((".step-*.tmp", self.checkpoints_dir), (".step-*.old", self.checkpoints_dir),
                                (".*.tmp", self.dir)):
            for path in folder.glob(pattern) if folder.is_dir() else []:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed += 1
        return removed


@dataclass
class RunSummary:
    """A row of the run list."""

    id: str
    status: str
    reason: str
    step: int
    total_steps: int
    last_loss: float | None
    eval_loss: float | None
    model: str
    data: str
    created: float
    updated: float
    elapsed_s: float | None  # training time, resumed sessions added up
    peak_bytes: int = 0  # measured peak memory (the measure the plan predicts), 0 before a step
    predicted_bytes: int = 0  # the plan's predicted peak
    label: str = ""  # the name the user gave it (Runs tab ▸ Rename), "" for none
    method: str = "sft"  # what it learned (TrainConfig.method)
    start_from: str = ""  # the run whose adapter it started from (dpo/orpo --from)


@dataclass
class PreferenceHistory:
    """A preference run's measures as its metrics.jsonl logged them: training steps and evals."""

    steps: list[int] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_margins: list[float] = field(default_factory=list)
    eval_accuracies: list[float] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.steps or self.eval_steps)

    def add(self, row: dict) -> None:
        """One PreferenceMetrics row; a step that does not come after the one before starts again
        from there (the steps of a resume that an older version left logged twice)."""
        step, margin, accuracy = int(row["step"]), float(row["margin"]), float(row["accuracy"])
        train = row.get("split") != "eval"
        steps, margins, accuracies = ((self.steps, self.margins, self.accuracies) if train else
                                      (self.eval_steps, self.eval_margins, self.eval_accuracies))
        keep = sum(1 for s in steps if s < step)
        del steps[keep:], margins[keep:], accuracies[keep:]
        steps.append(step)
        margins.append(margin)
        accuracies.append(accuracy)


@dataclass
class RunHistory:
    """A run's curves as its metrics.jsonl logged them, to draw the run again."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    tokens: int = 0
    tokens_through: list[int] = field(default_factory=list)  # real tokens trained up to each of `steps`
    preference: PreferenceHistory = field(default_factory=PreferenceHistory)  # dpo/orpo runs


def read_history(run: Run) -> RunHistory:
    """Loss, learning rate and eval loss per step, and a preference run's measures; a resumed run's
    repeated steps were dropped from the log when it resumed, so each step appears once."""
    history = RunHistory()
    for row in run.events():
        try:
            if row.get("event") == "StepMetrics":
                step, loss, lr = int(row["step"]), float(row["loss"]), float(row["lr"])
                history.steps.append(step)
                history.losses.append(loss)
                history.lrs.append(lr)
                history.elapsed_s = float(row.get("elapsed_s") or history.elapsed_s)
                history.tokens += int(row.get("tokens") or 0)
                history.tokens_through.append(history.tokens)
            elif row.get("event") == "EvalMetrics":
                step, loss = int(row["step"]), float(row["eval_loss"])
                history.eval_steps.append(step)
                history.eval_losses.append(loss)
            elif row.get("event") == "PreferenceMetrics":
                history.preference.add(row)
        except (KeyError, TypeError, ValueError):
            continue  # a row from another version: draw what can be drawn
    return history


def create_run(config: TrainConfig, plan: Plan, data_info: dict) -> Run:
    """Write a new run folder in one piece and return it."""
    root = runs_dir()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = slug(config.name or f"{Path(config.model.rstrip('/')).name}-{Path(config.data).stem}")
    run_id = f"{stamp}-{name}"
    n = 2
    while (root / run_id).exists() or (root / f".{run_id}.deleting").exists():  # nor a killed delete's name
        run_id, n = f"{stamp}-{name}-{n}", n + 1
    problem = path_problem(root / run_id, reserve=RUN_INNER)
    if problem:
        raise RunError(f"cannot create the run: {problem} (runs are kept in {root}; TUNESMITH_HOME moves them)")
    lock = None
    try:
        with staged_dir(root / run_id) as tmp:
            if sys.platform != "win32":  # held from before the folder appears as "running"; Windows
                lock = RunLock(tmp).acquire()  # cannot rename a folder with an open file in it
            write_json(tmp / "config.json", config.to_dict())
            write_json(tmp / "plan.json", plan.to_dict())
            write_json(tmp / "data.json", data_info)
            now = time.time()
            write_json(tmp / "status.json", {"status": "running", "reason": "", "step": 0,
                                             "total_steps": plan.total_steps, "last_loss": None,
                                             "eval_loss": None, "created": now, "updated": now,
                                             "pid": os.getpid(), "host": socket.gethostname()})
            (tmp / "checkpoints").mkdir()
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    run = Run(root / run_id)
    if lock is None:
        lock = RunLock(run.dir).acquire()
    lock.run_dir = run.dir  # the lock moved with the folder
    run.lock = lock
    return run


def open_run(ref: str) -> Run:
    """A run by folder path, id, or unique id prefix/suffix."""
    path = Path(ref).expanduser()
    if (path / "status.json").exists():
        return Run(path)
    root = runs_dir()
    if (root / ref / "status.json").exists():
        return Run(root / ref)
    matches = [p for p in _run_folders(root) if p.name.startswith(ref) or p.name.endswith(ref)]
    if len(matches) == 1:
        return Run(matches[0])
    if not matches:
        raise RunError(f"no run '{ref}' in {root}; `tunesmith runs` lists them")
    names = ", ".join(p.name for p in matches[:3])
    raise RunError(f"'{ref}' matches {len(matches)} runs ({names}...); give more of the id")


def list_runs() -> list[RunSummary]:
    """All runs, newest first."""
    rows = []
    for folder in _run_folders(runs_dir()):
        run = Run(folder)
        try:
            status, config = run.status(), run.config()
        except RunError:
            continue
        rows.append(RunSummary(run.id, status.get("status", "?"), status.get("reason", ""),
                               status.get("step", 0), status.get("total_steps", 0), status.get("last_loss"),
                               status.get("eval_loss"), config.model, config.data,
                               status.get("created", 0.0), status.get("updated", 0.0), status.get("elapsed_s"),
                               int(status.get("peak_bytes") or 0), _predicted(run), run.label(), config.method,
                               config.start_from))
    return sorted(rows, key=lambda r: r.created, reverse=True)


def display_names(rows: list[RunSummary]) -> dict[str, str]:
    """What the window calls each run: the name the user gave it, else the id without its date
    ("demo-pirate_chef"), numbered by start where several share one ("demo-pirate_chef #2")."""
    short = {row.id: row.label or short_id(row.id) for row in rows}
    names, seen = {}, {}
    for row in sorted(rows, key=lambda r: r.created):
        name = short[row.id]
        seen[name] = seen.get(name, 0) + 1
        names[row.id] = name
        if seen[name] > 1:
            names[row.id] = f"{name} #{seen[name]}"
    firsts = {name for name, count in seen.items() if count > 1}
    for row in rows:  # the first of a repeated name is #1, so that none of them reads as the only one
        if names[row.id] in firsts:
            names[row.id] = f"{names[row.id]} #1"
    return names


def newest_finished(rows: list[RunSummary]) -> str:
    """The id of the newest finished run among `rows` (any order), "" for none."""
    done = [row for row in rows if row.status == "finished"]
    return max(done, key=lambda row: row.created).id if done else ""


def short_id(run_id: str) -> str:
    """Runs are named `YYYYmmdd-HHMMSS-model-data`: the part after the date."""
    parts = run_id.split("-", 2)
    return parts[2] if len(parts) == 3 and parts[0].isdigit() else run_id


def _predicted(run: Run) -> int:
    """The predicted peak of a run's plan (0 when its plan.json cannot be read)."""
    try:
        return int(run._json("plan.json").get("predicted_peak_bytes") or 0)
    except (RunError, AttributeError, TypeError, ValueError):
        return 0


def delete_run(ref: str) -> None:
    """Delete a run that no process is using (RunError naming the holder otherwise), whole or not
    at all: the folder is first renamed out of the run list, which on Windows fails while another
    program has one of its files open (the run is then left as it was), and only then removed."""
    run = open_run(ref)
    lock = RunLock(run.dir, "deleting").acquire()
    gone, n = run.dir.with_name(f".{run.dir.name}.deleting"), 2
    while gone.exists():  # what a killed delete of a run of the same name left: removed below
        gone, n = run.dir.with_name(f".{run.dir.name}.{n}.deleting"), n + 1
    if sys.platform == "win32":  # a folder with an open file in it (our lock's) cannot be renamed there
        lock.release()
    try:
        os.replace(run.dir, gone)
    except OSError as err:
        raise RunError(f"run {run.id} was not deleted: {err.strerror or err} ({err.filename}); another program "
                       "may have one of its files open: close it and delete again. Nothing was removed") from None
    finally:
        lock.release()
    for folder in (gone, *run.dir.parent.glob(".*.deleting")):  # and what an earlier delete left (a file held open)
        shutil.rmtree(folder, ignore_errors=True)


def is_run_folder(path: Path) -> bool:
    """Whether `path` is a run folder (its status and plan are there)."""
    return (Path(path) / "status.json").is_file() and (Path(path) / "plan.json").is_file()


def _run_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and
            (p / "status.json").exists()]


def checkpoint_state(path: Path) -> dict:
    """A checkpoint's state.json: its step, loss, tokens and time so far (session.py writes it)."""
    return json.loads((path / "state.json").read_text(encoding="utf-8"))


def checkpoint_step(path: Path | None) -> int:
    """The step a checkpoint folder was saved at; 0 for none (a run from its start)."""
    return checkpoint_state(path)["step"] if path else 0


def _checkpoint_problem(path: Path, checksums: bool) -> str:
    try:
        state = checkpoint_state(path)
    except (OSError, ValueError):
        return "no readable state.json"
    if not isinstance(state, dict) or not state.get("manifest"):
        return ""  # written before checkpoints had manifests
    return manifest_problem(path, checksums)


def slug(text: str, fallback: str = "run") -> str:
    """`text` as a file or folder name on any system: letters, digits and . _ - only, at most 60
    characters, no leading or trailing dot (hidden; dropped by Windows), no Windows device name."""
    return safe_name(re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:60].strip("-."), fallback)
