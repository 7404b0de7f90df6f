"""The distributed engine: stateless API replicas and worker processes sharing PostgreSQL,
with procrastinate as the queue (one procrastinate queue per job kind).

Here is the replica's side of the `JobEngine` facade. A submit takes a per-kind advisory lock,
counts the kind's waiting jobs against its capacity (503 at capacity, across every replica),
then writes the record and defers its procrastinate job in that one transaction. Replicas
LISTEN for the NOTIFY each change of a record sends and wake `/put` waiters, event streams and
the dashboard's feed; NOTIFY is not replayed, so every stream (re)starts from the table, and
waiters read it again every few seconds in case a notification fell into a reconnection.

While PostgreSQL cannot be reached, or is reached but answers nothing (frozen), every call
fails within ANSWER_SECONDS with `Unavailable` (503), and /health names it (timeouts.py: a
deadline of the replica's own on each use of a connection); the pool and the listener reconnect
by themselves, at most a second apart.
Job files live in JOBQUEUE_OUT_DIR, a folder every node mounts, or with JOBQUEUE_STORAGE_URL
in object storage (files/objects.py): then a replica stores a checked upload there before the
job's record is written, and no node needs a shared disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
from procrastinate.exceptions import ConnectorException
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import PoolTimeout

from jobqueue import lifecycle, rollup
from jobqueue.engines.base import RETRY_AFTER_MAX_SECONDS, NewJob, retry_after
from jobqueue.engines.postgres import schema, timeouts
from jobqueue.engines.postgres.runner import (
    STALLED_SECONDS,
    Runner,
    admission,
    defer,
    fair_round,
    insert_queued,
    make_app,
)
from jobqueue.engines.postgres.schema import QUERIES
from jobqueue.errors import (
    Conflict,
    Gone,
    NotFound,
    QueueFull,
    SetupFailed,
    ShuttingDown,
    TooManyQueued,
    Unavailable,
    WouldTimeOut,
)
from jobqueue.files import jobfiles, make_file_store
from jobqueue.files.store import STORE_UPLOADS_AT_ONCE, FileStore
from jobqueue.jobs import FINISHED, JobKind, JobStatus
from jobqueue.metrics import Metrics, Outcome
from jobqueue.records import JobRecord, Origin, list_query
from jobqueue.resources import State, Status
from jobqueue.settings import Settings
from jobqueue.webhooks import Attempted, Delivery

log = logging.getLogger(__name__)

# What a notification's status says is no end yet (schema.notify).
UNFINISHED = {JobStatus.QUEUED.value, JobStatus.RUNNING.value}

# Waiting for a free connection (or a new one); then the pool's check of it (CHECK_SECONDS).
# Once a call found the database away, the next ones wait only DOWN_POOL_TIMEOUT_SECONDS until
# one gets through (the pool keeps reconnecting meanwhile): a request that needs the database
# twice, such as a /put that cancels its job after the wait failed, still answers within 5 s.
POOL_TIMEOUT_SECONDS = 3.0
DOWN_POOL_TIMEOUT_SECONDS = 1.0
# The bound on one use of a connection, counted from the wait for it: a request answers 503
# within the README's 5 s however the database fails. PostgreSQL itself ends a statement
# after STATEMENT_SECONDS (a lock held elsewhere), keeping the connection usable.
ANSWER_SECONDS = 4.0
STATEMENT_SECONDS = 3.0
SCHEMA_SECONDS = 60.0
POOL_SIZE = 20
# A waiter or a stream reads the record again at least this often, notified or not.
REFRESH_SECONDS = 3.0
# A retention sweep's statement may read a large table: PostgreSQL ends it after
# SWEEP_STATEMENT_SECONDS, and its use of a connection is bounded to SWEEP_SECONDS.
SWEEP_STATEMENT_SECONDS = 20.0
SWEEP_SECONDS = 30.0


# At most this many /put jobs submitted here are remembered until their wait begins.
MAX_FRESH = 10_000


class PostgresEngine:
    """An API replica's `JobEngine`; with `with_workers`, it runs workers of every kind too."""

    def __init__(self, settings: Settings, kinds: dict[str, JobKind], metrics: Metrics,
                 with_workers: bool = False):
        self.settings = settings
        self.kinds = kinds
        self.metrics = metrics
        self.url = settings.database_url.get_secret_value()
        self.pool = timeouts.Pool(self.url, STATEMENT_SECONDS, min_size=1,
                                  max_size=POOL_SIZE, open=False,
                                  timeout=POOL_TIMEOUT_SECONDS)
        self.app = make_app(kinds)
        database = conninfo_to_dict(self.url).get("dbname", "")
        self.records_location = f"the PostgreSQL database {database}"
        self._made: dict[str, str] | None = None  # the store's id and birth, once read
        self.files: FileStore = make_file_store(settings)
        # Uploads on their way to object storage (minutes each over a slow link) wait here for
        # a thread, not in the loop's default threads, which /health and the sweeps need.
        self._store_uploads = ThreadPoolExecutor(STORE_UPLOADS_AT_ONCE,
                                                 thread_name_prefix="store-upload")
        self.runner = (Runner(settings, kinds, self.pool, metrics, self.app, self.files)
                       if with_workers else None)
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._feeds: set[_PostgresListener] = set()
        self._listening = False
        self._listener: asyncio.Task | None = None
        self._closed = False
        self._reached = True  # the last call's connection worked
        self._putting: set[str] = set()  # /put jobs this replica's clients wait for
        # /put jobs submitted here whose wait has not begun: the listener's connection
        # (`_generation`) when each was inserted, and the end a notification told before
        # its wait began (None: read the record), so the wait need not read it first.
        self._fresh: dict[str, int] = {}
        self._early_ends: dict[str, dict[str, Any] | None] = {}
        self._generation = 0
        self.storing: set[str] = set()

    # ---- life ----

    async def start(self) -> None:
        await self.pool.open(wait=False)
        await self.app.open_async(pool=self.pool)
        try:
            # The schema's first making may take a while, or wait for another replica's.
            async with self._db(SCHEMA_SECONDS) as conn:
                await conn.execute(QUERIES["no_statement_timeout"])
                try:
                    await schema.ensure(conn, _procrastinate_schema())
                finally:
                    await conn.execute(QUERIES["reset_statement_timeout"])
            # The folders made from now on are this store's (the orphan sweep claims it too).
            await asyncio.to_thread(jobfiles.claim_out_dir, self.settings.out_dir,
                                    await self.store_id())
        except Unavailable as error:  # it may come later: /health says so meanwhile
            log.error("%s; the server starts anyway and answers 503 until it is back", error)
            jobfiles.check_writable(self.settings.out_dir)
        self._listener = asyncio.create_task(self._listen(), name="LISTEN jobqueue_jobs")
        if self.runner is not None:
            await self.runner.start()

    async def stop(self) -> None:
        self._closed = True
        if self.runner is not None:
            await self.runner.stop()
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        await self.app.close_async()
        await self.pool.close()
        self._store_uploads.shutdown(wait=False, cancel_futures=True)

    def stop_now(self) -> None:
        if self.runner is not None:
            self.runner.kill_children()

    async def close_intake(self) -> None:
        if self.runner is not None:
            self.runner.close_intake()

    async def busy(self) -> bool:
        return self.runner is not None and self.runner.busy()

    async def end_put_jobs(self) -> None:
        for job_id in list(self._putting):
            await self.cancel(job_id, "the server is shutting down", Outcome.SHUTDOWN)

    async def health(self) -> dict[str, str]:
        states = {"postgresql": "ok"}
        store = (asyncio.create_task(self._store_health()) if self.files.remote else None)
        try:
            async with self._db() as conn:
                await conn.execute(QUERIES["ping"])
        except Unavailable as error:
            states["postgresql"] = str(error)
        else:
            if not self._listening:
                states["postgresql"] = "connected, but not listening for job changes yet"
        if store is not None:
            states["objectStorage"] = await store
        return states

    async def _store_health(self) -> str:
        try:  # as quick as the database's check: a load balancer is waiting
            return await asyncio.wait_for(asyncio.to_thread(self.files.health),
                                          ANSWER_SECONDS)
        except TimeoutError:
            return (f"the object store (JOBQUEUE_STORAGE_URL) did not answer within "
                    f"{ANSWER_SECONDS:g} s")

    @contextlib.asynccontextmanager
    async def _db(self, seconds: float = ANSWER_SECONDS
                  ) -> AsyncIterator[psycopg.AsyncConnection]:
        """A connection from the pool, for at most `seconds` from now (then its socket is shut
        and the pool drops it); Unavailable (503) when PostgreSQL cannot be reached or does not
        answer in time."""
        start = time.monotonic()
        wait = POOL_TIMEOUT_SECONDS if self._reached else DOWN_POOL_TIMEOUT_SECONDS
        try:
            async with self.pool.connection(timeout=wait) as conn:
                left = max(seconds - (time.monotonic() - start), 0.5)
                with timeouts.deadline(conn, left):
                    yield conn
        except (PoolTimeout, psycopg.OperationalError) as error:
            self._reached = False
            raise schema.unavailable(error) from None
        except ConnectorException as error:  # procrastinate's wrapper of the same errors
            if not isinstance(error.__cause__, psycopg.OperationalError):
                raise
            self._reached = False
            raise schema.unavailable(error.__cause__) from None
        self._reached = True

    # ---- the facade: by job id ----

    async def submit(self, new: NewJob, durable: bool) -> JobRecord:
        if self._closed:
            raise ShuttingDown
        input_path = None
        self.storing.add(new.id)
        try:
            if new.input_path:  # in object storage, before the record that points to it
                # A retry of an accepted job gets it back, and a full queue refuses, before
                # the upload goes to the store.
                wanted = False
                try:
                    if earlier := await self._earlier(new.owner, new.idempotency_key):
                        return earlier
                    await self.check_room(new.kind.name)
                    wanted = True
                finally:
                    if not wanted:
                        await asyncio.to_thread(jobfiles.remove_job_dir, self.files.out_dir,
                                                new.id)
                # It removes the local copy, stored or not.
                input_path = await asyncio.get_running_loop().run_in_executor(
                    self._store_uploads, self.files.keep_input, new.id, new.input_path)
            try:
                return await self._submit(new, input_path)
            except BaseException:
                await asyncio.to_thread(self._remove_files, new.id)
                raise
        finally:
            self.storing.discard(new.id)

    async def _submit(self, new: NewJob, input_path: str | None) -> JobRecord:
        record = JobRecord(id=new.id, job_type=new.kind.name, status=JobStatus.QUEUED.value,
                           options=new.options.model_dump(mode="json"), input_path=input_path,
                           created_at=time.time(), origin=new.origin, owner=new.owner,
                           idempotency_key=new.idempotency_key, priority=new.priority,
                           fair_key=new.fair_key, traceparent=new.traceparent)
        # A /put whose client waits (not respond-async) is refused if it would start only
        # after its kind's timeout.
        by_estimate = new.origin is Origin.PUT and not new.respond_async
        if new.origin is Origin.PUT and self._listening:  # its end may come before its wait
            self._fresh[record.id] = self._generation
            if len(self._fresh) > MAX_FRESH:  # waits that never came (a cancel in between):
                # the oldest go; a wait that does come for one then reads the record
                self._forget_fresh(next(iter(self._fresh)))
        try:
            while True:
                try:
                    earlier = await self._insert(record, by_estimate, new.callback_url)
                    break
                except psycopg.errors.UniqueViolation:  # the same idempotency key at once:
                    continue  # the other one is in now, and this finds it
        except BaseException:
            self._forget_fresh(record.id)
            raise
        if earlier is not None:
            self._forget_fresh(record.id)
        if earlier is not None:  # a retry of a job already accepted: that one
            await asyncio.to_thread(self._remove_files, new.id)
            return earlier
        if new.origin is Origin.PUT:
            self._putting.add(record.id)
        log.debug("job %s: %s queued", record.id, record.job_type)
        return record

    async def _insert(self, record: JobRecord, by_estimate: bool = False,
                      callback_url: str | None = None) -> JobRecord | None:
        """Write the record and its queue entry in one transaction; the earlier job instead
        when the idempotency key was used before. QueueFull at the kind's capacity,
        TooManyQueued past its owner's cap; with `by_estimate`, WouldTimeOut when it would
        start after its kind's timeout. Its fair round is set here (lifecycle.fair_round)."""
        # Pipelined: the kind's lock goes out with the admission look and the insert with
        # the commit, so the lock is held for two round trips (`_check_room`).
        async with self._db() as conn, conn.pipeline(), conn.transaction():
            if earlier := await self._earlier(record.owner, record.idempotency_key, conn):
                return earlier
            await self._check_room(conn, record.job_type, record, by_estimate)
            await insert_queued(self.app, conn, record)
            if callback_url:  # webhooks.py; deleted with the record (ON DELETE CASCADE)
                await conn.execute(QUERIES["insert_delivery"],
                                   (record.id, record.owner, callback_url))
        return None

    async def check_room(self, kind: str, owner: str = "",
                         idempotency_key: str | None = None) -> None:
        try:
            async with self._db() as conn:
                await self._check_room(conn, kind)
        except (QueueFull, SetupFailed):  # only then is the key worth a look in the database
            if await self._earlier(owner, idempotency_key) is None:
                raise

    async def _earlier(self, owner: str, idempotency_key: str | None,
                       conn: psycopg.AsyncConnection | None = None) -> JobRecord | None:
        """The job `owner` submitted with this key before, if any (within `conn`, if given)."""
        if not idempotency_key:
            return None
        if conn is None:
            async with self._db() as conn:
                return await self._earlier(owner, idempotency_key, conn)
        rows = await schema.fetch(conn, QUERIES["select_idempotent"], (owner, idempotency_key))
        return rows[0] if rows else None

    async def _check_room(self, conn: psycopg.AsyncConnection, kind: str,
                          new: JobRecord | None = None, by_estimate: bool = False) -> None:
        """SetupFailed when every live worker of the kind failed to set it up; QueueFull at
        its capacity. For a job about to be queued (`new`, under the kind's lock): its fair
        round (set on it), TooManyQueued at JOBQUEUE_MAX_QUEUED_PER_KEY of its owner's, and
        with `by_estimate` WouldTimeOut when its estimated start is past its kind's timeout."""
        now = time.time()
        async with conn.cursor() as looking:
            await looking.execute(QUERIES["live_worker_kinds"], (now - STALLED_SECONDS,))
            if new is not None:
                # One submit of a kind at a time, cluster-wide: the count is exact. In a
                # pipeline (a submit's) the workers' look, the lock and the admission look go
                # out together, one round trip; the server runs the admission look once it
                # holds the lock, so its snapshot has every submit before it (the workers'
                # states need no lock).
                await conn.execute(QUERIES["lock_kind"], (f"jobqueue:{kind}",))
            # (in a pipeline, fetching its answer syncs all three)
            figures = await admission(conn, kind, new.priority if new else 0,
                                      new.fair_key if new else "", new.id if new else "")
            slots, states = _worker_figures(await looking.fetchall(), now)
        status = cluster_status(states.get(kind, []))
        if status.state is State.FAILED:
            raise status.refusal(kind)
        limits = self.settings.limits(self.kinds[kind])
        workers = slots.get(kind, 0)
        if figures["queued"] >= limits.queue_size:
            raise QueueFull(kind, limits.queue_size,
                            await self._retry_after(conn, kind, workers, figures))
        if new is None:
            return
        cap = self.settings.max_queued_per_key
        if cap and figures["owners_queued"] >= cap:
            raise TooManyQueued(kind, cap, await self._retry_after(conn, kind, workers, figures))
        new.fair_round = fair_round(figures)
        # Only when there is an estimate and no worker is free does the count of the jobs
        # ahead matter (lifecycle.estimated_start): else no second look.
        if by_estimate and _estimate(figures, workers, 0) is not None and \
                figures["running"] >= workers:
            cursor = await conn.execute(QUERIES["count_ahead"], {
                "kind": kind, "priority": new.priority, "round": new.fair_round,
                "now": time.time()})
            estimate = _estimate(figures, workers, (await cursor.fetchone())[0])
            if estimate is not None and estimate > limits.timeout:
                raise WouldTimeOut(kind, estimate, limits.timeout)

    async def _retry_after(self, conn: psycopg.AsyncConnection, kind: str, workers: int,
                           figures: dict[str, Any]) -> int:
        """Seconds a refused client should wait: the estimated start of a job sent now (every
        queued job ahead of it), within 1 s and RETRY_AFTER_MAX_SECONDS; before there is an
        estimate, until a slot is likely to free: the first running job's expected end, from
        the last 20 jobs' mean run time (base.retry_after)."""
        estimate = _estimate(figures, workers, figures["queued"])
        if estimate is not None:
            return max(1, min(RETRY_AFTER_MAX_SECONDS, math.ceil(estimate)))
        cursor = await conn.execute(QUERIES["recent_run_seconds"], (kind,))
        average = (await cursor.fetchone())[0] or 1.0
        now = time.time()
        cursor = await conn.execute(QUERIES["running_started_at"], (kind,))
        elapsed = [now - started for (started,) in await cursor.fetchall()]
        return retry_after(average, elapsed, workers or 1)

    async def get(self, job_id: str) -> JobRecord | None:
        async with self._db() as conn:
            rows = await schema.fetch(conn, QUERIES["select_job"], (job_id,))
        return rows[0] if rows else None

    async def position(self, job_id: str) -> int | None:
        async with self._db() as conn:
            cursor = await conn.execute(QUERIES["queue_position"],
                                        {"id": job_id, "now": time.time()})
            count = (await cursor.fetchone())[0]
        return count or None

    async def estimated_start(self, job_id: str) -> float | None:
        now = time.time()
        async with self._db() as conn:
            rows = await schema.fetch(conn, QUERIES["select_job"], (job_id,))
            if not rows or rows[0].status != JobStatus.QUEUED.value:
                return None
            record = rows[0]
            cursor = await conn.execute(QUERIES["queue_position"], {"id": job_id, "now": now})
            position = (await cursor.fetchone())[0]
            if not position:
                return None
            figures = await admission(conn, record.job_type, record.priority, record.fair_key,
                                      record.id)
            slots, _ = await self._live_workers(conn)
        # Its own row is left out of `figures`; the running count and the runs are all there.
        estimate = _estimate(figures, slots.get(record.job_type, 0), position - 1)
        if estimate is not None and record.next_attempt_at is not None:  # not before its retry
            estimate = max(estimate, record.next_attempt_at - now)
        return estimate

    async def hand_over(self, job_id: str) -> JobRecord | None:
        async with self._db() as conn, conn.transaction():
            rows = await schema.fetch(conn, QUERIES["hand_over"], (job_id,))
            for record in rows:
                await schema.notify(conn, record.id, record.owner)
        self._putting.discard(job_id)  # a shutdown no longer ends it: its client keeps it
        if rows:
            log.info("job %s: handed over to its client (Prefer: respond-async); it runs on",
                     job_id)
            return rows[0]
        # Handed over already (a second request), or ended meanwhile (its client gets the end).
        record = await self.get(job_id)
        if record is not None and record.origin is Origin.JOBS and \
                JobStatus(record.status) in lifecycle.CAN_HAND_OVER:
            return record
        return None

    async def retry(self, job_id: str) -> JobRecord:
        found = await self.get(job_id)
        if found is None:
            raise NotFound(f"There is no job {job_id!r}; it may have been deleted.")
        kind = found.job_type
        if kind not in self.kinds:
            raise Conflict(f"Job {job_id} is of the kind {kind}, which this server does not "
                           "serve.")
        if JobStatus(found.status) not in lifecycle.CAN_RETRY:
            raise Conflict(f"Job {job_id} is {found.status}; only a failed job can be retried.")
        # A file store's look (object storage: a request) before any lock is taken; its
        # upload never comes back once gone. The kind's sample (no input_path) is always there.
        if lifecycle.upload_gone(found, self.kinds[kind]) or \
                not await asyncio.to_thread(self.files.has_input, found):
            raise Gone(f"The upload of job {job_id} has been removed (a failed /put job keeps "
                       "none), so it cannot run again; submit it anew.")
        async with self._db() as conn, conn.transaction():
            # As a submit: one of the kind at a time, cluster-wide, the counts exact.
            await conn.execute(QUERIES["lock_kind"], (f"jobqueue:{kind}",))
            rows = await schema.fetch(conn, QUERIES["select_job_for_update"], (job_id,))
            if not rows:
                raise NotFound(f"There is no job {job_id!r}; it may have been deleted.")
            record = rows[0]
            if JobStatus(record.status) not in lifecycle.CAN_RETRY:  # retried meanwhile
                raise Conflict(f"Job {job_id} is {record.status}; only a failed job can be "
                               "retried.")
            await self._check_room(conn, kind, record)  # sets its new fair round
            failure = lifecycle.earlier_error(record.attempt, record.error,
                                              record.finished_at or time.time())
            rows = await schema.fetch(conn, QUERIES["retry_failed"],
                                      (Jsonb([failure]), record.fair_round, job_id))
            queued = rows[0]
            await defer(self.app, conn, queued)
        log.info("job %s: retried by its client (attempt %d failed)", job_id, record.attempt)
        return queued

    async def wait(self, job_id: str, timeout: float) -> JobRecord:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._subscribed(job_id, ends_only=True) as changed:
            try:
                # A job this replica just queued needs no first read if the listener has
                # listened since: an end told before this wait was kept for it (`_dispatch`).
                # An end's notification carries the record when it fits: nothing to read.
                fresh = self._fresh.pop(job_id, None) == self._generation and self._listening
                early = self._early_ends.pop(job_id, _NOT_ENDED)
                told = early if fresh else None
                while True:
                    if told is _NOT_ENDED:
                        record = None  # queued, or running: no end yet
                    elif told is not None:
                        record = schema.from_row(told)
                    elif (record := await self.get(job_id)) is None:
                        raise LookupError(job_id)
                    if record is not None and record.status in FINISHED:
                        return record
                    left = deadline - loop.time()
                    if left <= 0:
                        raise TimeoutError
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), min(left, REFRESH_SECONDS))
                    told = changed.record if changed.is_set() else None
                    changed.clear()
                    changed.record = None
            finally:
                self._putting.discard(job_id)
                self._forget_fresh(job_id)

    def _forget_fresh(self, job_id: str) -> None:
        self._fresh.pop(job_id, None)
        self._early_ends.pop(job_id, None)

    async def cancel(self, job_id: str, reason: str,
                     ending: Outcome = Outcome.CANCELLED) -> None:
        removed = None
        async with self._db() as conn, conn.transaction():
            rows = await schema.fetch(conn, QUERIES["select_job_for_update"], (job_id,))
            found = lifecycle.at_cancel(JobStatus(rows[0].status)) if rows else None
            if found in (None, lifecycle.AtCancel.NOTHING):  # gone, or ended already
                return
            record = rows[0]
            log.info("job %s: cancelling %s job (%s)", job_id, record.status, reason)
            # The first cancel's outcome, for whoever ends the job (its worker, or this).
            cursor = await conn.execute(QUERIES["ask_cancel"], (ending.value, job_id))
            ending = Outcome((await cursor.fetchone())[0])
            procrastinate_id = await self._procrastinate_id(conn, job_id)
            manager = self.app.job_manager
            if found is lifecycle.AtCancel.ENDS_NOW and procrastinate_id is not None and \
                    await manager.cancel_job_by_id_async(procrastinate_id, delete_job=True,
                                                         connection=conn):
                ended_here = True  # it never started: it ends here
            elif procrastinate_id is not None and await manager.cancel_job_by_id_async(
                    procrastinate_id, abort=True, connection=conn):
                # It runs (or a worker takes it as we speak): its worker aborts it, kills its
                # children and records the end.
                ended_here = False
            else:
                # No procrastinate job is left to run or abort it (its run ended, or was cut
                # short, without writing an end): nothing else would ever end it. A run of it
                # still alive somewhere writes no end over this one (it must be 'running'),
                # and its worker's watch of cancels stops it.
                log.warning("job %s: %s with nothing left to run or abort it; it ends here",
                            job_id, record.status)
                ended_here = True
            if ended_here:
                await conn.execute(QUERIES["end_cancelled"], (time.time(), job_id))
                await schema.notify(conn, job_id, record.owner)
                removed = job_id
        if removed:
            self.metrics.job_ended(record.job_type, ending, None, None)
            await asyncio.to_thread(self._remove_files, removed)

    async def _procrastinate_id(self, conn: psycopg.AsyncConnection, job_id: str) -> int | None:
        cursor = await conn.execute(QUERIES["select_procrastinate_id"], (job_id,))
        row = await cursor.fetchone()
        return row[0] if row else None

    async def delete(self, job_id: str) -> None:
        async with self._db() as conn, conn.transaction():
            cursor = await conn.execute(QUERIES["delete_job"], (job_id,))
            row = await cursor.fetchone()
            if row:
                await schema.notify(conn, job_id, row[0], removed=True)
        await asyncio.to_thread(self._remove_files, job_id)

    # ---- completion webhooks (webhooks.py) ----

    async def claim_deliveries(self, limit: int, lease: float) -> list[Delivery]:
        now = time.time()
        async with self._db() as conn, conn.transaction():
            async with conn.cursor(row_factory=dict_row) as cursor:
                await cursor.execute(QUERIES["claim_deliveries"],
                                     {"now": now, "limit": limit, "until": now + lease})
                return [Delivery(**row) for row in await cursor.fetchall()]

    async def delivery_done(self, delivery: Delivery, attempted: Attempted) -> None:
        async with self._db() as conn:
            await conn.execute(QUERIES["delivery_done"], (
                attempted.status, attempted.attempts, attempted.last_error, attempted.next_at,
                attempted.payload, delivery.job_id, delivery.ended_at, delivery.claimed_until))

    async def release_delivery(self, delivery: Delivery) -> None:
        async with self._db() as conn:
            await conn.execute(QUERIES["release_delivery"],
                               (delivery.job_id, delivery.ended_at, delivery.claimed_until))

    async def callback(self, job_id: str) -> dict | None:
        async with self._db() as conn, conn.cursor(row_factory=dict_row) as cursor:
            await cursor.execute(QUERIES["select_delivery"], (job_id,))
            return await cursor.fetchone()

    def _remove_files(self, job_id: str) -> None:
        """A job's files, wherever they are. With the object store down, the objects stay
        until the sweep of files no record owns removes them."""
        try:
            self.files.remove(job_id)
        except Unavailable as error:
            log.warning("job %s: its files stay in the store for now: %s", job_id, error)

    async def watch(self, job_id: str) -> AsyncIterator[JobRecord]:
        async with self._subscribed(job_id) as changed:
            last = None
            while True:
                record = await self.get(job_id)
                if record is None:
                    return
                state = (record.status, json.dumps(record.progress), record.attempt)
                if state != last:
                    yield record
                    last = state
                if record.status in FINISHED:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), REFRESH_SECONDS)
                changed.clear()

    @contextlib.asynccontextmanager
    async def feed(self, owner: str) -> AsyncIterator[_PostgresListener]:
        listener = _PostgresListener(self, owner)
        self._feeds.add(listener)
        try:
            yield listener
        finally:
            self._feeds.discard(listener)

    async def stats(self) -> dict[str, dict[str, int | str]]:
        """Cluster-wide: jobs waiting and running, the live workers' slots, and the state of
        their resources of it (cluster_status), per kind."""
        async with self._db() as conn:
            cursor = await conn.execute(QUERIES["count_unfinished"])
            counts = {(kind, status): count for kind, status, count in await cursor.fetchall()}
            workers, states = await self._live_workers(conn)
        return {name: {"workers": workers.get(name, 0),
                       "busy": counts.get((name, "running"), 0),
                       "queued": counts.get((name, "queued"), 0),
                       "capacity": self.settings.limits(self.kinds[name]).queue_size,
                       **cluster_status(states.get(name, [])).shown()}
                for name in self.kinds}

    async def throughput(self, owner: str, since: float) -> list[rollup.MinuteFigures]:
        async with self._db() as conn:
            cursor = await conn.execute(QUERIES["select_minutes"], (owner, since))
            return rollup.figures(await cursor.fetchall())

    async def worker_processes(self) -> list[dict]:
        async with self._db() as conn:
            cursor = await conn.execute(QUERIES["live_workers"],
                                        (time.time() - STALLED_SECONDS,))
            rows = await cursor.fetchall()
        processes = []
        for name, kinds, beat, metrics, states in rows:
            process = {"name": name, "kinds": kinds, "lastSeen": round(time.time() - beat, 1)}
            if metrics is not None:  # a replica's workers (--with-workers) have no port
                process["metrics"] = metrics  # of their own: left out, as /health leaves None
            process["states"] = {kind: worker_status(states.get(kind)).shown() for kind in kinds}
            processes.append(process)
        return processes

    async def _live_workers(self, conn: psycopg.AsyncConnection
                            ) -> tuple[dict[str, int], dict[str, list[Status]]]:
        """Per kind: the live worker processes' slots, and each one's state of its resource
        (the retry of a failed one counted from now)."""
        now = time.time()
        cursor = await conn.execute(QUERIES["live_worker_kinds"], (now - STALLED_SECONDS,))
        return _worker_figures(await cursor.fetchall(), now)

    async def list(self, status: str | None, job_type: str | None, limit: int, offset: int,
                   owner: str) -> list[JobRecord]:
        async with self._db() as conn:
            return await schema.fetch(
                conn, *list_query(QUERIES, status, job_type, limit, offset, owner))

    # ---- the facade: for the retention sweeps ----

    async def store_id(self) -> str:
        return (await self._store_made())["id"]

    async def store_created_at(self) -> float:
        return float((await self._store_made())["created_at"])

    async def _store_made(self) -> dict[str, str]:
        """The store's id and birth, read once (Unavailable while PostgreSQL cannot be
        reached); the tables' maker (schema.ensure) wrote them."""
        if self._made is None:
            async with self._sweep_db() as conn:
                cursor = await conn.execute(QUERIES["store_made"])
                made = dict(await cursor.fetchall())
            if {"id", "created_at"} - made.keys():
                raise Unavailable("The job database has no tables yet; retry in a few seconds.")
            self._made = made
        return self._made

    async def known(self, job_ids: list[str]) -> set[str]:
        async with self._sweep_db() as conn:
            cursor = await conn.execute(QUERIES["known_jobs"], (job_ids,))
            return {job_id for (job_id,) in await cursor.fetchall()}

    async def expired(self, before: float) -> list[str]:
        async with self._sweep_db() as conn:
            cursor = await conn.execute(QUERIES["expired_jobs"], (before,))
            return [job_id for (job_id,) in await cursor.fetchall()]

    async def forget_minutes_before(self, timestamp: float) -> None:
        async with self._sweep_db() as conn:
            await conn.execute(QUERIES["forget_minutes"], (timestamp,))

    @contextlib.asynccontextmanager
    async def _sweep_db(self) -> AsyncIterator[psycopg.AsyncConnection]:
        """`_db` for a sweep's statements, bounded by SWEEP_STATEMENT_SECONDS and
        SWEEP_SECONDS rather than a request's few seconds."""
        async with self._db(SWEEP_SECONDS) as conn, conn.transaction():
            await conn.execute(QUERIES["sweep_statement_timeout"],
                               (str(int(SWEEP_STATEMENT_SECONDS * 1000)),))
            yield conn

    # ---- notifications ----

    @contextlib.asynccontextmanager
    async def _subscribed(self, job_id: str, ends_only: bool = False
                          ) -> AsyncIterator[asyncio.Event]:
        """An event set when the job changes; with `ends_only`, not for a change whose
        notification says the job is still queued or running (a wait for its end then reads
        the record only when it may have ended)."""
        changed = _EndWaiter() if ends_only else asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(changed)
        try:
            yield changed
        finally:
            waiters = self._waiters.get(job_id, set())
            waiters.discard(changed)
            if not waiters:
                self._waiters.pop(job_id, None)

    async def _listen(self) -> None:
        """LISTEN for job changes for as long as the replica runs, reconnecting after an
        outage (everyone then reads again: notifications may have been missed)."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        timeouts.conninfo(self.url), autocommit=True) as conn:
                    with timeouts.deadline(conn, ANSWER_SECONDS):
                        await conn.execute(QUERIES["listen"])
                    self._listening = True
                    self._generation += 1
                    self._wake_everyone()
                    async for notification in conn.notifies():
                        self._dispatch(json.loads(notification.payload))
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if self._listening:
                    log.warning("lost the database connection that listens for job changes "
                                "(%s); connecting again", schema.unavailable(error))
                self._listening = False
                self._generation += 1
                self._wake_everyone()
                await asyncio.sleep(1.0)

    def _dispatch(self, change: dict[str, Any]) -> None:
        unfinished = change.get("status") in UNFINISHED
        waiters = self._waiters.get(change["id"], ())
        for changed in waiters:
            if isinstance(changed, _EndWaiter):
                if unfinished:
                    continue
                changed.record = change.get("record")  # the latest change's, if it has one
            changed.set()
        if not unfinished and not waiters and change["id"] in self._fresh:
            self._early_ends[change["id"]] = change.get("record")  # for its wait
        for listener in self._feeds:
            listener.note(change)

    def _wake_everyone(self) -> None:
        for waiters in self._waiters.values():
            for changed in waiters:
                if isinstance(changed, _EndWaiter):
                    changed.record = None  # notifications may have been missed: read it
                changed.set()


class _EndWaiter(asyncio.Event):
    """A subscriber to a job's end only (`_subscribed`); `record` is the ended record the
    notification that woke it carried (queries.sql's `finish`), if any."""

    def __init__(self) -> None:
        super().__init__()
        self.record: dict[str, Any] | None = None


# A wait's note that no end of its job was told before it began.
_NOT_ENDED: Any = object()


class _PostgresListener:
    """One `/events` stream's share of the notifications: ids changed since its last batch."""

    def __init__(self, engine: PostgresEngine, owner: str):
        self.engine = engine
        self.owner = owner
        self.changed: set[str] = set()
        self.removed: set[str] = set()
        self.wake = asyncio.Event()

    def note(self, change: dict[str, Any]) -> None:
        if change.get("owner", "") != self.owner:
            return
        if change.get("removed"):
            self.changed.discard(change["id"])
            self.removed.add(change["id"])
        else:
            self.changed.add(change["id"])
        self.wake.set()

    async def next_batch(self) -> tuple[list[JobRecord], list[str]]:
        await self.wake.wait()
        self.wake.clear()
        changed, self.changed = list(self.changed), set()
        removed, self.removed = sorted(self.removed), set()
        records = []
        if changed:
            async with self.engine._db() as conn:
                records = await schema.fetch(conn, QUERIES["select_summaries"], (changed,))
        return records, removed


def _worker_figures(rows: list[tuple], now: float
                    ) -> tuple[dict[str, int], dict[str, list[Status]]]:
    """`_live_workers` from the rows of `live_worker_kinds` read at `now`."""
    workers: dict[str, int] = {}
    states: dict[str, list[Status]] = {}
    for kinds, beats, beat in rows:
        # The heartbeat's age by this replica's clock, within what a live one can be.
        age = min(max(now - beat, 0.0), STALLED_SECONDS)
        for name, count in kinds.items():
            workers[name] = workers.get(name, 0) + int(count)
            states.setdefault(name, []).append(worker_status(beats.get(name), age))
    return workers, states


def _estimate(figures: dict[str, Any], workers: int, ahead: int) -> float | None:
    """lifecycle.estimated_start for a job with `ahead` jobs before it, from a kind's
    `admission` figures and its live worker slots."""
    median = figures["median"]
    return lifecycle.estimated_start(ahead, float(median) if median is not None else None,
                                     figures["finished"], workers, figures["running"])


def worker_status(beat: dict[str, Any] | None, age: float = 0.0) -> Status:
    """A kind's state as a worker's heartbeat (`age` seconds ago) told it; ready when it told
    none (a worker of before states were told)."""
    if not beat:
        return Status(State.READY)
    try:
        state = State(beat.get("state"))
    except ValueError:  # a state of a later version: nothing this replica knows is wrong
        return Status(State.READY)
    if state is not State.FAILED:
        return Status(state)
    retry_in = max(0.0, float(beat.get("retryIn") or 0) - age)
    return Status(state, str(beat.get("error") or "setup failed"), retry_in)


def cluster_status(workers: list[Status]) -> Status:
    """A kind's state across the live workers that serve it: ready if any has it ready, else
    loading if any loads it, else failed (the first one's error, the soonest retry). With no
    live worker, ready: nothing is loading or failed (`workers: 0` says nobody runs it)."""
    states = {status.state for status in workers}
    if not workers or State.READY in states:
        return Status(State.READY)
    if State.LOADING in states:
        return Status(State.LOADING)
    return Status(State.FAILED, workers[0].error,
                  min(status.retry_in or 0.0 for status in workers))


def _procrastinate_schema() -> str:
    from jobqueue.engines.postgres.runner import schema_sql

    return schema_sql()
