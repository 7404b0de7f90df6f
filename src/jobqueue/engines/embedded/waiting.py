"""The jobs of one kind waiting for a worker thread, in the order they are to start.

A bounded queue like `queue.Queue`, but a worker takes the job that comes first by
`lifecycle.dispatch_order` (priority, then fair-share round, then arrival), among those ready:
a job waiting for its next attempt after a failure (`next_attempt_at`) is skipped until then,
while it keeps its place in the count. Everything happens under one condition variable; the
queue holds at most a kind's JOBQUEUE_<NAME>_QUEUE_SIZE jobs (and those queued again past it),
so a scan of it per take costs less than keeping an index.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

from jobqueue import lifecycle


class Waiting(Protocol):
    """What the queue reads of a job (the engine's Job)."""

    fair_key: str
    priority: int
    fair_round: int
    seq: int
    next_attempt_at: float | None


class JobQueue:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._jobs: list[Waiting] = []
        self._changed = threading.Condition()
        self._closed = False
        self._arrivals = itertools.count(1)

    def next_seq(self) -> int:
        """A new job's place in the order of arrival."""
        return next(self._arrivals)

    def put(self, job: Waiting, make_room: Callable[[list[Waiting]], None] | None = None,
            force: bool = False) -> bool:
        """Queue a job; False when the queue is full (unless `force`: a job accepted before,
        queued again). `make_room(jobs)` runs first under the lock with the jobs queued now,
        and may raise to refuse the job (its round is set there)."""
        with self._changed:
            if make_room is not None:
                make_room(self._jobs)
            if not force and len(self._jobs) >= self.capacity:
                return False
            self._jobs.append(job)
            self._changed.notify()  # the taker waiting longest (it passes the word on)
            return True

    def get(self, timeout: float | None = None) -> Waiting | None:
        """The next ready job by dispatch order, waiting for one (queue.Empty after
        `timeout` s, 0: no wait); None once the queue is closed."""
        until = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while True:
                if self._closed:
                    return None
                now = time.time()
                job = _first(self._jobs, now)
                if job is not None:
                    self._jobs.remove(job)
                    self._pass_on()
                    return job
                # Until the first retry is due, a new job, or the timeout.
                due = min((job.next_attempt_at for job in self._jobs), default=None)
                wait = None if due is None else max(0.0, due - now) + 0.001
                if until is not None:
                    left = until - time.monotonic()
                    if left <= 0:
                        self._pass_on()
                        raise queue.Empty
                    wait = left if wait is None else min(wait, left)
                self._changed.wait(wait)

    def _pass_on(self) -> None:
        """A taker leaves (with a job, or at its timeout, as one gathering a batch does) while
        jobs remain: the next waiting taker looks at them (one due later, a retry's, included),
        so no job waits for a put that may never come."""
        if self._jobs:
            self._changed.notify()

    def remove(self, job: Waiting) -> bool:
        with self._changed:
            try:
                self._jobs.remove(job)
            except ValueError:
                return False
            return True

    def position(self, job: Waiting) -> int | None:
        """1 for the next job to start: the ready jobs that come before it, plus one."""
        with self._changed:
            if job not in self._jobs:
                return None
            return 1 + self._ahead(_order(job), exclude=job)

    def ahead(self, priority: int, round_: int) -> int:
        """How many queued jobs would start before a new one of this priority and round."""
        with self._changed:
            return self._ahead(lifecycle.dispatch_order(priority, round_, 2**62))

    def _ahead(self, key: tuple[int, int, int], exclude: Waiting | None = None) -> int:
        now = time.time()
        return sum(1 for other in self._jobs if other is not exclude and _order(other) < key
                   and (other.next_attempt_at is None or other.next_attempt_at <= now))

    def jobs(self) -> list[Waiting]:
        with self._changed:
            return list(self._jobs)

    def qsize(self) -> int:
        with self._changed:
            return len(self._jobs)

    def clear(self) -> None:
        with self._changed:
            self._jobs.clear()

    def close(self) -> None:
        """Every get() returns None from now on, at once."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()


def _first(jobs: list[Waiting], now: float) -> Waiting | None:
    """The ready job that comes first by dispatch order (one pass: every take looks)."""
    first = first_key = None
    for job in jobs:
        if job.next_attempt_at is not None and job.next_attempt_at > now:
            continue
        key = _order(job)
        if first is None or key < first_key:
            first, first_key = job, key
    return first


def _order(job: Waiting) -> tuple[int, int, int]:
    return lifecycle.dispatch_order(job.priority, job.fair_round, job.seq)


def round_for(queued: list[Waiting], running: list[Waiting], owner: str, priority: int) -> int:
    """A new queued job's fair-share round (lifecycle.fair_round) among these jobs."""
    same = [job for job in queued if job.priority == priority]
    lowest = min((job.fair_round for job in same), default=None)
    owners = [job.fair_round for job in [*same, *running]
              if job.fair_key == owner and job.priority == priority]
    return lifecycle.fair_round(lowest, max(owners, default=None))
