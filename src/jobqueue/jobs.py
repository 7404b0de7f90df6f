"""What a job is: its kind, its status, and the state a worker thread and the event loop share."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel


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
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    _processes: set[subprocess.Popen] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, worker_name: str) -> bool:
        """Mark the job running; False when it was cancelled while it waited in the queue."""
        with self._lock:
            if self.status is not JobStatus.QUEUED:
                return False
            self.status = JobStatus.RUNNING
            self.started_at = time.time()
            self.worker_name = worker_name
            return True

    def finish(self, status: JobStatus, output: Output | None = None,
               error: BaseException | None = None) -> bool:
        """Move to a finished status once; later calls change nothing and return False."""
        with self._lock:
            return self._finish_locked(status, output, error)

    def cancel(self) -> JobStatus:
        """Ask the job to stop: a queued job ends now, a running one has its child processes
        killed and it stops at its handler's next check. Returns the status it found."""
        self.cancel_requested.set()
        with self._lock:
            found = self.status
            if found is JobStatus.QUEUED:
                self._finish_locked(JobStatus.CANCELLED)
            processes = list(self._processes)
        for process in processes:
            process.kill()
        return found

    def _finish_locked(self, status: JobStatus, output: Output | None = None,
                       error: BaseException | None = None) -> bool:
        if self.status.finished:
            return False
        self.status = status
        self.finished_at = time.time()
        self.output = output
        self.error = error
        try:
            self.loop.call_soon_threadsafe(_set_done, self.done)
        except RuntimeError:  # the loop is closed: the server is gone and nobody is waiting
            pass
        return True

    def set_progress(self, done: float, total: float, unit: str) -> None:
        self.progress = Progress(done, total, unit)

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


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
