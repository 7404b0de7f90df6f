"""What a job kind is, and what its handler may use: the same in both engines.

A kind module (`kinds/<name>.py`) defines a `JobKind`: its options, its handler and, optionally,
a check of uploads before they are queued. The handler gets a `JobContext`, the one class
both engines give it (each with its own hook for progress); a kind module runs identically in
both.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from jobqueue.errors import JobCancelled

if TYPE_CHECKING:
    from jobqueue.settings import Settings


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


FINISHED = {status.value for status in JobStatus if status.finished}


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

    def as_dict(self) -> dict[str, Any]:
        return {"done": self.done, "total": self.total, "unit": self.unit}


class JobContext:
    """What a handler gets: its job's options and files, progress, cancel, and children.

    One class for both engines; each gives it a hook for progress (`on_progress`, called on
    the handler's thread) and stops it through `cancel()`. Handlers run on a thread of their
    own. They read `options` and `input_path`, write only into `out_dir`, call `set_progress`
    as they go and `raise_if_cancelled()` between steps, and run child processes through
    `processes.run`, which kills them on a cancel.
    """

    def __init__(self, job_id: str, options: BaseModel, input_path: Path | None, out_dir: Path,
                 settings: Settings | None,
                 on_progress: Callable[[Progress], None] | None = None, resource: Any = None):
        self.id = job_id
        self.options = options
        self.input_path = input_path
        self.out_dir = out_dir
        self.settings = settings
        # What the kind's `setup` returned in this process (its model, its client); None
        # without a setup.
        self.resource = resource
        # Set when the job is cancelled (a client, a deadline, a shutdown): wait on it, never
        # sleep.
        self.cancel_requested = threading.Event()
        self.progress = Progress()
        self._on_progress = on_progress
        self._processes: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def set_progress(self, done: float, total: float, unit: str) -> None:
        self.progress = Progress(done, total, unit)
        if self._on_progress is not None:
            self._on_progress(self.progress)

    def raise_if_cancelled(self) -> None:
        """JobCancelled once the job has been cancelled."""
        if self.cancel_requested.is_set():
            raise JobCancelled(self.id)

    def attach_process(self, process: subprocess.Popen) -> None:
        """Remember a child process so a cancel kills it (processes.run does this)."""
        with self._lock:
            self._processes.add(process)
        if self.cancel_requested.is_set():
            process.kill()

    def detach_process(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._processes.discard(process)

    def cancel(self) -> None:
        """Ask the handler to stop and kill its child processes (from any thread)."""
        self.cancel_requested.set()
        with self._lock:
            running = list(self._processes)
        for process in running:
            process.kill()


@dataclass(frozen=True)
class Batch:
    """Adaptive batching: a worker takes the first queued job of its kind and up to
    `max_size - 1` more that are queued within `max_wait` seconds, and runs them in one call
    of the handler, which then takes a list of contexts and returns one `Output` or exception
    per job, in order."""

    max_size: int = 32
    max_wait: float = 0.01

    def __post_init__(self) -> None:
        if self.max_size < 1 or self.max_wait < 0:
            raise ValueError(f"Batch(max_size={self.max_size}, max_wait={self.max_wait}): "
                             "max_size is at least 1 and max_wait at least 0")


@dataclass(frozen=True)
class Retry:
    """Run a failed job again, up to `attempts` runs in all: the n-th retry waits `backoff`
    × 2^(n-1) seconds, at most `max_backoff`, with `jitter` a random part of that (so retries
    of many jobs spread out). Only errors of the `on` types are retried (any error by
    default); BadInput (TooLarge, UnsupportedInput), a cancel, a deadline and a shutdown
    never are. A handler may also raise `RetryLater(after=…)` to pick the wait itself."""

    attempts: int = 3
    backoff: float = 1.0
    max_backoff: float = 60.0
    jitter: bool = True
    on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff < 0 or self.max_backoff < 0:
            raise ValueError(f"Retry(attempts={self.attempts}, backoff={self.backoff}, "
                             f"max_backoff={self.max_backoff}): attempts is at least 1, the "
                             "back-offs at least 0")
        if isinstance(self.on, type):  # Retry(on=TimeoutError): one type
            object.__setattr__(self, "on", (self.on,))


@dataclass(frozen=True)
class JobKind:
    """One kind of work: a name (the `jobType`), its options and the handler that runs it.

    `workers`, `queue_size`, `timeout` and `retry.attempts - 1` are the kind's defaults for
    its JOBQUEUE_<NAME>_WORKERS, _QUEUE_SIZE, _TIMEOUT and _RETRIES settings.
    """

    name: str
    description: str
    options: type[BaseModel]
    # handler(job) -> Output; with `batch`, handler(jobs) -> [Output | Exception, ...].
    handler: Callable[[JobContext], Output] | Callable[[list[JobContext]], list[Any]]
    # Bundled file used when a request uploads none; None when the kind takes no file.
    sample: Path | None = None
    # Quick look at an upload before it is queued, given the job's options: UnsupportedInput
    # for the wrong kind of file, TooLarge for one over the server's limits.
    check_input: Callable[[Path, BaseModel, Settings], None] | None = None
    # What the dashboard's file picker offers, as in <input accept>: ".pdf", "video/*".
    accept: str = ""
    # Whether the handler writes files into `out_dir` (made for it before it runs).
    writes_files: bool = True
    # Threads (or a distributed worker's slots) that run its jobs at once, in each process.
    workers: int = 1
    # Jobs that may wait for a worker; past them a submission gets 503.
    queue_size: int = 10
    # How long `POST /put` waits for a job of this kind, from its submission (seconds).
    timeout: float = 60.0
    # setup(settings) runs once per process that runs the kind's jobs, on a thread of its own
    # as it starts (tried again while it raises; its jobs wait meanwhile, resources.py); what
    # it returns is each job's `resource` (a model, a client). teardown(resource) at shutdown,
    # once the kind's workers have stopped.
    setup: Callable[[Settings], Any] | None = None
    teardown: Callable[[Any], None] | None = None
    # Run queued jobs in batches (see Batch); None: one job per call.
    batch: Batch | None = None
    # Run a failed job again (see Retry); None: a failure is final (JOBQUEUE_<NAME>_RETRIES
    # may still ask for retries).
    retry: Retry | None = None
