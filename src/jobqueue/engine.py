"""The queue engine: one bounded queue per job kind, served by that kind's worker threads."""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from pathlib import Path

from pydantic import BaseModel

from . import storage
from .jobs import BadInput, Job, JobCancelled, JobKind, JobStatus
from .settings import KindLimits, Settings

log = logging.getLogger("jobqueue.engine")

# How long stop() waits for a worker thread to finish its job after the job was told to cancel.
JOIN_SECONDS = 5.0


class QueueFull(Exception):
    """The kind's queue is at capacity; the client should retry after `retry_after` seconds."""

    def __init__(self, kind: str, capacity: int, retry_after: int):
        super().__init__(
            f"The {kind} queue is full ({capacity} jobs waiting); retry in {retry_after} s."
        )
        self.retry_after = retry_after


class WorkerPool:
    """One job kind's bounded queue and the threads that take jobs from it."""

    def __init__(self, kind: JobKind, limits: KindLimits, out_dir: Path):
        self.kind = kind
        self.limits = limits
        self.out_dir = out_dir
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=limits.queue_size)
        self.threads: list[threading.Thread] = []
        self.running: set[Job] = set()
        self.closed = False
        self._lock = threading.Lock()
        # Moving average of how long a job takes, for the Retry-After of a full queue.
        self._average_seconds = 1.0

    def start(self) -> None:
        for number in range(1, self.limits.workers + 1):
            thread = threading.Thread(
                target=self._serve, name=f"{self.kind.name}-worker-{number}", daemon=True
            )
            thread.start()
            self.threads.append(thread)

    def stats(self) -> dict[str, int]:
        with self._lock:
            busy = len(self.running)
        return {
            "workers": len(self.threads),
            "busy": busy,
            "queued": self.queue.qsize(),
            "capacity": self.limits.queue_size,
        }

    def submit(self, job: Job) -> None:
        """Queue a job without ever blocking; QueueFull when there is no room."""
        try:
            if self.closed:
                raise queue.Full
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(self.kind.name, self.limits.queue_size, self.retry_after()) from None

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely to free up: one average job per worker."""
        return max(1, math.ceil(self._average_seconds / self.limits.workers))

    def discard(self, job: Job) -> None:
        """Take a cancelled job out of the queue so its slot is free at once."""
        # queue.Queue has no remove(); its mutex and deque are the documented way in.
        with self.queue.mutex:
            try:
                self.queue.queue.remove(job)
            except ValueError:
                return
            self.queue.not_full.notify()

    def stop(self) -> None:
        """Cancel queued jobs, tell running ones to stop, and join the threads."""
        self.closed = True
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                storage.remove_job_dir(self.out_dir, job.id)
        with self._lock:
            running = list(self.running)
        for job in running:
            job.cancel()
        for _ in self.threads:
            self.queue.put(None)
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
                if not job.start(worker_name):
                    continue  # cancelled while it waited
                self.running.add(job)
            try:
                self._run(job)
            except BaseException as error:  # only a bug gets here; the thread keeps serving
                log.exception("job %s: engine error", job.id)
                job.finish(JobStatus.FAILED, error=error)
            finally:
                with self._lock:
                    self.running.discard(job)

    def _run(self, job: Job) -> None:
        log.info("job %s: %s started on %s", job.id, self.kind.name, job.worker_name)
        try:
            output = self.kind.handler(job)
        except JobCancelled:
            job.finish(JobStatus.CANCELLED)
        except BadInput as error:
            log.info("job %s: bad input: %s", job.id, error)
            job.finish(JobStatus.FAILED, error=error)
        except BaseException as error:  # a job's failure must never end its worker thread
            log.exception("job %s: failed", job.id)
            job.finish(JobStatus.FAILED, error=error)
        else:
            if job.cancel_requested.is_set():
                job.finish(JobStatus.CANCELLED)
            else:
                job.finish(JobStatus.SUCCEEDED, output=output)
        if job.status is JobStatus.CANCELLED:
            storage.remove_job_dir(self.out_dir, job.id)
        seconds = job.finished_at - job.started_at
        self._average_seconds = 0.8 * self._average_seconds + 0.2 * seconds
        log.info("job %s: %s after %.3f s", job.id, job.status.value, seconds)


class Engine:
    """All worker pools, keyed by job kind name."""

    def __init__(self, settings: Settings, kinds: dict[str, JobKind]):
        self.out_dir = settings.out_dir
        self.pools = {
            name: WorkerPool(kind, settings.limits(name), settings.out_dir)
            for name, kind in kinds.items()
        }

    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for pool in self.pools.values():
            pool.start()

    def stop(self) -> None:
        for pool in self.pools.values():
            pool.stop()

    def new_job(self, kind: JobKind, options: BaseModel) -> Job:
        """A queued job with its own empty folder; call from the event loop."""
        loop = asyncio.get_running_loop()
        job_id = storage.new_job_id()
        out_dir = storage.job_dir(self.out_dir, job_id)
        out_dir.mkdir(parents=True)
        return Job(id=job_id, kind=kind, options=options, out_dir=out_dir,
                   input_path=kind.sample, loop=loop, done=loop.create_future())

    def submit(self, job: Job) -> None:
        try:
            self.pools[job.kind.name].submit(job)
        except QueueFull:
            storage.remove_job_dir(self.out_dir, job.id)
            raise
        log.info("job %s: %s queued", job.id, job.kind.name)

    def cancel(self, job: Job, reason: str) -> None:
        """Stop a job wherever it is; a queued one gives its queue slot back at once."""
        found = job.cancel()
        if found.finished:
            return
        log.info("job %s: cancelling %s job (%s)", job.id, found.value, reason)
        if found is JobStatus.QUEUED:
            self.pools[job.kind.name].discard(job)
            storage.remove_job_dir(self.out_dir, job.id)
        # A running job's worker removes its folder once the handler has stopped.

    def stats(self) -> dict[str, dict[str, int]]:
        return {name: pool.stats() for name, pool in self.pools.items()}
