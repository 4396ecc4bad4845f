"""Work that must not freeze the window, each on its own QThread: a one-off task (check a file,
make a plan, load the engine), a task that streams (chat answers, export progress) and a training run.

Workers are QObjects moved to a QThread; they report only through signals, which Qt queues to
the GUI thread, so no widget is ever touched from a worker. `Threads` keeps each pair alive
until its thread has finished, and waits for them all when the window closes.
"""

from __future__ import annotations

import logging
import threading
import traceback
from typing import Callable

from PySide6.QtCore import QObject, QThread, Signal, Slot

log = logging.getLogger(__name__)


class TaskWorker(QObject):
    """Runs `function()` once; emits `done(tag, result)` or `failed(tag, message)`.

    Connect the signals to bound methods of a GUI-thread QObject (not lambdas), so that Qt queues
    the call to that object's thread; the tag tells a reply from a newer request's."""

    done = Signal(object, object)
    failed = Signal(object, str)
    progress = Signal(object, str)  # (tag, message): what a slow task is doing, with `reports`

    def __init__(self, function: Callable[..., object], tag: object = None, reports: bool = False):
        super().__init__()
        self._function = function
        self.tag = tag
        self.reports = reports  # `function(say)` is given `say(message)` for its progress

    @Slot()
    def run(self) -> None:
        try:
            result = self._function(lambda message: self.progress.emit(self.tag, message)) if self.reports \
                else self._function()
        except Exception as err:  # noqa: BLE001 - reported to the window, never raised into Qt
            self.failed.emit(self.tag, error_message(err))
        else:
            self.done.emit(self.tag, result)


class TrainingWorker(QObject):
    """Runs `start(on_event, stop)` (run_training or resume_training): every engine event becomes
    an `event` signal; the end is `done(RunResult)` or, when the run could not start, `failed`."""

    event = Signal(object)
    done = Signal(object)
    failed = Signal(str)

    def __init__(self, start: Callable):
        super().__init__()
        from app.core.train.interrupt import StopRequest  # here: the window opens before the engine's modules load

        self._start = start
        self.stop_requested = StopRequest()

    @Slot()
    def run(self) -> None:
        try:
            result = self._start(self.event.emit, self.stop_requested)
        except Exception as err:  # noqa: BLE001 - a run that cannot start is a dialog, not a crash
            self.failed.emit(error_message(err))
        else:
            self.done.emit(result)

    def stop(self) -> None:
        """Ask the run to save a checkpoint and stop after the current step (any thread)."""
        self.stop_requested.set()

    def stop_now(self) -> None:
        """Ask the run to stop within the step in progress, dropping it (the last checkpoint stays)."""
        self.stop_requested.set_now()


class StreamWorker(QObject):
    """Runs `function(emit)`, which may call `emit(item)` any number of times (streamed text,
    progress lines); each becomes an `item` signal. Ends with `done(result)` or `failed(message)`."""

    item = Signal(object)
    done = Signal(object)
    failed = Signal(str)

    def __init__(self, function: Callable):
        super().__init__()
        self._function = function

    @Slot()
    def run(self) -> None:
        try:
            result = self._function(self.item.emit)
        except Exception as err:  # noqa: BLE001 - shown in the tab, never raised into Qt
            self.failed.emit(error_message(err))
        else:
            self.done.emit(result)


def error_message(err: Exception) -> str:
    """One line for the user: the message of a UserError; for anything else its type and text
    (the traceback goes to the log)."""
    from app.core.errors import UserError  # here: the window opens before the engine's modules load

    if isinstance(err, UserError):
        return str(err)
    log.error("unexpected error in a worker:\n%s", traceback.format_exc())
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:300]}"


class Threads:
    """Starts workers on their own QThreads and keeps them (and their Python wrappers) alive until
    they have finished; finished ones are dropped on the next start, never from their own thread."""

    def __init__(self):
        self._running: list[tuple[QThread, QObject]] = []
        self._closed = False

    def start(self, worker: QObject, *ends: Signal) -> QThread | None:
        """Move `worker` to a new thread, call its `run` there; the thread quits on any of `ends`.
        Once `close` was called nothing starts (returns None): a timer that fires while the window
        is being destroyed must not leave a thread running in it."""
        if self._closed:
            return None
        self._running = [(t, w) for t, w in self._running if not t.isFinished()]
        thread = QThread()
        worker.moveToThread(thread)
        thread.started.connect(worker.run)
        for signal in ends:
            signal.connect(thread.quit)
        self._running.append((thread, worker))
        thread.start()
        return thread

    @property
    def busy(self) -> bool:
        return any(thread.isRunning() for thread, _ in self._running)

    def wait_all(self, timeout_ms: int | None = 60_000) -> None:
        """Block until every thread has finished (None: however long that takes)."""
        for thread, _ in self._running:
            thread.quit()
            if timeout_ms is None:
                thread.wait()
            else:
                thread.wait(timeout_ms)

    def close(self, timeout_ms: int = 60_000) -> None:
        """At window close: start nothing more, and wait for what runs."""
        self._closed = True
        self.wait_all(timeout_ms)

    def __del__(self):
        # Qt aborts the process when a running QThread is destroyed; never let that happen
        try:
            self.wait_all(None)
        except RuntimeError:  # the C++ objects are already gone at interpreter exit
            pass
