"""What a job is: its kind, its status, and the state a worker thread and the event loop share."""

from __future__ import annotations

import asyncio
import errno
import logging
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .settings import Settings
from .store import JobRecord

log = logging.getLogger("jobqueue.jobs")


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class BadInput(Exception):
    """The job's input cannot be processed; the message tells the user what to send instead."""


class UnsupportedInput(BadInput):
    """The upload is not the kind of file the job kind takes (found before it is queued)."""


class TooLarge(BadInput):
    """The input is over one of the server's limits (a JOBQUEUE_*_MAX_* setting): 413."""


class DiskFull(Exception):
    """The output folder's disk is full: not the input's fault, but the user should know."""

    def __init__(self, job_id: str):
        super().__init__(f"The server's disk is full (JOBQUEUE_OUT_DIR); job {job_id} could not "
                         "write its files. Try again once space has been freed.")


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


class JobCancelled(Exception):
    """Raised inside a handler when its job was cancelled; the worker stops the job quietly."""


@dataclass
class Output:
    """What a handler returns: a JSON summary and the files it wrote into the job folder."""

    data: dict[str, Any]
    files: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class Progress:
    done: float = 0
    total: float = 0
    unit: str = ""


@dataclass(frozen=True)
class JobKind:
    """One kind of work: a name (the `jobType`), its options and the handler that runs it.

    `handler` runs on a worker thread. It reads `job.options` and `job.input_path`, writes into
    `job.out_dir`, calls `job.raise_if_cancelled()` between steps and returns an `Output`.
    """

    name: str
    description: str
    options: type[BaseModel]
    handler: Callable[[Job], Output]
    # Bundled file used when a request uploads none; None when the kind takes no file.
    sample: Path | None = None
    # Quick look at an upload before it is queued, given the job's options: UnsupportedInput
    # for the wrong kind of file, TooLarge for one over the server's limits.
    check_input: Callable[[Path, BaseModel, Settings], None] | None = None
    # What the dashboard's file picker offers, as in <input accept>: ".pdf", "video/*".
    accept: str = ""
    # Whether the handler writes files into `job.out_dir` (made for it before it runs).
    writes_files: bool = True


@dataclass(eq=False)  # compared and hashed by identity
class Job:
    """One unit of work. The worker thread and the event loop both touch it, under `_lock`."""

    id: str
    kind: JobKind
    options: BaseModel
    out_dir: Path
    input_path: Path | None
    loop: asyncio.AbstractEventLoop
    # Set (through the loop) once the job has reached a finished status.
    done: asyncio.Future[None]
    status: JobStatus = JobStatus.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    worker_name: str | None = None
    progress: Progress = field(default_factory=Progress)
    output: Output | None = None
    error: BaseException | None = None
    # "put" for a client waiting on /put, "jobs" for POST /jobs.
    origin: str = "jobs"
    # The API key that submitted it, as `access.owner_of` names it; "" without API keys.
    owner: str = ""
    # The server's settings, for handlers with server-wide choices (pdf2image's engine).
    settings: Settings | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    # Set when shutdown stops the job: it is left as it was, to run again after a restart.
    rerun_after_restart: bool = False
    # When the engine's watchdog stops the job (epoch seconds), and whether it has.
    deadline: float | None = None
    timed_out: bool = False
    # Called from whichever thread finishes the job, before the loop side hears of it.
    on_finish: Callable[[Job], None] | None = None
    # Called on the loop after every change (the dashboard's feed).
    on_change: Callable[[Job], None] | None = None
    # Whether anything beyond the job's own streams shows its changes (the dashboard's feed);
    # asked from any thread, so an answer a moment old is fine.
    watched: Callable[[], bool] = lambda: False
    _processes: set[subprocess.Popen] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _notify_scheduled: bool = False
    # One queue per event-stream listener; touched only on the loop.
    _listeners: set[asyncio.Queue[None]] = field(default_factory=set)

    def start(self, worker_name: str) -> bool:
        """Mark the job running; False when it was cancelled while it waited in the queue."""
        with self._lock:
            if self.status is not JobStatus.QUEUED:
                return False
            self.status = JobStatus.RUNNING
            self.started_at = time.time()
            self.worker_name = worker_name
        self.changed()
        return True

    def finish(self, status: JobStatus, output: Output | None = None,
               error: BaseException | None = None) -> bool:
        """Move to a finished status once; later calls change nothing and return False."""
        with self._lock:
            if not self._finish_locked(status, output, error):
                return False
        self._finished()
        return True

    def cancel(self) -> JobStatus:
        """Ask the job to stop: a queued job ends now, a running one has its child processes
        killed and it stops at its handler's next check. Returns the status it found."""
        self.cancel_requested.set()
        with self._lock:
            found = self.status
            ended_here = found is JobStatus.QUEUED and self._finish_locked(JobStatus.CANCELLED)
            processes = list(self._processes)
        for process in processes:
            process.kill()
        if ended_here:
            self._finished()
        return found

    def _finish_locked(self, status: JobStatus, output: Output | None = None,
                       error: BaseException | None = None) -> bool:
        if self.status.finished:
            return False
        self.status = status
        self.finished_at = time.time()
        self.output = output
        self.error = error
        return True

    def _finished(self) -> None:
        if self.on_finish is not None:
            try:
                self.on_finish(self)
            except Exception:  # recording must not keep waiters from hearing the job ended
                log.exception("job %s: could not record its end", self.id)
        self.changed()

    def set_progress(self, done: float, total: float, unit: str) -> None:
        self.progress = Progress(done, total, unit)
        self.changed()

    def listen(self) -> asyncio.Queue[None]:
        """A queue that gets an item whenever the job changes; call on the loop, then `unlisten`."""
        changes: asyncio.Queue[None] = asyncio.Queue(maxsize=1)
        self._listeners.add(changes)
        return changes

    def unlisten(self, changes: asyncio.Queue[None]) -> None:
        self._listeners.discard(changes)

    def changed(self) -> None:
        """Wake the loop side from any thread: the `done` future and event-stream listeners.
        Changes that come faster than the loop takes them are told once, and only the end is
        told while no stream watches (a stream that starts reads the job's state itself)."""
        with self._lock:
            if self._notify_scheduled:
                return
            if not (self.status.finished or self._listeners or self.watched()):
                return
            self._notify_scheduled = True
        try:
            self.loop.call_soon_threadsafe(self.notify_loop)
        except RuntimeError:  # the loop is closed: the server is gone and nobody is waiting
            pass

    @property
    def streamed(self) -> bool:
        """Whether an event stream of this job listens (call on the loop)."""
        return bool(self._listeners)

    def notify_loop(self) -> None:
        """Tell the loop side of a change now; call on the loop."""
        with self._lock:
            self._notify_scheduled = False
        if self.status.finished and not self.done.done():
            self.done.set_result(None)
        for changes in self._listeners:
            if changes.empty():
                changes.put_nowait(None)
        if self.on_change is not None:
            self.on_change(self)

    def record(self) -> JobRecord:
        """The job as the store keeps it."""
        with self._lock:
            return self._record_locked()

    def _record_locked(self) -> JobRecord:
        output, error = self.output, self.error
        return JobRecord(
            id=self.id, job_type=self.kind.name, status=self.status.value,
            options=self.options.model_dump(mode="json"),
            input_path=str(self.input_path) if self.input_path else None,
            created_at=self.created_at, started_at=self.started_at,
            finished_at=self.finished_at, worker_name=self.worker_name,
            progress={"done": self.progress.done, "total": self.progress.total,
                      "unit": self.progress.unit},
            error=(str(error) if isinstance(error, BadInput | DiskFull) else
                   f"Job {self.id} failed with an internal error; the server log has the details."
                   if error is not None else None),
            bad_input=isinstance(error, BadInput),
            result={"data": output.data, "files": [path.name for path in output.files]}
            if output else None,
            origin=self.origin,
            owner=self.owner,
        )

    def raise_if_cancelled(self) -> None:
        if self.cancel_requested.is_set():
            raise JobCancelled(self.id)

    def attach_process(self, process: subprocess.Popen) -> None:
        """Remember a child process so cancelling the job kills it."""
        with self._lock:
            self._processes.add(process)
        if self.cancel_requested.is_set():
            process.kill()

    def detach_process(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._processes.discard(process)

