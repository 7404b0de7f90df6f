"""The embedded engine: every job runs in this process, on the worker threads of its kind.

One bounded `queue.Queue` per kind, served by that kind's threads; records in SQLite. Jobs are
live `Job` objects here, shared by a worker thread and the event loop; routes see none of them,
only the `JobEngine` facade (engines/base.py) and records.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import statistics
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any

from pydantic import BaseModel, ValidationError

from jobqueue import lifecycle, tracing
from jobqueue.engines.base import RETRY_AFTER_MAX_SECONDS, NewJob, retry_after
from jobqueue.engines.embedded.feed import Feed, PendingChanges
from jobqueue.engines.embedded.waiting import JobQueue, round_for
from jobqueue.errors import (
    Conflict,
    Gone,
    NotFound,
    QueueFull,
    SetupFailed,
    ShuttingDown,
    TooManyQueued,
    WouldTimeOut,
)
from jobqueue.files import jobfiles
from jobqueue.files.store import FileStore, LocalFiles
from jobqueue.jobs import FINISHED, JobContext, JobKind, JobStatus, Progress
from jobqueue.lifecycle import Ending
from jobqueue.metrics import Metrics, Outcome, outcome
from jobqueue.records import JobRecord, JobStore, Origin, SqliteJobStore
from jobqueue.resources import Resource
from jobqueue.rollup import MinuteFigures
from jobqueue.settings import KindLimits, Settings
from jobqueue.webhooks import Attempted, Delivery

log = logging.getLogger(__name__)

# How long stop() waits for a worker thread to finish its job after the job was told to cancel.
JOIN_SECONDS = 5.0
# How often the watchdog looks for jobs over their kind's timeout.
WATCHDOG_SECONDS = 0.5
# Threads given up on per pool before it stops replacing them: each one still holds memory,
# and a handler that hangs this often needs fixing, not more threads.
MAX_ABANDONED_THREADS = 4
# The recent run times a pool keeps, for the median of its estimates (lifecycle.estimated_start).
RECENT_RUNS = 50


@dataclass(eq=False)  # compared and hashed by identity
class Job:
    """One unit of work as this engine holds it: its state, shared by a worker thread and the
    event loop under `_lock`, and the `JobContext` its handler gets. Every change of state
    asks `lifecycle` whether it may happen."""

    id: str
    kind: JobKind
    options: BaseModel
    # Where job folders are (JOBQUEUE_OUT_DIR); the job's own is `out_dir`.
    files_root: Path
    input_path: Path | None
    loop: asyncio.AbstractEventLoop
    # Set (through the loop) once the job has reached a finished status.
    done: asyncio.Future[None]
    status: JobStatus = JobStatus.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    worker_name: str | None = None
    # How it ended (its output or error), once it has.
    ending: Ending | None = None
    origin: Origin = Origin.JOBS
    # The API key that submitted it, as `access.owner_of` names it; "" without API keys.
    owner: str = ""
    # The server's settings, for handlers with server-wide choices (pdf2image's engine).
    settings: Settings | None = None
    idempotency_key: str | None = None
    attempt: int = 0
    # Its place in its kind's queue (lifecycle.dispatch_order), set as it is queued.
    priority: int = 0
    fair_key: str = ""
    fair_round: int = 0
    seq: int = 0
    # While it waits for its next attempt after a failure: when that may start; and the
    # failed attempts before (lifecycle.earlier_error).
    next_attempt_at: float | None = None
    earlier_errors: list[dict[str, Any]] = field(default_factory=list)
    # The submitting request's traceparent (tracing.py): its spans continue that trace.
    traceparent: str | None = None
    # Set when shutdown stops the job: it is left as it was, to run again after a restart.
    rerun_after_restart: bool = False
    # Its record could not be written (a full disk): refused (507), so it leaves no record,
    # and no backlog of ended records a full disk can never take.
    refused: bool = False
    # When the engine's watchdog stops the job (epoch seconds), and whether it has.
    deadline: float | None = None
    timed_out: bool = False
    # What the first cancel said it was (a client's, a deadline, a shutdown): its outcome.
    cancelled_as: Outcome | None = None
    # While the handler of its batch runs: its files are tidied only after that returns.
    batch_running: bool = False
    # Called from whichever thread finishes the job, before the loop side hears of it.
    on_finish: Callable[[Job], None] | None = None
    # The record stored as it ended: what its waiters get, without making it again.
    ended_record: JobRecord | None = None
    # Called on the loop after every change (the dashboard's feed).
    on_change: Callable[[Job], None] | None = None
    # Whether anything beyond the job's own streams shows its changes (the dashboard's feed);
    # asked from any thread, so an answer a moment old is fine.
    watched: Callable[[], bool] = lambda: False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _notify_scheduled: bool = False
    # One queue per event-stream listener; touched only on the loop.
    _listeners: set[asyncio.Queue[None]] = field(default_factory=set)

    @functools.cached_property
    def out_dir(self) -> Path:
        """The job's folder: made when it starts, and only for kinds that write files."""
        return jobfiles.job_dir(self.files_root, self.id)

    @functools.cached_property
    def context(self) -> JobContext:
        """What its handler gets; its progress wakes whoever watches the job. Made on the loop
        as the job is (`_new_job`), before any thread may ask for it."""
        # The job by a weak reference: the context's hook holding the job that holds the
        # context made every job a reference cycle, freed only by the garbage collector.
        job = weakref.ref(self)

        def changed(_: Progress) -> None:
            if (alive := job()) is not None:
                alive.changed()

        return JobContext(self.id, self.options, self.input_path, self.out_dir, self.settings,
                          on_progress=changed)

    @property
    def cancel_requested(self) -> threading.Event:
        return self.context.cancel_requested

    @functools.cached_property
    def _options_json(self) -> dict[str, Any]:
        return self.options.model_dump(mode="json")  # the same in each of its records

    def start(self, worker_name: str) -> bool:
        """Mark the job running; False when it was cancelled while it waited in the queue."""
        with self._lock:
            if not lifecycle.can_start(self.status):
                return False
            self.status = JobStatus.RUNNING
            self.started_at = time.time()
            self.worker_name = worker_name
            self.attempt = lifecycle.next_attempt(self.attempt)
            self.next_attempt_at = None
        self.changed()
        return True

    def queue_again(self, failure: dict[str, Any], next_attempt_at: float,
                    store: JobStore) -> bool:
        """A failed attempt its kind retries: back to queued until `next_attempt_at`, its
        record saved (under the lock, so a next start's record comes after it). False when a
        cancel came meanwhile: then it ends as its run did."""
        with self._lock:
            if self.status is not JobStatus.RUNNING or self.cancel_requested.is_set():
                return False
            self.status = JobStatus.QUEUED
            self.started_at = self.worker_name = None
            self.next_attempt_at = next_attempt_at
            self.earlier_errors = [*self.earlier_errors, failure]
            self.context.progress = Progress()
            store.save(self._record_locked())
        self.changed()
        return True

    def finish(self, ending: Ending) -> bool:
        """Move to a finished status once; later calls change nothing and return False."""
        with self._lock:
            if not self._finish_locked(ending):
                return False
        self._finished()
        return True

    def cancel(self, ending: Ending | None = None) -> JobStatus:
        """Ask the job to stop: a queued job ends now, a running one has its child processes
        killed and it stops at its handler's next check; one running in a batch ends now, as
        `ending` says (default: cancelled). Returns the status it found."""
        self.context.cancel()
        with self._lock:
            found = self.status
            at_cancel = lifecycle.at_cancel(found, batched=self.kind.batch is not None)
            if at_cancel is lifecycle.AtCancel.ENDS_NOW:
                ending = Ending(JobStatus.CANCELLED)
            ended_here = (at_cancel in (lifecycle.AtCancel.ENDS_NOW,
                                        lifecycle.AtCancel.LEAVES_BATCH)
                          and self._finish_locked(ending or Ending(JobStatus.CANCELLED)))
        if ended_here:
            self._finished()
        return found

    def _finish_locked(self, ending: Ending) -> bool:
        if not lifecycle.can_end(self.status):
            return False
        self.status = ending.status
        self.finished_at = time.time()
        self.ending = ending
        return True

    def _finished(self) -> None:
        if self.on_finish is not None:
            try:
                self.on_finish(self)
            except Exception:  # recording must not keep waiters from hearing the job ended
                log.exception("job %s: could not record its end", self.id)
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

    def save_started(self, store: JobStore) -> None:
        """Save the job as started, unless it has ended already: under its lock, so an end
        that comes meanwhile (a batched job's cancel ends it at once) is saved after this,
        never before (the store keeps the last change)."""
        with self._lock:
            if not self.status.finished:
                store.save(self._record_locked())

    def _record_locked(self) -> JobRecord:
        ending = self.ending
        return JobRecord(
            id=self.id, job_type=self.kind.name, status=self.status.value,
            options=self._options_json,
            input_path=str(self.input_path) if self.input_path else None,
            created_at=self.created_at, started_at=self.started_at,
            finished_at=self.finished_at, worker_name=self.worker_name,
            progress=self.context.progress.as_dict(),
            error=ending.error_message(self.id) if ending else None,
            error_kind=ending.error_category if ending else None,
            result=ending.result if ending else None,
            origin=self.origin,
            owner=self.owner,
            attempt=self.attempt,
            idempotency_key=self.idempotency_key,
            priority=self.priority,
            fair_key=self.fair_key,
            fair_round=self.fair_round,
            next_attempt_at=self.next_attempt_at,
            earlier_errors=self.earlier_errors,
            traceparent=self.traceparent,
        )


class WorkerPool:
    """One job kind's bounded queue and the threads that take jobs from it, once the kind's
    resource (its `setup`) is ready."""

    # A job still running this long after its timeout has a handler that ignores cancels: its
    # thread is given up on and a new one takes its place, so the pool keeps its workers.
    abandon_after = 10.0

    def __init__(self, kind: JobKind, limits: KindLimits, store: JobStore, metrics: Metrics,
                 max_run_seconds: float = 3600, resource: Resource | None = None,
                 max_queued_per_key: int = 0):
        self.kind = kind
        # What its setup made, for every job of it; its threads take no job until it is ready.
        self.resource = resource or Resource(kind, None)
        self.limits = limits
        self.store = store
        self.metrics = metrics
        # How long a POST /jobs job may run; a /put job's deadline is its kind's timeout
        # (lifecycle.deadline).
        self.max_run_seconds = max_run_seconds
        self.queue = JobQueue(limits.queue_size)
        # JOBQUEUE_MAX_QUEUED_PER_KEY: one owner's queued jobs of the kind, at most (0: any).
        self.max_queued_per_key = max_queued_per_key
        self.retry = lifecycle.retry_policy(kind, limits.retries)
        self.threads: list[threading.Thread] = []
        self.running: set[Job] = set()
        # A batched kind's batch on each thread (by its name), while its handler runs.
        self.batches: dict[str, list[Job]] = {}
        # Threads whose job hung past its timeout: they exit if their handler ever returns.
        self.abandoned: set[threading.Thread] = set()
        self.closed = False
        self._lock = threading.Lock()
        # Moving average of how long a job takes, for the Retry-After of a full queue before
        # there is an estimate; the recent run times, for the estimates' median.
        self._average_seconds = 1.0
        self._recent_runs: deque[float] = deque(maxlen=RECENT_RUNS)
        # How many runs were added, and (at that count) how many are kept and their median.
        self._runs_added = 0
        self._median: tuple[int, int, float | None] = (0, 0, None)
        # Called on the loop with the waiting jobs when the queue has moved (Engine sets it).
        self.on_queue_moved: Callable[[list[Job]], None] = lambda jobs: None

    def start(self) -> None:
        self.resource.start()  # on a thread of its own: the server answers meanwhile
        for number in range(1, self.limits.workers + 1):
            self._start_thread(f"{self.kind.name}-worker-{number}")

    def _start_thread(self, name: str) -> None:
        thread = threading.Thread(target=self._serve, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def enforce_timeout(self) -> None:
        """Stop jobs running past their deadline; replace threads whose handler hangs."""
        now = time.time()
        with self._lock:
            running = list(self.running)
            batches = list(self.batches.values())
        for job in running:
            over = now - job.deadline if job.deadline else -1
            if over < 0 or job.status.finished:
                continue
            if not job.timed_out:
                job.timed_out = True
                log.warning("job %s: past its deadline; stopping it", job.id)
                job.cancelled_as = job.cancelled_as or Outcome.DEADLINE
                # Kills its child processes; the handler stops at its next check (a job of a
                # batch ends now).
                job.cancel(self._at_deadline(job))
            elif over > self.abandon_after:
                self._abandon([job])
        for jobs in batches:
            # Every job of the batch has ended (cancels, deadlines), and its handler still
            # runs past the last of their deadlines: it ignores cancels, as a single job's may.
            last = max(job.deadline or now for job in jobs)
            if now - last > self.abandon_after and all(job.status.finished for job in jobs):
                self._abandon(jobs)

    def _abandon(self, jobs: list[Job]) -> None:
        """Give up on the thread that runs `jobs` (one job, or a batch)."""
        with self._lock:
            thread = next((t for t in self.threads if t.name == jobs[0].worker_name), None)
            if (thread is None or jobs[0] not in self.running or self.closed
                    or len(self.abandoned) >= MAX_ABANDONED_THREADS):
                return
            self.abandoned.add(thread)
            self.threads.remove(thread)
            self.running.difference_update(jobs)
            self.batches.pop(thread.name, None)
            self._start_thread(f"{thread.name}+")
        log.error("job %s: its handler ignored the cancel for %g s; %s is given up on and a "
                  "new thread takes its place", ", ".join(job.id for job in jobs),
                  self.abandon_after, thread.name)
        for job in jobs:
            job.finish(self._at_deadline(job))

    def _at_deadline(self, job: Job) -> Ending:
        return lifecycle.at_deadline(job.id, job.origin, self.max_run_seconds)

    def stats(self) -> dict[str, int]:
        with self._lock:
            # Busy until its status is final (not until the thread lets go of it), so stats
            # read right after a job's last change already count it as done.
            busy = sum(1 for job in self.running if not job.status.finished)
        return {
            "workers": len(self.threads),
            "busy": busy,
            "queued": self.queue.qsize(),
            "capacity": self.limits.queue_size,
        }

    def check_room(self) -> None:
        self.resource.check()  # a kind whose setup failed takes no new job (503)
        if self.queue.qsize() >= self.limits.queue_size:
            raise QueueFull(self.kind.name, self.limits.queue_size, self.retry_after())

    def _check_owner(self, queued: list[Job], owner: str) -> None:
        """TooManyQueued (429) when `owner` has JOBQUEUE_MAX_QUEUED_PER_KEY jobs waiting."""
        cap = self.max_queued_per_key
        if cap and sum(1 for job in queued if job.fair_key == owner) >= cap:
            raise TooManyQueued(self.kind.name, cap, self.retry_after())

    def submit(self, job: Job, respond_async: bool = True) -> None:
        """Queue a job without ever blocking, in its place by priority and fair share:
        QueueFull when there is no room, TooManyQueued past its owner's cap, WouldTimeOut for
        a /put job (unless `respond_async`) whose estimated start is past the kind's timeout."""
        if self.closed:
            raise ShuttingDown
        self.resource.check()
        running = self._running_now()

        def place(queued: list[Job]) -> None:
            if len(queued) >= self.limits.queue_size:
                raise QueueFull(self.kind.name, self.limits.queue_size, self.retry_after())
            self._check_owner(queued, job.fair_key)
            job.fair_round = round_for(queued, running, job.fair_key, job.priority)
            job.seq = self.queue.next_seq()
            if job.origin is Origin.PUT and not respond_async:
                ahead = sum(1 for other in queued if other.next_attempt_at is None and
                            lifecycle.dispatch_order(other.priority, other.fair_round,
                                                     other.seq) <
                            lifecycle.dispatch_order(job.priority, job.fair_round, job.seq))
                estimate = self.estimate(ahead, len(running))
                if estimate is not None and estimate > self.limits.timeout:
                    raise WouldTimeOut(self.kind.name, estimate, self.limits.timeout)

        self.queue.put(job, place)

    def _running_now(self) -> list[Job]:
        with self._lock:
            return [job for job in self.running if not job.status.finished]

    def requeue(self, job: Job) -> None:
        """Queue a job accepted before (recovered after a restart, retried), even past
        capacity, in the order of its arrival now."""
        job.seq = self.queue.next_seq()
        self.queue.put(job, force=True)

    def position(self, job: Job) -> int | None:
        """1 for the next job to start; None when the job is not waiting."""
        return self.queue.position(job)

    def estimate(self, ahead: int, busy: int | None = None) -> float | None:
        """Seconds until a job with `ahead` jobs before it likely starts
        (lifecycle.estimated_start), from the kind's recent run times."""
        # Every /put asks, and only a run's end changes it: made again only then.
        version, finished, median = self._median
        if version != self._runs_added:
            version, runs = self._runs_added, list(self._recent_runs)
            finished, median = len(runs), statistics.median(runs) if runs else None
            self._median = (version, finished, median)
        if busy is None:
            busy = len(self._running_now())
        return lifecycle.estimated_start(ahead, median, finished, self.limits.workers, busy)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the estimated start of a job sent now (the
        whole queue ahead of it), else, before there is an estimate, the first running job's
        expected end (base.retry_after)."""
        estimate = self.estimate(self.queue.qsize())
        if estimate is not None:
            return max(1, min(RETRY_AFTER_MAX_SECONDS, math.ceil(estimate)))
        now = time.time()
        with self._lock:
            elapsed = [now - job.started_at for job in self.running
                       if job.started_at is not None and not job.status.finished]
        return retry_after(self._average_seconds, elapsed, self.limits.workers)

    def discard(self, job: Job) -> None:
        """Take a cancelled job out of the queue so its slot is free at once."""
        if self.queue.remove(job):
            self._tell_waiting_jobs()

    def _tell_waiting_jobs(self) -> None:
        """The queue moved: event streams of waiting jobs show their new position (one wake-up
        of the loop for them all, and nothing to do when no stream watches)."""
        waiting = self.queue.jobs()
        # Read off the loop, so it may be a moment old; a stream that starts reads the state.
        if any(job.streamed or job.watched() for job in waiting):
            try:
                waiting[0].loop.call_soon_threadsafe(self.on_queue_moved, waiting)
            except RuntimeError:  # the loop is closed: nobody is watching
                pass

    def stop(self) -> None:
        """Stop the threads. Queued jobs stay queued in the store and running ones are told to
        stop and left as they were, so both run again after a restart. Then the kind's
        teardown."""
        self.closed = True
        self.resource.close()  # threads still waiting for it stop waiting
        self.queue.close()  # every thread's next take is its end; the queued jobs stay stored
        with self._lock:
            running = list(self.running)
        for job in running:
            asked_to_cancel = job.cancel_requested.is_set()
            if lifecycle.after_interrupted_run(asked_to_cancel) is JobStatus.QUEUED:
                job.rerun_after_restart = True  # left as it was, to run again after a restart
            job.cancel()
        deadline = time.monotonic() + JOIN_SECONDS
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("%s did not stop within %.0f s", thread.name, JOIN_SECONDS)
        with self._lock:
            handling = [thread for thread in [*self.threads, *self.abandoned]
                        if thread.is_alive()]
        if handling:  # a handler still runs: freeing its resource under it could crash it
            log.warning("the %s teardown is skipped: %s still run its handler", self.kind.name,
                        ", ".join(thread.name for thread in handling))
            return
        self.resource.teardown()

    def _serve(self) -> None:
        worker_name = threading.current_thread().name
        while True:
            if not self.resource.wait_ready():  # until then, its jobs wait in the queue
                return  # shutting down
            job = self.queue.get()
            if job is None:
                return
            if self.kind.batch is None:
                jobs, last = ([job] if self._start(job, worker_name) else []), False
            else:
                jobs, last = self._take_batch(job, worker_name)
            if jobs:
                try:
                    if self.kind.batch is None:
                        self._run(jobs[0])
                    else:
                        self._run_batch(jobs)
                except BaseException as error:  # only a bug gets here; the thread keeps serving
                    log.exception("job %s: engine error", ", ".join(job.id for job in jobs))
                    for job in jobs:
                        job.finish(Ending(JobStatus.FAILED, error=error))
                with self._lock:
                    # Not a job queued again for a retry that another thread runs by now.
                    self.running.difference_update(
                        job for job in jobs if job.worker_name in (worker_name, None))
                    if self.batches.get(worker_name) is jobs:
                        del self.batches[worker_name]
                    given_up = threading.current_thread() in self.abandoned
                    self.abandoned.discard(threading.current_thread())
                if given_up:
                    return  # a replacement serves the queue now
            job = jobs = None  # an ended job (its output) is not kept until the next one comes
            if last:
                return  # stop() sent this thread its end while it gathered a batch

    def _start(self, job: Job, worker_name: str) -> bool:
        """Start a job taken from the queue; False when it was cancelled while it waited, or
        is left for after a restart."""
        with self._lock:  # so stop() sees every job that has started
            if self.closed or not job.start(worker_name):
                return False
            job.deadline = lifecycle.deadline(job.origin, job.created_at, job.started_at,
                                              self.limits.timeout, self.max_run_seconds)
            self.running.add(job)
        self.metrics.job_started(self.kind.name, job.created_at, job.started_at)
        self._tell_waiting_jobs()
        try:
            job.save_started(self.store)  # so GET /jobs?status=running finds it
        except BaseException as error:  # only a bug gets here; the thread keeps serving
            log.exception("job %s: engine error", job.id)
            job.finish(Ending(JobStatus.FAILED, error=error))
            with self._lock:
                self.running.discard(job)
            return False
        return True

    def _take_batch(self, first: Job, worker_name: str) -> tuple[list[Job], bool]:
        """A batch: `first` (taken from the queue as it came) and up to max_size - 1 more
        jobs queued within max_wait from then, each started as it is taken (one cancelled
        while it waited is left out). Also whether stop() sent this thread its end meanwhile."""
        batch = self.kind.batch
        jobs = [first] if self._start(first, worker_name) else []
        if not jobs:
            return [], False
        until = time.monotonic() + batch.max_wait
        while len(jobs) < batch.max_size:
            left = until - time.monotonic()
            try:  # those queued already, even past max_wait; then the next until it is up
                job = self.queue.get(timeout=max(0.0, left))
            except Empty:
                break
            if job is None:
                return jobs, True
            if self._start(job, worker_name):
                jobs.append(job)
        return jobs, False

    def _run_batch(self, jobs: list[Job]) -> None:
        """One call of the batched kind's handler for `jobs`; each ends as its answer says,
        unless it ended before the batch did (a cancel, its deadline: its answer is dropped)."""
        with self._lock:
            self.batches[threading.current_thread().name] = jobs
        # A span each; none is current while the handler runs for them all.
        traces = [self._trace(job) for job in jobs]
        for job in jobs:
            job.batch_running = True
            job.context.resource = self.resource.value
        log.debug("jobs %s: a batch of %d %s jobs started on %s",
                  ", ".join(job.id for job in jobs), len(jobs), self.kind.name,
                  jobs[0].worker_name)
        endings = lifecycle.run_batch(
            self.kind, [job.context for job in jobs],
            on_call=lambda size: self.metrics.batch_called(self.kind.name, size))
        for job in jobs:
            job.batch_running = False
        for job, ending, trace in zip(jobs, endings, traces):
            if job.status.finished or not self._end(job, ending):
                tidy_files(job)  # it ended before its batch: its files go now
            if trace is not tracing.NO_TRACE:
                trace.end(*run_outcome(job))

    def _retried(self, job: Job, ending: Ending, seconds: float) -> bool:
        """Queue a failed attempt again, if the kind's Retry says so (lifecycle.retry_in)."""
        now = time.time()
        delay = lifecycle.retry_in(ending, self.retry, len(job.earlier_errors), job.origin,
                                   job.created_at, self.limits.timeout, now,
                                   stopped=job.cancel_requested.is_set() or self.closed)
        if delay is None:
            return False
        if self.kind.writes_files:  # the next attempt starts from its upload alone
            jobfiles.discard_output(job.out_dir)
        failure = lifecycle.earlier_error(job.attempt, ending.error_message(job.id), now)
        started_at = job.started_at
        with self._lock:  # before it is queued: a thread may take it at once
            self.running.discard(job)
        if not job.queue_again(failure, now + delay, self.store):
            with self._lock:
                self.running.add(job)  # a cancel came: it ends as its run did
            return False
        running = self._running_now()
        self.queue.put(job, lambda queued: setattr(job, "fair_round", round_for(
            queued, running, job.fair_key, job.priority)), force=True)
        self.metrics.job_ended(self.kind.name, Outcome.RETRIED, started_at, now)
        log.info("job %s: attempt %d failed after %.3f s (%s); it runs again in %.1f s",
                 job.id, job.attempt, seconds, failure["error"], delay)
        self._tell_waiting_jobs()
        return True

    def _run(self, job: Job) -> None:
        trace = self._trace(job)
        try:
            with trace.active():  # the children it runs and the lines it logs are in its span
                log.debug("job %s: %s started on %s", job.id, self.kind.name, job.worker_name)
                job.context.resource = self.resource.value
                self._end(job, lifecycle.run(self.kind, job.context))
        finally:
            if trace is not tracing.NO_TRACE:  # nothing to work out while tracing is off
                trace.end(*run_outcome(job))

    def _trace(self, job: Job) -> tracing.JobTrace | tracing._NoTrace:
        return tracing.start_job(self.kind.name, job.id, job.attempt, job.traceparent,
                                 job.created_at, job.started_at)

    def _end(self, job: Job, ending: Ending) -> bool:
        """End a job its handler has run for; False when it had ended already."""
        if job.timed_out:  # whatever the handler made of being stopped
            ending = self._at_deadline(job)
        seconds = time.time() - job.started_at
        self._average_seconds = 0.8 * self._average_seconds + 0.2 * seconds
        if ending.status is not JobStatus.CANCELLED:
            self._recent_runs.append(seconds)
            self._runs_added += 1
        if not job.timed_out and self._retried(job, ending, seconds):
            return True
        # Logged before the waiters hear of it, so the line never holds up their answer. A
        # /put job that succeeded shows in the access log already (its 200).
        quiet = ending.status is JobStatus.SUCCEEDED and job.origin is Origin.PUT
        level = logging.DEBUG if quiet else logging.INFO
        log.log(level, "job %s: %s after %.3f s", job.id, ending.status.value, seconds)
        return job.finish(ending)


class EmbeddedEngine:
    """The `JobEngine` of one process: a `WorkerPool` per kind, records in SQLite."""

    def __init__(self, settings: Settings, kinds: dict[str, JobKind],
                 metrics: Metrics | None = None, store: JobStore | None = None):
        self.settings = settings
        self.out_dir = settings.out_dir
        self.files: FileStore = LocalFiles(settings.out_dir)
        if settings.storage_url.strip():
            log.warning("JOBQUEUE_STORAGE_URL is for the distributed mode (with "
                        "JOBQUEUE_DATABASE_URL); this embedded server keeps files in %s",
                        settings.out_dir)
        self.kinds = kinds
        self.metrics = metrics or Metrics(kinds)
        self.store: JobStore = store or SqliteJobStore(settings.job_db)
        self.pools = {
            name: WorkerPool(kind, settings.limits(kind), self.store, self.metrics,
                             settings.job_max_seconds, Resource(kind, settings),
                             settings.max_queued_per_key)
            for name, kind in kinds.items()
        }
        self._active: dict[str, Job] = {}  # jobs not finished yet, by id
        self._loop: asyncio.AbstractEventLoop | None = None  # the one it serves, once known
        self._retrying: set[str] = set()  # failed jobs a client's retry is queueing again
        self.storing: frozenset[str] = frozenset()  # an upload stays where it was written
        self._feed = Feed()
        for pool in self.pools.values():
            pool.on_queue_moved = self._queue_moved
        self._stopping = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    # ---- life ----

    async def start(self) -> None:
        """Queue again what a previous run accepted but did not finish, then start the threads."""
        jobfiles.claim_out_dir(self.out_dir, self.store.store_id)
        self.store.release_deliveries()  # claims of a run before this one
        for record in self.store.unfinished():
            self._recover(record)
        for pool in self.pools.values():
            pool.start()
        self._watchdog.start()
        log.info("workers started: %s",
                 {name: pool.limits.workers for name, pool in self.pools.items()})

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_now)
        self.store.close()

    def stop_now(self) -> None:
        """Stop every pool (once; later calls do nothing), from any thread."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for pool in self.pools.values():
            pool.stop()

    async def close_intake(self) -> None:
        """Start no more queued jobs (they stay queued in the store for the next start) and
        end the queued /put jobs, whose clients would wait in vain."""
        for pool in self.pools.values():
            pool.closed = True
        self._end_put_jobs(JobStatus.QUEUED)

    async def end_put_jobs(self) -> None:
        self._end_put_jobs(JobStatus.RUNNING)

    def _end_put_jobs(self, status: JobStatus) -> None:
        for job in list(self._active.values()):
            if job.origin is Origin.PUT and job.status is status:
                self._cancel(job, "the server is shutting down", Outcome.SHUTDOWN)

    async def busy(self) -> bool:
        return any(pool.stats()["busy"] for pool in self.pools.values())

    async def health(self) -> dict[str, str]:
        return {}  # nothing outside this process to depend on

    def _watch(self) -> None:
        """Cut jobs that run past their deadline, on /put and /jobs alike."""
        while not self._stopping.wait(WATCHDOG_SECONDS):
            for pool in self.pools.values():
                try:
                    pool.enforce_timeout()
                except Exception:  # the watchdog must outlive any one bad check
                    log.exception("watchdog: checking %s jobs failed", pool.kind.name)

    # ---- the facade: by job id ----

    async def submit(self, new: NewJob, durable: bool) -> JobRecord:
        if new.idempotency_key:
            # No await between the look and the save: one loop, one job per key.
            earlier = self.store.find_idempotent(new.owner, new.idempotency_key)
            if earlier is not None and (gone := self._active.get(earlier.id)) and gone.refused:
                earlier = None  # refused for a full disk, and going: this one is its retry
            if earlier is not None:
                await self._remove_upload(new)  # the earlier job has its own
                return earlier
        job = self._new_job(new.kind, new.options, new.id, new.input_path, new.origin,
                            new.owner, new.idempotency_key)
        job.priority, job.fair_key = new.priority, new.fair_key
        job.traceparent = new.traceparent
        pool = self.pools[job.kind.name]
        try:
            pool.submit(job, respond_async=new.respond_async)
            # Before a worker's update of it (the store keeps the last change): a job started
            # this instant saves its start after this, under its lock.
            with job._lock:
                record = job._record_locked()
                if job.status is JobStatus.QUEUED and job.started_at is None:
                    self.store.save(record)
            if new.callback_url:  # in the same commit as its record
                self.store.add_callback(job.id, job.owner, new.callback_url)
        except (QueueFull, SetupFailed, ShuttingDown, TooManyQueued, WouldTimeOut):
            self.store.delete(job.id)
            await self._remove_upload(new)
            raise
        self._track(job)
        self._feed.job_changed(job)
        log.debug("job %s: %s queued", job.id, job.kind.name)
        if durable:  # answered 202: accepted means on disk, to survive a restart
            try:
                await self.store.written()
            except BaseException as error:  # a full disk (507), or a client gone meanwhile
                # Not accepted after all. The job may have started: it stops, and is
                # forgotten if it was never written (a gone client's job ends cancelled).
                job.refused = not isinstance(error, asyncio.CancelledError)
                self._cancel(job, "its record could not be written")
                raise
        return record

    async def _remove_upload(self, new: NewJob) -> None:
        """The folder of an upload that is no job after all (rather than the orphan sweep's,
        10 minutes later, with the whole upload on disk meanwhile)."""
        if new.input_path is not None:
            await asyncio.to_thread(jobfiles.remove_job_dir, self.out_dir, new.id)

    async def check_room(self, kind: str, owner: str = "",
                         idempotency_key: str | None = None) -> None:
        try:
            self.pools[kind].check_room()
        # Only then is the key worth a look in the store.
        except (QueueFull, SetupFailed):
            if not (idempotency_key and self.store.find_idempotent(owner, idempotency_key)):
                raise

    async def get(self, job_id: str) -> JobRecord | None:
        job = self._active.get(job_id)
        return job.record() if job else self.store.get(job_id)

    async def position(self, job_id: str) -> int | None:
        job = self._active.get(job_id)
        return self.pools[job.kind.name].position(job) if job else None

    async def estimated_start(self, job_id: str) -> float | None:
        job = self._active.get(job_id)
        if job is None or job.status is not JobStatus.QUEUED:
            return None
        pool = self.pools[job.kind.name]
        position = pool.position(job)
        if position is None:
            return None
        estimate = pool.estimate(position - 1)
        if estimate is not None and job.next_attempt_at is not None:  # not before its retry
            estimate = max(estimate, job.next_attempt_at - time.time())
        return estimate

    async def hand_over(self, job_id: str) -> JobRecord | None:
        job = self._active.get(job_id)
        if job is None:
            return None
        with job._lock:
            if job.status not in lifecycle.CAN_HAND_OVER or job.timed_out \
                    or job.cancel_requested.is_set():  # being stopped: its end is the answer
                return None
            if job.origin is Origin.PUT:
                job.origin = Origin.JOBS
                if job.started_at is not None:  # its run may now take JOBQUEUE_JOB_MAX_SECONDS
                    job.deadline = lifecycle.deadline(
                        Origin.JOBS, job.created_at, job.started_at,
                        self.pools[job.kind.name].limits.timeout, self.settings.job_max_seconds)
            record = job._record_locked()
            self.store.save(record)
        log.info("job %s: handed over to its client (Prefer: respond-async); it runs on",
                 job.id)
        await self.store.written()  # a kept job survives a restart
        return record

    async def retry(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        if record is None:
            raise NotFound(f"There is no job {job_id!r}; it may have been deleted.")
        if job_id in self._active or job_id in self._retrying \
                or JobStatus(record.status) not in lifecycle.CAN_RETRY:
            status = "being retried" if job_id in self._retrying else record.status
            raise Conflict(f"Job {job_id} is {status}; only a failed job can be retried.")
        self._retrying.add(job_id)  # two retries at once: one runs it, the other gets 409
        try:
            return await self._retry(record)
        finally:
            self._retrying.discard(job_id)

    async def _retry(self, record: JobRecord) -> JobRecord:
        job_id = record.id
        kind = self.kinds.get(record.job_type)
        if kind is None:
            raise Conflict(f"Job {job_id} is of the kind {record.job_type}, which this server "
                           "does not serve.")
        input_path = Path(record.input_path) if record.input_path else None
        if lifecycle.upload_gone(record, kind) or (
                input_path is not None and not await asyncio.to_thread(input_path.exists)):
            raise Gone(f"The upload of job {job_id} has been removed (a failed /put job keeps "
                       "none), so it cannot run again; submit it anew.")
        try:
            options = kind.options.model_validate(record.options)
        except ValidationError:
            raise Conflict(f"Job {job_id}'s options are no longer valid for the {kind.name} "
                           "kind; submit it anew.") from None
        job = self._new_job(kind, options, record.id, input_path, Origin.JOBS, record.owner,
                            record.idempotency_key)
        job.created_at, job.attempt = record.created_at, record.attempt
        job.priority, job.fair_key = record.priority, record.fair_key
        job.traceparent = record.traceparent  # its trace goes on from the first submission
        job.earlier_errors = [*record.earlier_errors, lifecycle.earlier_error(
            record.attempt, record.error, record.finished_at or time.time())]
        pool = self.pools[kind.name]
        pool.submit(job)  # QueueFull, TooManyQueued, SetupFailed, ShuttingDown
        with job._lock:
            queued = job._record_locked()
            if job.status is JobStatus.QUEUED and job.started_at is None:
                self.store.save(queued)
        self._track(job)
        self._feed.job_changed(job)
        log.info("job %s: retried by its client (attempt %d failed)", job.id, record.attempt)
        await self.store.written()
        return queued

    async def wait(self, job_id: str, timeout: float) -> JobRecord:
        job = self._active.get(job_id)
        if job is not None:
            if not job.done.done():
                await _until_done(job.done, timeout)
            return job.ended_record or job.record()
        record = self.store.get(job_id)
        if record is None:
            raise LookupError(job_id)
        if record.status not in FINISHED:  # left queued by a shutdown: it runs after a restart
            await asyncio.sleep(timeout)
            raise TimeoutError
        return record

    async def cancel(self, job_id: str, reason: str,
                     ending: Outcome = Outcome.CANCELLED) -> None:
        job = self._active.get(job_id)
        if job is not None:
            self._cancel(job, reason, ending)

    async def delete(self, job_id: str) -> None:
        if (job := self._active.get(job_id)) is not None:
            # It has just ended, and its thread is still recording that: after that, or the
            # record would come back once deleted.
            await asyncio.shield(job.done)
        record = self.store.get(job_id)
        self.store.delete(job_id)  # first, so nobody is sent to missing files
        if record is not None:
            self._feed.job_removed(job_id, record.owner)
        # Answered only once it is on disk: a delete answered 200 never comes back with a
        # restart. A full disk raises here (507); the delete is written once there is room.
        await self.store.written()
        await asyncio.to_thread(jobfiles.remove_job_dir, self.out_dir, job_id)

    async def watch(self, job_id: str) -> AsyncIterator[JobRecord]:
        job = self._active.get(job_id)
        if job is None:
            record = self.store.get(job_id)
            if record is not None:
                yield record
            return
        changes = job.listen()
        try:
            while True:
                finished = job.status.finished
                yield job.record()
                if finished:
                    return
                await changes.get()
        finally:
            job.unlisten(changes)

    @asynccontextmanager
    async def feed(self, owner: str) -> AsyncIterator[_FeedOf]:
        listener = self._feed.listen(owner)
        try:
            yield _FeedOf(listener)
        finally:
            self._feed.unlisten(listener)

    async def stats(self) -> dict[str, dict[str, int | str]]:
        # Each kind's state too: its resource ready, loading or failed (with the error).
        stats = {}
        for name, pool in self.pools.items():
            stats[name] = figures = pool.stats()
            figures.update(pool.resource.status().shown())
        return stats

    async def throughput(self, owner: str, since: float) -> list[MinuteFigures]:
        return await asyncio.to_thread(self.store.throughput, owner, since)

    async def worker_processes(self) -> None:
        return None  # the workers are threads of this process

    async def list(self, status: str | None, job_type: str | None, limit: int, offset: int,
                   owner: str) -> list[JobRecord]:
        # In a thread: the store waits for records still being written.
        records = await asyncio.to_thread(self.store.list, status, job_type, limit, offset,
                                          owner)
        # Live progress for the jobs not finished yet.
        return [_summary(self._active[r.id].record()) if r.id in self._active else r
                for r in records]

    # ---- the facade: completion webhooks (webhooks.py) ----

    async def claim_deliveries(self, limit: int, lease: float) -> list[Delivery]:
        rows = await asyncio.to_thread(self.store.claim_deliveries, time.time(), limit, lease)
        return [Delivery(**row) for row in rows]

    async def delivery_done(self, delivery: Delivery, attempted: Attempted) -> None:
        await asyncio.to_thread(self.store.delivery_done, delivery.job_id, delivery.ended_at,
                                attempted.status, attempted.attempts, attempted.last_error,
                                attempted.next_at, attempted.payload, delivery.claimed_until)

    async def release_delivery(self, delivery: Delivery) -> None:
        # (A stop's cut attempts need none: the next start clears every claim.)
        await asyncio.to_thread(self.store.release_delivery, delivery.job_id,
                                delivery.ended_at, delivery.claimed_until)

    async def callback(self, job_id: str) -> dict | None:
        return self.store.delivery(job_id)  # one row by its key, on the reader

    # ---- the facade: for the retention sweeps ----

    @property
    def records_location(self) -> str:
        return self.store.location

    async def store_id(self) -> str:
        return self.store.store_id

    async def store_created_at(self) -> float:
        return self.store.created_at

    async def known(self, job_ids: list[str]) -> set[str]:
        return await asyncio.to_thread(self.store.known, job_ids)

    async def expired(self, before: float) -> list[str]:
        records = await asyncio.to_thread(self.store.finished_before, before)
        return [record.id for record in records]

    async def forget_minutes_before(self, timestamp: float) -> None:
        await asyncio.to_thread(self.store.forget_minutes_before, timestamp)

    # ---- inside ----

    def _new_job(self, kind: JobKind, options: BaseModel, job_id: str,
                 input_path: Path | None = None, origin: Origin = Origin.JOBS, owner: str = "",
                 idempotency_key: str | None = None) -> Job:
        """A job not yet queued; call from the event loop."""
        loop = self._loop
        if loop is None:  # asked once: each call makes a system call (getpid, Python 3.11)
            loop = self._loop = asyncio.get_running_loop()
        job = Job(id=job_id, kind=kind, options=options, files_root=self.out_dir,
                  input_path=input_path or kind.sample, loop=loop, done=loop.create_future(),
                  origin=origin, owner=owner, settings=self.settings,
                  idempotency_key=idempotency_key, on_finish=self._record_end,
                  on_change=self._feed.job_changed, watched=lambda: self._feed.listening)
        job.context  # made now, on the loop: a cancel and a worker then share the one context
        return job

    def _queue_moved(self, waiting: list[Job]) -> None:
        """On the loop: show waiting jobs' new positions to whoever streams them."""
        feed_listens = self._feed.listening
        for job in waiting:
            if feed_listens or job.streamed:
                job.notify_loop()

    def _record_end(self, job: Job) -> None:
        """Store how a job ended (on whichever thread ended it) before waiters hear of it."""
        if job.rerun_after_restart:
            log.info("job %s: stopped by shutdown; it runs again after a restart", job.id)
            return
        if not job.batch_running:  # else once its batch has returned: it may write on
            tidy_files(job)
        if job.refused:
            self.store.delete(job.id)
            return
        record = job.record()
        self.store.save(record, ended=True)
        job.ended_record = record
        self.metrics.job_ended(job.kind.name,
                               outcome(record.status, record.error_kind, job.cancelled_as),
                               record.started_at, record.finished_at)

    def _cancel(self, job: Job, reason: str, ending: Outcome = Outcome.CANCELLED) -> None:
        """Stop a job wherever it is; a queued one gives its queue slot back at once."""
        job.cancelled_as = job.cancelled_as or ending
        found = job.cancel()
        if found.finished:
            return
        log.info("job %s: cancelling %s job (%s)", job.id, found.value, reason)
        if found is JobStatus.QUEUED:
            self.pools[job.kind.name].discard(job)

    def _track(self, job: Job) -> None:
        self._active[job.id] = job
        job.done.add_done_callback(lambda _: self._active.pop(job.id, None))

    def _recover(self, record: JobRecord) -> None:
        """Queue a job again from its start, its partial output discarded."""
        if lifecycle.after_restart(record.origin) is JobStatus.CANCELLED:
            record.status, record.finished_at = JobStatus.CANCELLED.value, time.time()
            jobfiles.remove_job_dir(self.out_dir, record.id)
            self.store.save(record)
            self.metrics.job_ended(record.job_type, Outcome.SHUTDOWN, None, None)
            return
        kind = self.kinds.get(record.job_type)
        try:
            options = kind.options.model_validate(record.options) if kind else None
        except ValidationError:
            options = None
        if kind is None or options is None:
            record.status, record.error = JobStatus.FAILED.value, "unknown job type after restart"
            record.finished_at = time.time()
            self.store.save(record)
            self.metrics.job_ended(record.job_type, Outcome.FAILED, None, None)
            return
        job = self._new_job(kind, options, record.id,
                            Path(record.input_path) if record.input_path else None,
                            owner=record.owner, idempotency_key=record.idempotency_key)
        job.created_at, job.attempt = record.created_at, record.attempt
        job.priority, job.fair_round = record.priority, record.fair_round
        job.fair_key, job.traceparent = record.fair_key, record.traceparent
        job.next_attempt_at, job.earlier_errors = record.next_attempt_at, record.earlier_errors
        jobfiles.discard_output(job.out_dir)
        self.store.save(job.record())
        self.pools[kind.name].requeue(job)
        self._track(job)
        log.info("job %s: %s queued again after a restart", job.id, kind.name)


async def _until_done(done: asyncio.Future[None], timeout: float) -> None:
    """Wait for `done` at most `timeout` seconds (TimeoutError), never cancelling it: other
    waiters may share it. What asyncio.wait_for(asyncio.shield(done)) does, with one future
    and one timer rather than a shielding future, a waiter and their callbacks: every /put
    waits so."""
    loop = done.get_loop()
    woken = loop.create_future()

    def wake(_: object = None) -> None:
        if not woken.done():
            woken.set_result(None)

    done.add_done_callback(wake)
    timer = loop.call_later(timeout, wake)
    try:
        await woken
    finally:
        timer.cancel()
        done.remove_done_callback(wake)
    if not done.done():
        raise TimeoutError


def run_outcome(job: Job) -> tuple[str, str | None]:
    """A run's outcome as jobqueue_jobs_total counts it (`retried` when it waits for its next
    attempt), and its error's message, for its span."""
    if not job.status.finished:
        return Outcome.RETRIED.value, None
    ending = job.ending
    error_kind = ending.error_category if ending else None
    message = ending.error_message(job.id) if ending and ending.error else None
    return outcome(job.status.value, error_kind, job.cancelled_as).value, message


def tidy_files(job: Job) -> None:
    """Leave an ended job the files its end keeps (lifecycle.files_after); a refused one
    none. Done as it ends; for a job that ended before its batch did, once the batch's
    handler (which may write on into its folder meanwhile) has returned."""
    if job.rerun_after_restart:
        return  # left as it was: its partial output is discarded when it runs again
    keep = lifecycle.Keep.NOTHING if job.refused else lifecycle.files_after(job.status,
                                                                            job.origin)
    if keep is lifecycle.Keep.NOTHING:
        jobfiles.remove_job_dir(job.files_root, job.id)
    elif keep is lifecycle.Keep.INPUT:
        try:
            jobfiles.discard_output(job.out_dir)
        except OSError as error:  # its end is recorded all the same
            log.warning("job %s: its partial output could not be removed: %s", job.id, error)


class _FeedOf:
    """A `/events` listener that hands over records (with live progress), not jobs."""

    def __init__(self, listener: PendingChanges):
        self._listener = listener

    async def next_batch(self) -> tuple[list[JobRecord], list[str]]:
        jobs, removed = await self._listener.next_batch()
        return [_summary(job.record()) for job in jobs], removed


def _summary(record: JobRecord) -> JobRecord:
    """A record as lists show it: no options, the result's file names only."""
    record.options = {}
    if record.result:
        record.result = {"files": record.result["files"]}
    return record
