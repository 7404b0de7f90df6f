"""The queue engine: one bounded queue per job kind, served by that kind's worker threads."""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ValidationError

from . import storage
from .events import Feed
from .jobs import BadInput, DiskFull, Job, JobCancelled, JobKind, JobStatus, is_disk_full
from .settings import KindLimits, Settings
from .store import JobRecord, JobStore

log = logging.getLogger("jobqueue.engine")

# How long stop() waits for a worker thread to finish its job after the job was told to cancel.
JOIN_SECONDS = 5.0
# How often the watchdog looks for jobs over their kind's timeout.
WATCHDOG_SECONDS = 0.5
# Threads given up on per pool before it stops replacing them: each one still holds memory,
# and a handler that hangs this often needs fixing, not more threads.
MAX_ABANDONED_THREADS = 4


class QueueFull(Exception):
    """The kind's queue is at capacity; the client should retry after `retry_after` seconds."""

    def __init__(self, kind: str, capacity: int, retry_after: int):
        super().__init__(
            f"The {kind} queue is full ({capacity} jobs waiting); retry in {retry_after} s."
        )
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is stopping and takes no new jobs."""


class TimedOut(BadInput):
    """The job ran longer than its kind's timeout and was stopped."""


class WorkerPool:
    """One job kind's bounded queue and the threads that take jobs from it."""

    # A job still running this long after its timeout has a handler that ignores cancels: its
    # thread is given up on and a new one takes its place, so the pool keeps its workers.
    abandon_after = 10.0

    def __init__(self, kind: JobKind, limits: KindLimits, store: JobStore,
                 max_run_seconds: float = 3600):
        self.kind = kind
        self.limits = limits
        self.store = store
        # How long a POST /jobs job may run; a /put job's deadline is its kind's timeout.
        self.max_run_seconds = max_run_seconds
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=limits.queue_size)
        self.threads: list[threading.Thread] = []
        self.running: set[Job] = set()
        # Threads whose job hung past its timeout: they exit if their handler ever returns.
        self.abandoned: set[threading.Thread] = set()
        self.closed = False
        self._lock = threading.Lock()
        # Moving average of how long a job takes, for the Retry-After of a full queue.
        self._average_seconds = 1.0
        # Called on the loop with the waiting jobs when the queue has moved (Engine sets it).
        self.on_queue_moved: Callable[[list[Job]], None] = lambda jobs: None

    def start(self) -> None:
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
        for job in running:
            over = now - job.deadline if job.deadline else -1
            if over < 0 or job.status.finished:
                continue
            if not job.timed_out:
                job.timed_out = True
                log.warning("job %s: past its deadline; stopping it", job.id)
                job.cancel()  # kills its child processes; the handler stops at its next check
            elif over > self.abandon_after:
                self._abandon(job)

    def _abandon(self, job: Job) -> None:
        with self._lock:
            thread = next((t for t in self.threads if t.name == job.worker_name), None)
            if (thread is None or job not in self.running or self.closed
                    or len(self.abandoned) >= MAX_ABANDONED_THREADS):
                return
            self.abandoned.add(thread)
            self.threads.remove(thread)
            self.running.discard(job)
            self._start_thread(f"{thread.name}+")
        log.error("job %s: its handler ignored the cancel for %g s; %s is given up on and a "
                  "new thread takes its place", job.id, self.abandon_after, thread.name)
        job.finish(*self._timed_out(job))

    def _timed_out(self, job: Job) -> tuple[JobStatus, None, TimedOut | None]:
        """How a job stopped at its deadline ends: a /put job is cancelled (its client got
        504 and its folder goes), a POST /jobs job fails, naming the setting."""
        if job.origin == "put":
            return JobStatus.CANCELLED, None, None
        return JobStatus.FAILED, None, TimedOut(
            f"Job {job.id} ran longer than {self.max_run_seconds:g} s (JOBQUEUE_JOB_MAX_SECONDS)"
            " and was stopped. Send smaller input, or raise the setting.")

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

    def submit(self, job: Job) -> None:
        """Queue a job without ever blocking; QueueFull when there is no room."""
        if self.closed:
            raise ShuttingDown
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(self.kind.name, self.limits.queue_size, self.retry_after()) from None

    def requeue(self, job: Job) -> None:
        """Queue a job recovered after a restart, even past capacity: it was accepted already."""
        self._append(job)

    def _append(self, item: Job | None) -> None:
        # queue.Queue has no put that ignores maxsize; its mutex and deque are the way in.
        with self.queue.mutex:
            self.queue.queue.append(item)
            self.queue.unfinished_tasks += 1
            self.queue.not_empty.notify()

    def position(self, job: Job) -> int | None:
        """1 for the next job to start; None when the job is not waiting."""
        with self.queue.mutex:
            try:
                return self.queue.queue.index(job) + 1
            except ValueError:
                return None

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely to free up: one average job per worker."""
        return max(1, math.ceil(self._average_seconds / self.limits.workers))

    def discard(self, job: Job) -> None:
        """Take a cancelled job out of the queue so its slot is free at once."""
        with self.queue.mutex:
            try:
                self.queue.queue.remove(job)
            except ValueError:
                return
            self.queue.not_full.notify()
        self._tell_waiting_jobs()

    def _tell_waiting_jobs(self) -> None:
        """The queue moved: event streams of waiting jobs show their new position (one wake-up
        of the loop for them all, and nothing to do when no stream watches)."""
        with self.queue.mutex:
            waiting = [job for job in self.queue.queue if job is not None]
        # Read off the loop, so it may be a moment old; a stream that starts reads the state.
        if any(job.streamed or job.watched() for job in waiting):
            try:
                waiting[0].loop.call_soon_threadsafe(self.on_queue_moved, waiting)
            except RuntimeError:  # the loop is closed: nobody is watching
                pass

    def stop(self) -> None:
        """Stop the threads. Queued jobs stay queued in the store and running ones are told to
        stop and left as they were, so both run again after a restart."""
        self.closed = True
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        with self._lock:
            running = list(self.running)
        for job in running:
            if not job.cancel_requested.is_set():  # not cancelled by a client: run it again
                job.rerun_after_restart = True
            job.cancel()
        for _ in self.threads:
            self._append(None)  # past capacity if need be: put() could block forever
        deadline = time.monotonic() + JOIN_SECONDS
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("%s did not stop within %.0f s", thread.name, JOIN_SECONDS)

    def _serve(self) -> None:
        worker_name = threading.current_thread().name
        while True:
            job = self.queue.get()
            if job is None:
                return
            with self._lock:  # so stop() sees every job that has started
                if self.closed or not job.start(worker_name):
                    continue  # cancelled while it waited, or left for after a restart
                if job.deadline is None:
                    job.deadline = job.started_at + self.max_run_seconds
                self.running.add(job)
            self._tell_waiting_jobs()
            try:
                self.store.save(job.record())  # so GET /jobs?status=running finds it
                self._run(job)
            except BaseException as error:  # only a bug gets here; the thread keeps serving
                log.exception("job %s: engine error", job.id)
                job.finish(JobStatus.FAILED, error=error)
            with self._lock:
                self.running.discard(job)
                given_up = threading.current_thread() in self.abandoned
                self.abandoned.discard(threading.current_thread())
            if given_up:
                return  # a replacement serves the queue now

    def _run(self, job: Job) -> None:
        log.debug("job %s: %s started on %s", job.id, self.kind.name, job.worker_name)
        try:
            if self.kind.writes_files:
                storage.make_job_dir(job.out_dir)
            output = self.kind.handler(job)
        except JobCancelled:
            status, output, error = JobStatus.CANCELLED, None, None
        except BadInput as error_:
            log.info("job %s: bad input: %s", job.id, error_)
            status, output, error = JobStatus.FAILED, None, error_
        except BaseException as error_:  # a job's failure must never end its worker thread
            if isinstance(error_, DiskFull) or is_disk_full(error_):
                log.error("job %s: the disk is full: %s", job.id, error_)
                error_ = DiskFull(job.id)
            else:
                log.exception("job %s: failed", job.id)
            status, output, error = JobStatus.FAILED, None, error_
        else:
            status, error = JobStatus.SUCCEEDED, None
            if job.cancel_requested.is_set():
                status, output = JobStatus.CANCELLED, None
        if job.timed_out:  # whatever the handler made of being stopped
            status, output, error = self._timed_out(job)
        seconds = time.time() - job.started_at
        self._average_seconds = 0.8 * self._average_seconds + 0.2 * seconds
        # Logged before the waiters hear of it, so the line never holds up their answer. A
        # /put job that succeeded shows in the access log already (its 200).
        level = logging.DEBUG if status is JobStatus.SUCCEEDED and job.origin == "put" else logging.INFO
        log.log(level, "job %s: %s after %.3f s", job.id, status.value, seconds)
        job.finish(status, output=output, error=error)


class Engine:
    """All worker pools, keyed by job kind name, and the jobs that have not finished yet."""

    def __init__(self, settings: Settings, kinds: dict[str, JobKind], store: JobStore):
        self.settings = settings
        self.out_dir = settings.out_dir
        self.kinds = kinds
        self.store = store
        self.pools = {
            name: WorkerPool(kind, settings.limits(name), store, settings.job_max_seconds)
            for name, kind in kinds.items()
        }
        self.active: dict[str, Job] = {}
        self.feed = Feed()
        for pool in self.pools.values():
            pool.on_queue_moved = self._queue_moved
        self._stopping = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    def start(self) -> None:
        """Queue again what a previous run accepted but did not finish, then start the threads."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for record in self.store.unfinished():
            self._recover(record)
        for pool in self.pools.values():
            pool.start()
        self._watchdog.start()

    def stop(self) -> None:
        """Stop every pool (once; later calls do nothing)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for pool in self.pools.values():
            pool.stop()

    def close_intake(self) -> None:
        """Shutdown begins: start no more queued jobs (they stay queued in the store for the
        next start) and end the queued /put jobs, whose clients would wait in vain."""
        for pool in self.pools.values():
            pool.closed = True
        self.cancel_put_jobs(JobStatus.QUEUED)

    def cancel_put_jobs(self, *statuses: JobStatus) -> None:
        """End /put jobs in these statuses: their clients then get 503 instead of waiting."""
        for job in list(self.active.values()):
            if job.origin == "put" and job.status in statuses:
                self.cancel(job, "the server is shutting down")

    def busy(self) -> bool:
        return any(pool.stats()["busy"] for pool in self.pools.values())

    def _watch(self) -> None:
        """Cut jobs that run past their kind's timeout, on /put and /jobs alike."""
        while not self._stopping.wait(WATCHDOG_SECONDS):
            for pool in self.pools.values():
                try:
                    pool.enforce_timeout()
                except Exception:  # the watchdog must outlive any one bad check
                    log.exception("watchdog: checking %s jobs failed", pool.kind.name)

    def new_job(self, kind: JobKind, options: BaseModel, job_id: str | None = None,
                input_path: Path | None = None, origin: str = "jobs", owner: str = "") -> Job:
        """A job not yet queued; call from the event loop."""
        loop = asyncio.get_running_loop()
        job_id = job_id or storage.new_job_id()
        out_dir = storage.job_dir(self.out_dir, job_id)  # made when the job starts, if needed
        job = Job(id=job_id, kind=kind, options=options, out_dir=out_dir,
                  input_path=input_path or kind.sample, loop=loop, done=loop.create_future(),
                  origin=origin, owner=owner, settings=self.settings,
                  on_finish=self._record_end,
                  on_change=self.feed.job_changed, watched=lambda: self.feed.listening)
        if origin == "put":  # its client stops waiting then: the watchdog makes sure it stops
            job.deadline = job.created_at + self.pools[kind.name].limits.timeout
        return job

    def _queue_moved(self, waiting: list[Job]) -> None:
        """On the loop: show waiting jobs' new positions to whoever streams them."""
        feed_listens = self.feed.listening
        for job in waiting:
            if feed_listens or job.streamed:
                job.notify_loop()

    def _record_end(self, job: Job) -> None:
        """Store how a job ended (on whichever thread ended it) before waiters hear of it."""
        if job.rerun_after_restart:
            log.info("job %s: stopped by shutdown; it runs again after a restart", job.id)
            return
        # Partial output is no use to anyone, nor is a failed /put job's: its answer carries
        # the error.
        if job.status is JobStatus.CANCELLED or (job.origin == "put"
                                                 and job.status is JobStatus.FAILED):
            storage.remove_job_dir(self.out_dir, job.id)
        self.store.save(job.record())

    def submit(self, job: Job) -> None:
        """Record and queue the job; QueueFull (and its folder removed) when there is no room."""
        self.store.save(job.record())  # before the queue, so a worker's update comes after it
        try:
            self.pools[job.kind.name].submit(job)
        except (QueueFull, ShuttingDown):
            self.store.delete(job.id)
            storage.remove_job_dir(self.out_dir, job.id)
            raise
        self._track(job)
        self.feed.job_changed(job)
        log.debug("job %s: %s queued", job.id, job.kind.name)

    def cancel(self, job: Job, reason: str) -> None:
        """Stop a job wherever it is; a queued one gives its queue slot back at once."""
        found = job.cancel()
        if found.finished:
            return
        log.info("job %s: cancelling %s job (%s)", job.id, found.value, reason)
        if found is JobStatus.QUEUED:
            self.pools[job.kind.name].discard(job)

    def queue_position(self, job: Job) -> int | None:
        return self.pools[job.kind.name].position(job)

    def stats(self) -> dict[str, dict[str, int]]:
        return {name: pool.stats() for name, pool in self.pools.items()}

    def _track(self, job: Job) -> None:
        self.active[job.id] = job
        job.done.add_done_callback(lambda _: self.active.pop(job.id, None))

    def _recover(self, record: JobRecord) -> None:
        """Queue a job again from its start, its partial output discarded."""
        if record.origin == "put":  # its client was answered or dropped when the server went
            record.status, record.finished_at = JobStatus.CANCELLED.value, time.time()
            storage.remove_job_dir(self.out_dir, record.id)
            self.store.save(record)
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
            return
        job = self.new_job(kind, options, record.id,
                           Path(record.input_path) if record.input_path else None,
                           owner=record.owner)
        job.created_at = record.created_at
        for path in job.out_dir.iterdir() if job.out_dir.is_dir() else ():
            if path.name not in (storage.INPUT_DIR, storage.JOB_MARK):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.store.save(job.record())
        self.pools[kind.name].requeue(job)
        self._track(job)
        log.info("job %s: %s queued again after a restart", job.id, kind.name)
