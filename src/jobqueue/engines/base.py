"""The engine facade: everything routes do with jobs, by job id, in either engine.

In the spirit of arq's `Job` handle and procrastinate's `JobManager`: a route never holds a live
job object, only an id and the `JobRecord`s the engine gives back, so the engine behind it can
run jobs in this process or on other machines.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable, Set
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel

from jobqueue.files.store import FileStore
from jobqueue.jobs import JobKind
from jobqueue.metrics import Outcome
from jobqueue.records import JobRecord, Origin
from jobqueue.rollup import MinuteFigures
from jobqueue.settings import Settings
from jobqueue.webhooks import Attempted, Delivery

# Retry-After of a full queue stays within this: a client is told to come back within
# minutes, and may then be told again.
RETRY_AFTER_MAX_SECONDS = 300


def retry_after(average: float, elapsed: Iterable[float], workers: int) -> int:
    """Seconds until a slot of a full queue likely frees: when the first running job is
    expected to end (the next queued one then starts). A job that has run `e` seconds has
    `average - e` left while it is within the recent average run time `average`; one running
    past it is a long one, taken to run about as long again as it has so far. A slot not
    taken (fewer running jobs than `workers`) frees at once. Within 1 s and
    RETRY_AFTER_MAX_SECONDS."""
    elapsed = list(elapsed)
    if len(elapsed) < workers or not elapsed:
        return 1
    soonest = min(average - e if e < average else e for e in elapsed)
    return max(1, min(RETRY_AFTER_MAX_SECONDS, math.ceil(soonest)))


@dataclass(frozen=True)
class NewJob:
    """A job to submit."""

    id: str
    kind: JobKind
    options: BaseModel
    input_path: Path | None  # the upload, in the job's folder; None: the kind's sample
    origin: Origin
    owner: str = ""
    idempotency_key: str | None = None
    priority: int = 0  # -10…10, higher first (settings.MIN_PRIORITY, MAX_PRIORITY)
    fair_key: str = ""  # whose turn it takes in fair share (records.JobRecord.fair_key)
    # A /put with `Prefer: respond-async`: its client takes a hand-over (202) rather than a
    # 504, so it is not refused for an estimated start past its kind's timeout.
    respond_async: bool = False
    # The submitting request's W3C traceparent while tracing is on (tracing.py), kept with the
    # job so that its spans continue the request's trace.
    traceparent: str | None = None
    # Where its status document is POSTed when it ends (webhooks.py); None: nowhere.
    callback_url: str | None = None


class RecordChanges(Protocol):
    """One `/events` stream's share of the feed: every change of its owner's jobs."""

    async def next_batch(self) -> tuple[list[JobRecord], list[str]]:
        """Wait for a change, then the jobs changed since the last batch (their records now)
        and the ids of those deleted."""


class JobEngine(Protocol):
    settings: Settings
    kinds: dict[str, JobKind]
    files: FileStore  # where the jobs' files are: routes read them through it
    # Jobs whose upload is still in this process's out/ folder on its way to `submit`'s end
    # (object storage, a slow link): the sweep of leftover folders must leave them be.
    storing: Set[str]
    records_location: str  # where the job records are, for messages: a path, or a database

    async def start(self) -> None:
        """Recover what a previous run left, then start working."""

    async def stop(self) -> None:
        """Stop running jobs (to run again after a restart) and release everything."""

    def stop_now(self) -> None:
        """The same, from any thread, after the event loop is gone (a forced exit): at least
        no child process outlives the server."""

    async def close_intake(self) -> None:
        """Shutdown begins: start no more queued jobs; end queued /put jobs."""

    async def busy(self) -> bool:
        """Whether any job of this process is running."""

    async def end_put_jobs(self) -> None:
        """Cancel this process's running /put jobs: their clients get 503 now."""

    async def submit(self, job: NewJob, durable: bool) -> JobRecord:
        """Queue the job: its record, as accepted. With `durable`, the record is on disk
        before this returns. QueueFull at capacity, TooManyQueued past
        JOBQUEUE_MAX_QUEUED_PER_KEY for its owner, WouldTimeOut for a /put job (not
        respond_async) whose estimated start is past its kind's timeout, ShuttingDown,
        Unavailable. With an idempotency key the owner used before, the job submitted then,
        not a new one. Queued jobs start by lifecycle.dispatch_order."""

    async def check_room(self, kind: str, owner: str = "",
                         idempotency_key: str | None = None) -> None:
        """QueueFull when the kind's queue is full now: a look before an upload is read on or
        stored, so that a full queue refuses it early. `submit` still decides. Never for a
        retry: a key `owner` used before gets its job back from `submit`."""

    async def get(self, job_id: str) -> JobRecord | None:
        """The job as it is now (live progress), or None."""

    async def position(self, job_id: str) -> int | None:
        """1 for the next job of its kind to start; None when it is not waiting."""

    async def estimated_start(self, job_id: str) -> float | None:
        """Seconds until a queued job likely starts (lifecycle.estimated_start); None when it
        is not queued or there is no estimate yet."""

    async def hand_over(self, job_id: str) -> JobRecord | None:
        """A /put job whose client stops waiting (Prefer: respond-async) becomes a kept job,
        as if from POST /jobs: its files stay, its deadline is JOBQUEUE_JOB_MAX_SECONDS
        from its start, a restart queues it again. Its record then, or None when it has ended
        meanwhile (its client gets the end)."""

    async def retry(self, job_id: str) -> JobRecord:
        """Queue a failed job again as a new attempt, with its upload (POST /jobs/{id}/retry):
        its record, queued, with the failed attempt in `earlier_errors`. Conflict (409) when
        it has not failed, Gone (410) once its upload is gone, QueueFull."""

    async def wait(self, job_id: str, timeout: float) -> JobRecord:
        """The job's record once it has finished; TimeoutError after `timeout` seconds."""

    async def cancel(self, job_id: str, reason: str,
                     ending: Outcome = Outcome.CANCELLED) -> None:
        """Stop the job wherever it is: a queued one never starts, a running one has its
        child processes killed. Nothing for a finished job. `reason` goes to the log,
        `ending` to the metrics (a client's cancel, a deadline, a shutdown)."""

    async def delete(self, job_id: str) -> None:
        """Forget a finished job and remove its files."""

    def watch(self, job_id: str) -> AsyncIterator[JobRecord]:
        """The job's record now, then on every change, ending after its final state."""

    def feed(self, owner: str) -> AbstractAsyncContextManager[RecordChanges]:
        """Every change of `owner`'s jobs, for as long as the context lasts."""

    async def stats(self) -> dict[str, dict[str, int]]:
        """Per kind: workers, busy, queued, capacity."""

    async def list(self, status: str | None, job_type: str | None, limit: int, offset: int,
                   owner: str) -> list[JobRecord]:
        """Summaries (records without options or result data), newest first."""

    async def throughput(self, owner: str, since: float) -> list[MinuteFigures]:
        """`owner`'s jobs that ran to an end since `since`, per kind and minute, with their
        run times: from the rollup kept with the records (rollup.py), so the figures outlive a
        restart."""

    async def worker_processes(self) -> list[dict] | None:
        """The live worker processes, from their heartbeats: name, slots per kind, seconds since
        the last beat, its metrics URL (left out when it has none), its states. As /health
        answers them: no None values. None when the workers are threads of this process
        (embedded)."""

    async def health(self) -> dict[str, str]:
        """Each dependency the engine needs: "ok", or what is wrong with it."""

    # ---- completion webhooks (webhooks.py: the rules; the engine stores and claims) ----

    async def claim_deliveries(self, limit: int, lease: float) -> list[Delivery]:
        """Up to `limit` webhook deliveries due now, each claimed for `lease` seconds so that
        no other process makes the same attempt."""

    async def delivery_done(self, delivery: Delivery, attempted: Attempted) -> None:
        """An attempt's outcome; the claim let go."""

    async def release_delivery(self, delivery: Delivery) -> None:
        """Let go of the claim of an attempt cut short (a shutdown)."""

    async def callback(self, job_id: str) -> dict | None:
        """The job's delivery (url, status, attempts, last_error, ended_at), or None."""

    # ---- for the retention sweeps (files/retention.py) ----

    async def store_id(self) -> str:
        """The job store's own id, made once with it: each job folder is marked with it, so
        that a new or emptied store, which knows none of them, never takes them for
        leftovers. Unavailable while it cannot be read."""

    async def store_created_at(self) -> float:
        """When the job store was made (epoch seconds): nothing older is its own."""

    async def known(self, job_ids: list[str]) -> set[str]:
        """Which of these jobs have a record."""

    async def expired(self, before: float) -> list[str]:
        """The jobs that finished before `before` (epoch seconds)."""

    async def forget_minutes_before(self, timestamp: float) -> None:
        """Drop the jobs-per-minute rollup (rollup.py) older than `timestamp`."""
