"""Running jobs in the distributed engine: procrastinate workers, one per job kind, in a worker
process (`python -m jobqueue.worker`) or in an API replica started with `--with-workers`.

Each kind is a procrastinate task on a queue of its name, `jobqueue.<kind>`, whose only
argument is the job id; the job itself lives in `jobqueue_jobs`. The `Runner` claims the record,
runs the kind's handler on a thread of its own with a `JobContext` (the same
handlers as the embedded engine), pushes progress to the record, and writes how it ended, each
with a NOTIFY the API replicas listen for.

A cancel (DELETE, a /put timeout) reaches a running job as procrastinate's abort, which
cancels the task here: its child processes are killed at once. A worker SIGTERMed gives its
jobs JOBQUEUE_SHUTDOWN_GRACE, then aborts and queues them again. A worker that dies (`kill -9`)
stops its heartbeat; every runner looks for jobs of dead workers and queues them again
(procrastinate does not by itself). Only the run that claimed a job last may write its end.

A kind with a `setup` gets its resource made once in this process, on a thread, as the runner
starts (resources.py); its procrastinate worker starts only once it is ready, so its jobs wait
in the queue meanwhile (another worker that has it ready takes them). The heartbeat carries
each kind's state, which the replicas show in /health and refuse new jobs by.

A batched kind (`JobKind.batch`) gets workers × max_size procrastinate slots: each job fetched
waits in the kind's `Batcher` (its record still queued) until one of the kind's `workers`
batch formers takes it into a batch; then it is claimed, and ends, as any job is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import procrastinate
import psycopg
from procrastinate.job_context import AbortReason
from procrastinate.job_context import JobContext as ProcrastinateContext
from procrastinate.manager import JobManager
from procrastinate.schema import SchemaManager
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from jobqueue import lifecycle, rollup, sql, tracing
from jobqueue.engines.postgres import schema
from jobqueue.engines.postgres.schema import QUERIES
from jobqueue.errors import JobCancelled, Unavailable
from jobqueue.files import FileStore, jobfiles, make_file_store
from jobqueue.jobs import JobContext, JobKind, JobStatus, Output
from jobqueue.lifecycle import Ending
from jobqueue.metrics import Metrics, Outcome, outcome
from jobqueue.records import JobRecord, Origin
from jobqueue.resources import Resource
from jobqueue.settings import Settings

log = logging.getLogger(__name__)

# A worker that has not beaten for STALLED_SECONDS is dead: its running jobs are queued again.
HEARTBEAT_SECONDS = 2.0
STALLED_SECONDS = 8.0
# How often procrastinate looks for jobs to abort and new jobs, beside LISTEN/NOTIFY.
ABORT_POLL_SECONDS = 0.5
FETCH_POLL_SECONDS = 1.0
# Progress reaches the record at most this often.
PROGRESS_SECONDS = 0.25
# After a database error, how long before the next try (the outage may last).
RETRY_SECONDS = 1.0
# With object storage, each worker process runs its jobs in out/scratch-<host>-<pid>/.
SCRATCH_PREFIX = "scratch-"
# The database connections a batched kind adds to a worker's pool, at most: its jobs hold one
# only for a statement or two each (their claim, progress, end), so they take turns.
BATCH_CONNECTIONS = 8


# A job's claim, or its end if a cancel asked for it while it was queued (queries.sql's `take`).
TAKE = sql.fill(QUERIES["take"], cancelled=QUERIES["claim_cancelled"],
                started=QUERIES["claim"])


def task_name(kind: str) -> str:
    return f"jobqueue.{kind}"


def make_app(kinds: Iterable[str]) -> procrastinate.App:
    """The procrastinate app, with a task per job kind served (replicas defer them, runners
    run them). It is opened on the caller's pool."""
    # procrastinate logs each job's start and end at INFO, an abort with a traceback; the
    # runner's own lines say the same with the job id. Its warnings and errors still show.
    logging.getLogger("procrastinate").setLevel(logging.WARNING)
    app = procrastinate.App(connector=procrastinate.PsycopgConnector())
    app.job_manager = Manager(app.connector)  # before the tasks, which keep it
    for name in kinds:
        async def run(context: ProcrastinateContext, job_id: str) -> None:
            await context.additional_context["runner"].run_job(context, job_id)

        app.task(name=task_name(name), queue=name, pass_context=True)(run)
    return app


class Manager(JobManager):
    """procrastinate's JobManager with two changes on a job's path through a worker:

    - A fetch that finds nothing while a new job's notification came in fetches again.
      procrastinate's worker clears its wake-up after every fetch, so a job committed while
      a fetch ran (too late for its snapshot) would otherwise wait for the next poll
      (FETCH_POLL_SECONDS).
    - A job whose end the runner wrote together with the deletion of its procrastinate job
      (queries.sql's `finish`) is not finished again by procrastinate's worker: that would
      be a statement for nothing (and one that fails: the job is gone)."""

    def __init__(self, connector: Any):
        super().__init__(connector)
        self._notified: dict[tuple[str, ...] | None, int] = {}
        self._finished: set[int] = set()

    def finished_here(self, procrastinate_id: int | None) -> None:
        if procrastinate_id is not None:
            self._finished.add(procrastinate_id)

    async def listen_for_jobs(self, *, on_notification: Any,
                              queues: Iterable[str] | None = None) -> None:
        key = _queues_key(queues)

        async def counted(*, channel: str, notification: Any) -> None:
            if notification.get("type") == "job_inserted":
                self._notified[key] = self._notified.get(key, 0) + 1
            await on_notification(channel=channel, notification=notification)

        await super().listen_for_jobs(on_notification=counted, queues=queues)

    async def fetch_job(self, queues: Iterable[str] | None, worker_id: int) -> Any:
        key = _queues_key(queues)
        while True:
            seen = self._notified.get(key, 0)
            job = await super().fetch_job(queues, worker_id)
            if job is not None or self._notified.get(key, 0) == seen:
                return job

    async def finish_job(self, job: Any, status: Any, delete_job: bool) -> None:
        if job.id in self._finished:
            self._finished.discard(job.id)
            return
        await super().finish_job(job, status, delete_job)


def _queues_key(queues: Iterable[str] | None) -> tuple[str, ...] | None:
    return None if queues is None else tuple(sorted(queues))


def schema_sql() -> str:
    return SchemaManager.get_schema()


async def defer(app: procrastinate.App, conn: AsyncConnection, record: JobRecord) -> None:
    """Give a queued record a procrastinate job of its own (within `conn`'s transaction), in
    its place in lifecycle.dispatch_order (schema.procrastinate_priority) and, when it waits
    for a retry (next_attempt_at), fetched no sooner than then; and tell the replicas."""
    options: dict[str, Any] = {"connection": conn, "priority": schema.procrastinate_priority(
        record.priority, record.fair_round)}
    if record.next_attempt_at is not None and record.next_attempt_at > time.time():
        options["schedule_at"] = datetime.fromtimestamp(record.next_attempt_at, UTC)
    task = app.tasks[task_name(record.job_type)]
    procrastinate_id = await task.configure(**options).defer_async(job_id=record.id)
    await conn.execute(QUERIES["set_procrastinate_id"], (procrastinate_id, record.id))
    await schema.notify(conn, record.id, record.owner)


async def insert_queued(app: procrastinate.App, conn: AsyncConnection,
                        record: JobRecord) -> None:
    """A new queued record, its procrastinate job (as `defer` makes it, never scheduled
    later: a new job waits for no retry) and the replicas' notification, in one statement
    within `conn`'s transaction (queries.sql's `insert_queued`)."""
    task = app.tasks[task_name(record.job_type)]
    payload = json.dumps({"id": record.id, "owner": record.owner, "removed": False,
                          "status": JobStatus.QUEUED.value})
    await conn.execute(QUERIES["insert_queued"], (
        task.queue, task.name, schema.procrastinate_priority(record.priority, record.fair_round),
        Jsonb({"job_id": record.id}), *schema.params(record), payload))


async def admission(conn: AsyncConnection, kind: str, priority: int, fair_key: str,
                    job_id: str) -> dict[str, Any]:
    """What a submit or a retry of a kind is decided by (queries.sql's `admission`): its
    queued and running jobs, the owner's queued ones, the rounds lifecycle.fair_round takes,
    the recent median run time and how many runs it is of."""
    async with conn.cursor(row_factory=dict_row) as cursor:
        await cursor.execute(QUERIES["admission"], {
            "kind": kind, "priority": priority, "fair_key": fair_key, "id": job_id})
        return await cursor.fetchone()


def fair_round(figures: dict[str, Any]) -> int:
    """A queued job's round from its kind's `admission` figures."""
    return lifecycle.fair_round(figures["lowest_round"], figures["owners_last"])


def slots(kind: JobKind, workers: int) -> int:
    """The procrastinate slots of a kind in one worker process: its workers; a batched kind's
    jobs wait for their batch in slots of their own, up to max_size for each worker."""
    return workers * kind.batch.max_size if kind.batch is not None else workers


def connections(settings: Settings, kinds: dict[str, JobKind]) -> int:
    """The size of a worker process's pool of database connections: one for each job that runs
    at once, at most BATCH_CONNECTIONS more for each batched kind, and a few for the side tasks
    (heartbeats, rescues, the watch of cancels, procrastinate's listeners)."""
    total = 6
    for kind in kinds.values():
        workers = settings.limits(kind).workers
        total += workers + min(slots(kind, workers) - workers, BATCH_CONNECTIONS)
    return total


@dataclass(eq=False)
class Run:
    """One run of a job in this process: its record as claimed, its handler's context, and
    what the runner learns of it as it goes."""

    record: JobRecord
    context: JobContext
    # Stopped at JOBQUEUE_JOB_MAX_SECONDS.
    timed_out: bool = False
    # Since when it has waited for the object store (time.monotonic()), while it does.
    store_down_since: float | None = None
    # Set, beside the context's cancel, when the watch of cancels stops it (a batch's job
    # then ends at once).
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    # A batch's job that ended before its batch did (a cancel, its deadline): its files are
    # tidied once the batch's handler has returned (`batch_done`), which may write on.
    left_batch: bool = False
    batch_done: bool = False
    # Its end as written: its status, and whether this run owned the end.
    ended: tuple[JobStatus, bool] | None = None
    # Its handler's run on the executor (a single job's; None in a batch).
    handler: asyncio.Future | None = None
    # Its spans (tracing.py), in the trace of the request that submitted it; and how the run
    # ended for its span: an outcome as jobqueue_jobs_total counts it (`retried`, or
    # `requeued` after this worker's shutdown), and its error's message.
    trace: Any = tracing.NO_TRACE
    outcome: tuple[str, str | None] = ("interrupted", None)
    # The procrastinate job that runs it: its end deletes that one too (`finish`).
    procrastinate_id: int | None = None

    @property
    def id(self) -> str:
        return self.record.id


def run_handler(kind: JobKind, run: Run, files: FileStore) -> Ending:
    """On a thread: fetch the job's input, run the kind's handler, keep its outputs; and how
    it ended (lifecycle.run)."""
    with run.trace.active():  # an executor's thread has no context of the task's
        return lifecycle.run(kind, run.context, lambda: prepare(kind, run, files),
                             lambda output: keep(run, files, output))


def run_batch_handler(kind: JobKind, runs: list[Run], files: FileStore,
                      on_call: Callable[[int], None]) -> list[Ending]:
    """On a thread: the same for a batch, each job's input fetched and outputs kept on its
    own, one call of the handler for them all; how each ended (lifecycle.run_batch)."""
    by_id = {run.id: run for run in runs}
    return lifecycle.run_batch(
        kind, [run.context for run in runs],
        lambda context: prepare(kind, by_id[context.id], files),
        lambda context, output: keep(by_id[context.id], files, output), on_call)


def prepare(kind: JobKind, run: Run, files: FileStore) -> None:
    """Before the handler: clear what a dead run of the job left, fetch its input."""
    context, record = run.context, run.record
    if kind.writes_files:
        jobfiles.discard_output(context.out_dir)  # what a dead run of this job left
    if record.input_path:
        context.input_path = until_stored(run, lambda: files.fetch_input(
            run.id, record.input_path, context.raise_if_cancelled))


def keep(run: Run, files: FileStore, output: Output) -> None:
    """After a success: publish the job's outputs."""
    until_stored(run, lambda: files.publish(run.record, output.files,
                                            run.context.raise_if_cancelled))


def clear_dead_scratch(out_dir: Path) -> None:
    """At start: remove the scratch folders of this machine's worker processes that are gone
    (killed: nothing else removes them), never a live one's. This process's own pid may name
    one too, left by an earlier process with the same pid and host name (a restarted
    container's pid 1): nothing of this process is in it yet."""
    host = socket.gethostname()
    for folder in out_dir.glob(f"{SCRATCH_PREFIX}{host}-*"):
        pid = folder.name.removeprefix(f"{SCRATCH_PREFIX}{host}-")
        if pid.isdigit() and (int(pid) == os.getpid() or not Path(f"/proc/{pid}").exists()):
            log.info("removing %s, the scratch folder of a worker that is gone", folder)
            shutil.rmtree(folder, ignore_errors=True)


def until_stored(run: Run, action: Any) -> Any:
    """`action` (a transfer to or from the object store), tried again while the store cannot
    be reached: an outage holds the job, it does not fail it. A cancel, or the job's run-time
    limit, still stops it, between two tries and within a transfer (`action` checks)."""
    while True:
        try:
            result = action()
        except Unavailable as error:
            if run.store_down_since is None:
                log.warning("job %s: %s; waiting for it", run.id, error)
                run.store_down_since = time.monotonic()
        else:
            run.store_down_since = None
            return result
        if run.context.cancel_requested.wait(RETRY_SECONDS):
            raise JobCancelled(run.id)


async def whole(work: Any) -> Any:
    """Await `work` to its end even if the caller is cancelled meanwhile; the cancel is
    raised after."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:  # a second cancel meanwhile must not reach `work` either
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():  # `work` itself was cancelled
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


@dataclass(eq=False)
class Seat:
    """A batched kind's job that procrastinate handed this process, from its wait for a batch
    to its end."""

    job_id: str
    # True once a batch takes it (its run_job claims it then), False when this process closes
    # (it is given back); cancelled when it was aborted while it waited.
    admitted: asyncio.Future[bool]
    # Its Run once claimed; None when it will not join (cancelled meanwhile, or aborted).
    joined: asyncio.Future[Run | None]
    # Its batch's answer in its place.
    ending: asyncio.Future[Ending]


class Batcher:
    """A batched kind in this process: `workers` formers, each taking the first job waiting,
    then up to max_size - 1 more that come within max_wait from then, and calling the handler
    once for those that were claimed (`call`); so at most `workers` batches run at once."""

    def __init__(self, kind: JobKind, workers: int,
                 call: Callable[[list[Run]], Awaitable[list[Ending]]]):
        self.kind = kind
        self.workers = workers
        self.call = call
        self.waiting: deque[Seat] = deque()
        self.arrived = asyncio.Event()
        self.closed = False

    def seat(self, job_id: str) -> Seat:
        """A job fetched for this kind: it waits for a batch to take it."""
        loop = asyncio.get_running_loop()
        seat = Seat(job_id, loop.create_future(), loop.create_future(), loop.create_future())
        if self.closed:
            seat.admitted.set_result(False)
        else:
            self.waiting.append(seat)
            self.arrived.set()
        return seat

    def close(self) -> None:
        """Take no more jobs into batches: those waiting are given back (they wait for another
        worker); batches formed run on."""
        self.closed = True
        while self.waiting:
            seat = self.waiting.popleft()
            if not seat.admitted.done():
                seat.admitted.set_result(False)

    async def form(self) -> None:
        """One former: a batch at a time, for as long as the process runs."""
        loop = asyncio.get_running_loop()
        size, wait = self.kind.batch.max_size, self.kind.batch.max_wait
        while True:
            seats = [await self._take(None)]
            until = loop.time() + wait
            while len(seats) < size and (seat := await self._take(until)) is not None:
                seats.append(seat)
            joined = [(seat, await seat.joined) for seat in seats]
            joined = [(seat, run) for seat, run in joined if run is not None]
            if not joined:
                continue
            try:
                endings = await self.call([run for _, run in joined])
            except Exception as error:  # only a bug gets here; the former keeps forming
                log.exception("a batch of %s jobs failed to run", self.kind.name)
                endings = [Ending(JobStatus.FAILED, error=error)] * len(joined)
            for (seat, _), ending in zip(joined, endings):
                if not seat.ending.done():
                    seat.ending.set_result(ending)

    async def _take(self, until: float | None) -> Seat | None:
        """The next job waiting, admitted into a batch (its run_job claims it now); with
        `until` (the loop's clock), None when none came by then."""
        loop = asyncio.get_running_loop()
        while True:
            while self.waiting:
                seat = self.waiting.popleft()
                if not seat.admitted.done():  # else aborted while it waited
                    seat.admitted.set_result(True)
                    return seat
            self.arrived.clear()
            left = None if until is None else until - loop.time()
            if left is not None and left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), left)


class Runner:
    """procrastinate workers for `kinds` in this process, sharing `pool`."""

    def __init__(self, settings: Settings, kinds: dict[str, JobKind], pool: AsyncConnectionPool,
                 metrics: Metrics, app: procrastinate.App | None = None,
                 files: FileStore | None = None):
        self.settings = settings
        self.kinds = kinds
        self.pool = pool
        self.metrics = metrics
        self.name = f"{socket.gethostname()}-{os.getpid()}"
        self.files = files or make_file_store(settings)
        if self.files.remote:
            # Scratch space of this process's own: another worker on this machine may run
            # the same job again after a crash, and neither may clear the other's folder.
            self.files = make_file_store(settings.model_copy(update={
                "out_dir": settings.out_dir / f"{SCRATCH_PREFIX}{self.name}"}))
        # Where a worker process serves its metrics (its heartbeat tells /health); None in a
        # replica --with-workers, whose /metrics has them.
        self.metrics_url: str | None = None
        self.app = app or make_app(kinds)
        self.running: dict[str, Run] = {}
        self.limits = {name: settings.limits(kind) for name, kind in kinds.items()}
        # Each kind's resource (its setup) in this process; its worker waits for it (`_ready`).
        self.resources = {name: Resource(kind, settings, self._resource_changed)
                          for name, kind in kinds.items()}
        self._ready = {name: asyncio.Event() for name in kinds}
        self._beat_now = asyncio.Event()  # a state changed: the heartbeat tells it at once
        self._loop: asyncio.AbstractEventLoop | None = None
        concurrency = sum(limits.workers for limits in self.limits.values())
        self.executor = ThreadPoolExecutor(concurrency + 1, thread_name_prefix="job")
        self.batchers = {name: Batcher(kind, self.limits[name].workers, self._batch_caller(kind))
                         for name, kind in kinds.items() if kind.batch is not None}
        self._workers: list[asyncio.Task] = []
        self._side: list[asyncio.Task] = []
        self._app_opened = app is None
        # When this process last failed to reach the database (time.monotonic()). Right after
        # an outage every worker's heartbeat is stale, the live ones' too: no job is taken
        # for stranded until they have had the time to beat again.
        self._db_failed_at = float("-inf")

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for resource in self.resources.values():  # setups on threads of their own, first
            resource.start()
        self._resources_changed()
        if self.files.remote:
            await asyncio.to_thread(clear_dead_scratch, self.settings.out_dir)
        if self._app_opened:
            await self.app.open_async(pool=self.pool)
        async with self.pool.connection() as conn:
            await schema.ensure(conn, schema_sql())
        self._side = [asyncio.create_task(self._heartbeat(), name="heartbeat"),
                      asyncio.create_task(self._rescue(), name="rescue stranded jobs"),
                      asyncio.create_task(self._watch_cancels(), name="watch cancels")]
        self._side += [asyncio.create_task(batcher.form(), name=f"batches of {name}")
                       for name, batcher in self.batchers.items()
                       for _ in range(batcher.workers)]
        self._workers = [asyncio.create_task(self._work(name), name=f"worker {name}")
                         for name in self.kinds]
        for name in self.kinds:  # this process's own slots; the replicas show the cluster's
            self.metrics.workers.labels(name, "process").set(self.limits[name].workers)
            self.metrics.running.labels(name, "process").set(0)
        log.info("worker %s serves %s", self.name,
                 {name: self.limits[name].workers for name in self.kinds})

    def close_intake(self) -> None:
        """Take no more jobs: the procrastinate workers stop, giving running jobs the grace;
        jobs waiting for a batch are given back."""
        for worker in self._workers:
            worker.cancel()
        for batcher in self.batchers.values():
            batcher.close()

    def busy(self) -> bool:
        return bool(self.running)

    async def stop(self) -> None:
        """Stop taking jobs; running ones get JOBQUEUE_SHUTDOWN_GRACE, then are aborted and
        queued again. Then stop beating: this worker is gone. Then each kind's teardown."""
        self.close_intake()
        for resource in self.resources.values():
            resource.close()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for task in self._side:
            task.cancel()
        await asyncio.gather(*self._side, return_exceptions=True)
        with contextlib.suppress(Exception):
            async with self.pool.connection() as conn:
                await conn.execute(QUERIES["forget_worker"], (self.name,))
        self.executor.shutdown(wait=False)
        # No handler holds a resource now: each job's run waited for its handler to return.
        await asyncio.gather(*(asyncio.to_thread(resource.teardown)
                               for resource in self.resources.values()))
        if self._app_opened:
            await self.app.close_async()
        if self.files.remote and not self.running:  # every job requeued or ended by now
            await asyncio.to_thread(shutil.rmtree, self.files.out_dir, True)

    def kill_children(self) -> None:
        """From any thread, when the loop is gone: no child outlives this process."""
        for run in list(self.running.values()):
            run.context.cancel()

    # ---- procrastinate's side ----

    def _resource_changed(self) -> None:
        """From a setup thread: a kind's resource is ready, or failed."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._resources_changed)

    def _resources_changed(self) -> None:
        """On the loop: start the workers of the kinds now ready, and beat now."""
        for name, resource in self.resources.items():
            if resource.ready:
                self._ready[name].set()
            self.metrics.kind_ready.labels(name, "process").set(int(resource.ready))
        self._beat_now.set()

    async def _work(self, kind: str) -> None:
        """One procrastinate worker for `kind`, once its resource is ready; started again
        after a database outage."""
        await self._ready[kind].wait()  # meanwhile its jobs wait in the queue
        while True:
            try:
                await self.app.run_worker_async(
                    queues=[kind], name=f"{self.name}-{kind}",
                    concurrency=slots(self.kinds[kind], self.limits[kind].workers),
                    wait=True, install_signal_handlers=False, listen_notify=True,
                    fetch_job_polling_interval=FETCH_POLL_SECONDS,
                    abort_job_polling_interval=ABORT_POLL_SECONDS,
                    update_heartbeat_interval=HEARTBEAT_SECONDS,
                    stalled_worker_timeout=STALLED_SECONDS,
                    shutdown_graceful_timeout=self.settings.shutdown_grace,
                    additional_context={"runner": self}, delete_jobs="always")
                return
            except asyncio.CancelledError:
                raise
            except Exception as error:  # most often the database went away: try again
                log.warning("%s worker stopped (%s); starting again in %g s", kind, error,
                            RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)

    async def _heartbeat(self) -> None:
        kinds = Jsonb({name: self.limits[name].workers for name in self.kinds})
        while True:
            self._beat_now.clear()
            states = Jsonb({name: resource.status().beat()
                            for name, resource in self.resources.items()})
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(QUERIES["heartbeat"],
                                       (self.name, kinds, self.metrics_url, states))
                    await conn.execute(QUERIES["forget_dead_workers"],
                                       (time.time() - 10 * STALLED_SECONDS,))
            except Exception:
                self._db_failed_at = time.monotonic()
            with contextlib.suppress(TimeoutError):  # or at once when a kind's state changed
                await asyncio.wait_for(self._beat_now.wait(), HEARTBEAT_SECONDS)

    async def _rescue(self) -> None:
        """Give the jobs that would otherwise never end their way to an end: those running on
        a worker that stopped beating (killed, or cut off), running here on no run of this
        process's, or queued with nothing left in procrastinate to run them."""
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            if time.monotonic() - self._db_failed_at < STALLED_SECONDS + 2 * HEARTBEAT_SECONDS:
                continue  # just after an outage: the live workers have not beaten again yet
            try:
                async with self.pool.connection() as conn:
                    cursor = await conn.execute(QUERIES["stranded_jobs"], {
                        "kinds": list(self.kinds), "stalled": STALLED_SECONDS,
                        "started": time.time() - STALLED_SECONDS,
                        "me": self.name, "mine": list(self.running)})
                    stranded = await cursor.fetchall()
                # A procrastinate job fetched by a worker that died before it claimed the
                # record (procrastinate's heartbeats; the records' are ours).
                fetched = await self.app.job_manager.get_stalled_jobs(
                    seconds_since_heartbeat=STALLED_SECONDS)
            except Exception as error:  # the database is away: wait for it, then some
                self._db_failed_at = time.monotonic()
                log.debug("looking for stranded jobs failed: %s", error)
                continue
            rescues = [(procrastinate_id, job_id, False) for job_id, procrastinate_id in stranded]
            rescues += [(job.id, None, True) for job in fetched]
            for procrastinate_id, job_id, only_queued in rescues:
                try:  # one that fails keeps none of the others from their rescue
                    await self._rescue_one(procrastinate_id, job_id, only_queued)
                except (PoolTimeout, psycopg.OperationalError) as error:
                    self._db_failed_at = time.monotonic()
                    log.warning("rescue of job %s stopped: %s", job_id or procrastinate_id,
                                error)
                    break
                except Exception:
                    log.exception("rescue of job %s failed", job_id or procrastinate_id)

    async def _watch_cancels(self) -> None:
        """Stop the jobs of this process that a cancel (a DELETE) asked to stop. procrastinate's
        abort does the same, but not while its worker drains: it stops polling for aborts
        before it waits for its running jobs (procrastinate issue #1598)."""
        while True:
            await asyncio.sleep(ABORT_POLL_SECONDS)
            if not self.running:
                continue
            with contextlib.suppress(Exception):  # the next round tries again
                async with self.pool.connection() as conn:
                    cursor = await conn.execute(QUERIES["cancelled_among"], (list(self.running),))
                    for (job_id,) in await cursor.fetchall():
                        job = self.running.get(job_id)
                        if job and not job.context.cancel_requested.is_set():
                            log.info("job %s: cancelled; stopping it", job_id)
                            job.context.cancel()
                            job.stopped.set()

    async def _rescue_one(self, procrastinate_id: int | None, job_id: str | None = None,
                          only_queued: bool = False) -> None:
        """Queue a stranded job again, with a procrastinate job of its own, and end its old
        one; or, when a cancel asked for it, end it as cancelled. Not a retry of the old
        procrastinate job: its run may still be alive in a worker cut off from the database,
        and once the database is back that run would end (and delete) the very procrastinate
        job that was to run it again. The record is locked and checked again: a run that
        wrote its end meanwhile keeps it."""
        statuses = ["queued"] if only_queued else ["queued", "running"]
        cancelled: set[str] = set()
        async with self.pool.connection() as conn, conn.transaction():
            async with conn.cursor(row_factory=dict_row) as cursor:
                # Still as it was found: another worker's rescue of the same job, done while
                # this one waited for the lock, gave it a procrastinate job of its own.
                await cursor.execute(
                    QUERIES["lock_stranded"] if job_id is not None else
                    QUERIES["lock_stranded_by_procrastinate_id"],
                    (job_id, procrastinate_id, statuses) if job_id is not None
                    else (procrastinate_id, statuses))
                found = await cursor.fetchall()
            rows = [schema.from_row(row) for row in found]
            # The stranded jobs a cancel asked to stop, and what it said it was.
            cancelled = {row["id"]: row["cancelled_as"] for row in found
                         if row["cancelled_as"] is not None}
            if only_queued and not rows:
                cursor = await conn.execute(QUERIES["running_on"], (procrastinate_id,))
                if await cursor.fetchone():
                    # Its run may be alive (a worker draining, or cut off for a while): the
                    # records' own heartbeats decide that (stranded_jobs), not procrastinate's.
                    return
            for record in rows:
                if lifecycle.after_interrupted_run(record.id in cancelled) is JobStatus.CANCELLED:
                    await conn.execute(QUERIES["end_cancelled"], (time.time(), record.id))
                    await schema.notify(conn, record.id, record.owner)
                    continue
                await conn.execute(QUERIES["requeue_stranded"], (record.id,))
                await self._queue_again(conn, record)
        if procrastinate_id is not None:
            with contextlib.suppress(Exception):  # ended already: by its run, or a rescue
                await self.app.job_manager.finish_job_by_id_async(
                    procrastinate_id, status=procrastinate.jobs.Status.FAILED, delete_job=True)
        for record in rows:
            if record.id in cancelled:
                log.warning("job %s: stranded after a cancel (nothing left to run it); ended "
                            "as cancelled", record.id)
                self._count_cancelled(record, cancelled[record.id])
                with contextlib.suppress(Unavailable):  # the orphan sweeps get them later
                    await asyncio.to_thread(self.files.remove, record.id)
            else:
                log.warning("job %s: stranded %s (its worker stopped beating, or nothing "
                            "was left to run it); it runs again", record.id, record.status)

    # ---- a job ----

    async def run_job(self, task_context: ProcrastinateContext, job_id: str) -> None:
        seat = None
        if (batcher := self.batchers.get(task_context.job.queue)) is not None:
            seat = await self._wait_for_batch(batcher, task_context, job_id)
            if seat is None:
                return  # given back before its claim: cancelled, or queued again
        # Whole or not at all: an abort cutting a claim short would leave the record queued
        # with its procrastinate job gone (the rescue would find it, later).
        claim = asyncio.ensure_future(self._claim(job_id, task_context.job.id))
        try:
            record = await asyncio.shield(claim)
        except asyncio.CancelledError:  # aborted before it started: it gives the job back
            if (record := await whole(claim)) is not None:
                await whole(self._release(record, task_context.abort_reason()))
            raise
        if record is None:
            if seat is not None:
                seat.joined.set_result(None)
            return  # cancelled or deleted meanwhile
        kind = self.kinds[record.job_type]
        options = kind.options.model_validate(record.options)
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        context = JobContext(job_id, options,
                             Path(record.input_path) if record.input_path else kind.sample,
                             jobfiles.job_dir(self.files.out_dir, job_id), self.settings,
                             on_progress=lambda _: loop.call_soon_threadsafe(changed.set),
                             resource=self.resources[record.job_type].value)
        run = Run(record, context, procrastinate_id=task_context.job.id)
        run.trace = tracing.start_job(record.job_type, job_id, record.attempt,
                                      record.traceparent, record.created_at, record.started_at)
        try:
            with run.trace.active():  # this task's lines are in the run's span
                await self._run_claimed(run, kind, seat, task_context, changed)
        finally:
            run.trace.end(*run.outcome)

    async def _run_claimed(self, run: Run, kind: JobKind, seat: Seat | None,
                           task_context: ProcrastinateContext, changed: asyncio.Event) -> None:
        """A claimed job's run, from its start to its end (or its requeue)."""
        job_id, record, context = run.id, run.record, run.context
        loop = asyncio.get_running_loop()
        self.running[job_id] = run
        self.metrics.job_started(record.job_type, record.created_at, record.started_at)
        running = self.metrics.running.labels(record.job_type, "process")
        running.inc()
        pusher = asyncio.create_task(self._push_progress(run, changed))
        log.info("job %s: %s started on %s", job_id, record.job_type, self.name)
        if seat is not None:  # its batch runs the handler
            try:
                await self._run_in_batch(run, seat, task_context)
            finally:
                pusher.cancel()
                running.dec()
                self.running.pop(job_id, None)
            return
        handler = loop.run_in_executor(self.executor, run_handler, kind, run, self.files)
        run.handler = handler
        try:
            stop_at = self._deadline(record)
            try:
                while True:
                    try:
                        ending = await asyncio.wait_for(asyncio.shield(handler),
                                                        max(0.0, stop_at - time.time()))
                        break
                    except TimeoutError:
                        # A /put job handed over meanwhile runs on, to its new deadline.
                        if (later := await self._handed_over(run)) is None:
                            raise
                        stop_at = later
            except TimeoutError:  # its deadline: JOBQUEUE_JOB_MAX_SECONDS, a /put's timeout
                run.timed_out = True
                context.cancel()
                await handler
                down = run.store_down_since
                ending = lifecycle.at_deadline(
                    job_id, record.origin, self.settings.job_max_seconds,
                    time.monotonic() - down if down is not None else None)
            except asyncio.CancelledError:  # procrastinate's abort: a cancel, or a shutdown
                context.cancel()
                with contextlib.suppress(BaseException):
                    await asyncio.shield(handler)
                cancelled = task_context.abort_reason() != AbortReason.SHUTDOWN
                if lifecycle.after_interrupted_run(cancelled) is JobStatus.QUEUED:
                    await asyncio.shield(self._requeue(run))
                else:
                    await asyncio.shield(self._finish(run, Ending(JobStatus.CANCELLED)))
                raise
            # Whole, whatever aborts it: a cancel the watch of cancels saw first ends the
            # handler, and procrastinate's abort of the same cancel may come as the end is
            # written; cut short, the record would stay running until a rescue.
            await whole(self._finish(run, ending))
        finally:
            pusher.cancel()
            running.dec()
            self.running.pop(job_id, None)

    # ---- a job of a batched kind ----

    async def _wait_for_batch(self, batcher: Batcher, task_context: ProcrastinateContext,
                              job_id: str) -> Seat | None:
        """Wait, unclaimed (its record queued), until a batch takes the job: its seat. None
        when it was given back instead: this process closes, or procrastinate aborted it."""
        seat = batcher.seat(job_id)
        # Whatever ends this run before it joins its batch, the batch does not wait for it.
        asyncio.current_task().add_done_callback(
            lambda _: seat.joined.done() or seat.joined.set_result(None))
        try:
            admitted = await asyncio.shield(seat.admitted)
        except asyncio.CancelledError:  # aborted while it waited: a cancel, or a shutdown
            seat.admitted.cancel()
            if not seat.joined.done():  # taken into a batch just now: it goes without it
                seat.joined.set_result(None)
            await whole(self._give_back(job_id, task_context.job.id))
            raise
        if not admitted:
            await whole(self._give_back(job_id, task_context.job.id))
            return None
        return seat

    async def _give_back(self, job_id: str, procrastinate_id: int | None) -> None:
        """A job fetched for a batch and let go before its claim (its record still queued on
        this procrastinate job): one a cancel asked to stop ends cancelled, as a queued job
        does at its cancel; any other is queued again with a procrastinate job of its own."""
        cancelled = None
        async with self.pool.connection() as conn, conn.transaction():
            async with conn.cursor(row_factory=dict_row) as cursor:
                await cursor.execute(QUERIES["lock_stranded"],
                                     (job_id, procrastinate_id, [JobStatus.QUEUED.value]))
                found = await cursor.fetchall()
            for row in found:
                record = schema.from_row(row)
                if row["cancelled_as"] is not None:
                    await conn.execute(QUERIES["end_cancelled"], (time.time(), job_id))
                    await schema.notify(conn, job_id, record.owner)
                    cancelled = (record, row["cancelled_as"])
                else:
                    await self._queue_again(conn, record)
        if cancelled:
            log.info("job %s: cancelled before it started", job_id)
            self._count_cancelled(*cancelled)
            with contextlib.suppress(Unavailable):  # the orphan sweeps get them later
                await asyncio.to_thread(self.files.remove, job_id)
        elif found:
            log.info("job %s: given back before its batch started; queued again", job_id)

    def _batch_caller(self, kind: JobKind) -> Callable[[list[Run]], Awaitable[list[Ending]]]:
        async def call(runs: list[Run]) -> list[Ending]:
            """One call of the handler for a batch, on a thread; then the files of its jobs
            that ended before it did go as their ends said."""
            try:
                return await asyncio.get_running_loop().run_in_executor(
                    self.executor, run_batch_handler, kind, runs, self.files,
                    lambda size: self.metrics.batch_called(kind.name, size))
            finally:
                for run in runs:
                    run.batch_done = True
                for run in [run for run in runs if run.left_batch and run.ended is not None]:
                    status, owned = run.ended  # ended already: its files were left for now
                    with contextlib.suppress(Exception):  # the sweeps find what is left
                        await asyncio.to_thread(self._tidy, run, status, None, owned)

        return call

    async def _run_in_batch(self, run: Run, seat: Seat, task_context: ProcrastinateContext
                            ) -> None:
        """A claimed job joins its batch and ends as its answer there says; a cancel or its
        deadline ends it at once, its answer dropped when the batch returns, the batch running
        on for the others (lifecycle.AtCancel.LEAVES_BATCH); a shutdown waits for its batch
        to end, as a single job's for its handler, then queues it again."""
        record, context = run.record, run.context
        seat.joined.set_result(run)
        stop_at = self._deadline(record)
        stopped = asyncio.ensure_future(run.stopped.wait())
        try:
            while True:
                await asyncio.wait([seat.ending, stopped],
                                   timeout=max(0.0, stop_at - time.time()),
                                   return_when=asyncio.FIRST_COMPLETED)
                if seat.ending.done() or run.stopped.is_set():
                    break
                # Its deadline; a /put job handed over meanwhile runs on, to its new one.
                if (later := await self._handed_over(run)) is None:
                    break
                stop_at = later
        except asyncio.CancelledError:  # procrastinate's abort: a cancel, or a shutdown
            context.cancel()
            if lifecycle.after_interrupted_run(
                    task_context.abort_reason() != AbortReason.SHUTDOWN) is JobStatus.QUEUED:
                with contextlib.suppress(BaseException):
                    await asyncio.shield(seat.ending)
                await asyncio.shield(self._requeue(run))
            else:
                run.left_batch = not seat.ending.done()
                await asyncio.shield(self._finish(run, Ending(JobStatus.CANCELLED)))
                await self._hold_slot(run, seat)
            raise
        finally:
            stopped.cancel()
        if seat.ending.done():
            ending = seat.ending.result()
        elif run.stopped.is_set():  # the watch of cancels saw a cancel
            run.left_batch = True
            ending = Ending(JobStatus.CANCELLED)
        else:  # its deadline: JOBQUEUE_JOB_MAX_SECONDS, a /put's timeout
            run.left_batch, run.timed_out = True, True
            context.cancel()
            down = run.store_down_since
            ending = lifecycle.at_deadline(run.id, record.origin, self.settings.job_max_seconds,
                                           time.monotonic() - down if down is not None else None)
        await whole(self._finish(run, ending))
        await self._hold_slot(run, seat)

    def _deadline(self, record: JobRecord) -> float:
        """When a run of the job is stopped (lifecycle.deadline), by its origin now."""
        return lifecycle.deadline(record.origin, record.created_at, record.started_at,
                                  self.limits[record.job_type].timeout,
                                  self.settings.job_max_seconds)

    async def _handed_over(self, run: Run) -> float | None:
        """At a /put job's deadline: its new deadline if its client handed it over meanwhile
        (engine.hand_over: it is a POST /jobs job now), else None (it stops). While the
        database cannot be read, it is asked again a little later."""
        record = run.record
        if record.origin is not Origin.PUT:
            return None
        try:
            async with self.pool.connection() as conn:
                cursor = await conn.execute(QUERIES["select_origin"], (run.id,))
                row = await cursor.fetchone()
        except Exception as error:  # stopping a job its client may have kept would lose it
            log.warning("job %s: could not read whether it was handed over (%s); asking again",
                        run.id, error)
            return time.time() + RETRY_SECONDS
        if row is None or Origin(row[0]) is not Origin.JOBS:
            return None
        record.origin = Origin.JOBS
        log.info("job %s: handed over by its client; it runs on", run.id)
        return self._deadline(record)

    @staticmethod
    async def _hold_slot(run: Run, seat: Seat) -> None:
        """A job that left its batch (a cancel, its deadline) keeps its procrastinate slot until
        the batch returns, as a single job's run keeps its slot until its handler returns:
        else jobs fetched into the freed slot would wait behind the batch that still runs
        (and a shutdown would tear its resource down under it)."""
        if not run.left_batch:
            return
        while not seat.ending.done():
            try:
                await asyncio.shield(seat.ending)
            except asyncio.CancelledError:  # an abort, a shutdown: the batch still runs
                continue
            except Exception:  # the batch's own error: its jobs have their ends already
                return

    # ---- a job's claim and end ----

    async def _claim(self, job_id: str, procrastinate_id: int | None) -> JobRecord | None:
        """The record, now running here; None when it is gone, ended, or was cancelled while
        queued (then it ends here: a cancel that came as this worker took the job found no
        procrastinate job left to delete, and asked an abort that may never come). Only the
        record's own procrastinate job may claim it: a stale or duplicate one never takes a
        job over from its run."""
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
            await cursor.execute(TAKE, {"now": time.time(), "worker": self.name,
                                        "id": job_id, "procrastinate_id": procrastinate_id})
            found = await cursor.fetchall()
        rows = [schema.from_row(row) for row in found if row["claimed"]]
        cancelled = [(schema.from_row(row), row["cancelled_as"]) for row in found
                     if not row["claimed"]]
        if cancelled:
            log.info("job %s: cancelled before it started", job_id)
            self._count_cancelled(*cancelled[0])
            with contextlib.suppress(Unavailable):  # the orphan sweeps get them later
                await asyncio.to_thread(self.files.remove, job_id)
        return rows[0] if rows else None

    async def _release(self, record: JobRecord, reason: AbortReason | None) -> None:
        """A job claimed just as procrastinate aborted its run: queued again after a
        shutdown, cancelled after a cancel."""
        ended = None
        async with self.pool.connection() as conn, conn.transaction():
            asked_to_cancel = reason != AbortReason.SHUTDOWN
            if lifecycle.after_interrupted_run(asked_to_cancel) is JobStatus.QUEUED:
                rows = await schema.fetch(
                    conn, QUERIES["release"], (record.id, record.attempt))
                for row in rows:
                    await self._queue_again(conn, row)
            else:
                cursor = await conn.execute(
                    QUERIES["end_run_cancelled"], (time.time(), record.id, record.attempt))
                ended = await cursor.fetchone()  # None: ended, or another run's by now
                await schema.notify(conn, record.id, record.owner)
        if ended:
            self._count_cancelled(record, ended[0])
        log.info("job %s: aborted as it started (%s)", record.id, reason)

    def _count_cancelled(self, record: JobRecord, cancelled_as: str | None) -> None:
        """An end this process wrote without a run of its own behind it: counted like any,
        as what its cancel said it was (a client's, a deadline, a shutdown)."""
        self.metrics.job_ended(record.job_type, outcome(JobStatus.CANCELLED.value, None,
                                                        cancelled_as), None, None)

    async def _push_progress(self, run: Run, changed: asyncio.Event) -> None:
        while True:
            await changed.wait()
            changed.clear()
            if run.handler is not None and run.handler.done():
                return  # its end writes the last progress with it: one transaction less
            with contextlib.suppress(Exception):  # progress may be lost; the end may not
                async with self.pool.connection() as conn, conn.transaction():
                    await conn.execute(
                        QUERIES["set_progress"],
                        (Jsonb(run.context.progress.as_dict()), run.id, run.record.attempt))
                    await schema.notify(conn, run.id, run.record.owner)
            await asyncio.sleep(PROGRESS_SECONDS)

    async def _finish(self, run: Run, ending: Ending) -> None:
        """Write how the job ended; only the run that claimed it last may. An outage of the
        database holds the end until the database is back. A failed attempt its kind retries
        is queued again instead (`_retried`)."""
        if await self._retried(run, ending):
            return
        record, status = run.record, ending.status
        result, error_kind = ending.result, ending.error_category
        finished_at = time.time()
        minute = rollup.key(record.owner, record.job_type, status.value, record.started_at,
                            finished_at)
        params = {"status": status.value, "finished_at": finished_at,
                  "progress": Jsonb(run.context.progress.as_dict()),
                  "error": ending.error_message(run.id), "error_kind": error_kind,
                  "result": Jsonb(result) if result is not None else None, "id": run.id,
                  "attempt": record.attempt, "procrastinate_id": run.procrastinate_id,
                  "counted": minute is not None,
                  "minute": minute[2] if minute else 0, "bucket": minute[3] if minute else 0}
        while True:
            try:
                # One statement, its own transaction: the end, the procrastinate job's, the
                # rollup's row and the notify (queries.sql's `finish`).
                async with self.pool.connection() as conn:
                    cursor = await conn.execute(QUERIES["finish"], params)
                    ended = await cursor.fetchone()  # None: a later run owns the job now
                break
            except Exception as db_error:
                log.warning("job %s: could not record its end (%s); trying again", run.id,
                            db_error)
                await asyncio.sleep(RETRY_SECONDS)
        if ended:
            record.origin = Origin(ended[1])  # handed over meanwhile, maybe
            if ended[2]:  # procrastinate's own finish of it would find nothing
                self.app.job_manager.finished_here(run.procrastinate_id)
        run.ended = (status, bool(ended))
        if ended:
            cancelled_as = ended[0] or (Outcome.DEADLINE.value if run.timed_out else None)
            ran = outcome(status.value, error_kind, cancelled_as)
            self.metrics.job_ended(record.job_type, ran, record.started_at, finished_at)
            run.outcome = (ran.value, ending.error_message(run.id) if ending.error else None)
        else:  # a later run of the job owns its end
            run.outcome = ("stale", None)
        try:
            if not run.left_batch or run.batch_done:  # else after its batch: it may write on
                await asyncio.to_thread(self._tidy, run, status, result, bool(ended))
        except Exception:  # the end is recorded; a file left over is the sweeps' to find
            log.exception("job %s: tidying its files failed", run.id)
        # As in the embedded engine: a /put job that succeeded shows in its replica's access
        # log already (its 200).
        quiet = status is JobStatus.SUCCEEDED and record.origin is Origin.PUT
        log.log(logging.DEBUG if quiet else logging.INFO, "job %s: %s after %.3f s", run.id,
                status.value, finished_at - (record.started_at or finished_at))

    async def _retried(self, run: Run, ending: Ending) -> bool:
        """A failed attempt its kind's Retry (or a RetryLater) runs again: queued, in a new
        fair round, with a procrastinate job fetched no sooner than its delay; the failure
        kept in earlier_errors; its partial output discarded, its upload kept. Only an end
        the handler gave: never one after a deadline, a cancel or a shutdown
        (lifecycle.retry_in's `stopped`). False when the failure is final, or a cancel or a
        later run of the job came meanwhile (it then ends as its run did)."""
        record, name = run.record, run.record.job_type
        limits = self.limits[name]
        now = time.time()
        delay = lifecycle.retry_in(
            ending, lifecycle.retry_policy(self.kinds[name], limits.retries),
            len(record.earlier_errors), record.origin, record.created_at, limits.timeout, now,
            stopped=run.timed_out or run.context.cancel_requested.is_set())
        if delay is None:
            return False
        failure = lifecycle.earlier_error(record.attempt, ending.error_message(run.id), now)
        while True:
            try:
                async with self.pool.connection() as conn, conn.transaction():
                    # Its round as a submit's is found: under the kind's lock, the count exact.
                    await conn.execute(QUERIES["lock_kind"], (f"jobqueue:{name}",))
                    figures = await admission(conn, name, record.priority, record.fair_key,
                                              record.id)
                    rows = await schema.fetch(conn, QUERIES["retry_attempt"], (
                        now + delay, Jsonb([failure]), fair_round(figures), run.id,
                        record.attempt))
                    for queued in rows:
                        await defer(self.app, conn, queued)
                break
            except Exception as db_error:
                log.warning("job %s: could not queue its retry (%s); trying again", run.id,
                            db_error)
                await asyncio.sleep(RETRY_SECONDS)
        if not rows:
            return False
        run.ended = (JobStatus.QUEUED, True)
        run.outcome = (Outcome.RETRIED.value, failure["error"])
        self.metrics.job_ended(name, Outcome.RETRIED, record.started_at, now)
        try:  # the next attempt starts from its upload alone
            if not run.left_batch or run.batch_done:
                await asyncio.to_thread(self._tidy_retried, run)
        except Exception:  # its next run's prepare discards what is left
            log.exception("job %s: tidying its files failed", run.id)
        log.info("job %s: attempt %d failed (%s); retried in %.1f s", run.id, record.attempt,
                 failure["error"], delay)
        return True

    def _tidy_retried(self, run: Run) -> None:
        """The files of a failed attempt that runs again: its partial output goes, its upload
        stays (with object storage, in the store: this was scratch)."""
        if self.files.remote:
            jobfiles.remove_job_dir(self.files.out_dir, run.id)
        elif self.kinds[run.record.job_type].writes_files:
            jobfiles.discard_output(run.context.out_dir)

    def _tidy(self, run: Run, status: JobStatus, result: dict | None, ended: bool) -> None:
        """The files of a run that ended. Only the run that owns the job touches what is
        kept: a run given up on (its worker stopped beating) that ends later clears its own
        scratch and nothing else. The record's origin is the one its end found (`finish`):
        a /put job handed over keeps its files as a POST /jobs one."""
        record = run.record
        keep = lifecycle.files_after(status, record.origin)
        if ended and keep is lifecycle.Keep.NOTHING:
            try:
                self.files.remove(run.id)
            except Unavailable as error:  # the sweep of objects no record owns gets them
                log.warning("job %s: its files stay in the store for now: %s", run.id, error)
        elif ended and status is JobStatus.SUCCEEDED and self.files.remote:
            record.result = result
            self.files.finished(record)
        elif self.files.remote:  # the store keeps what there is; this was scratch
            jobfiles.remove_job_dir(self.files.out_dir, run.id)
        elif ended and keep is lifecycle.Keep.INPUT:  # shared folder: its partial output
            jobfiles.discard_output(run.context.out_dir)  # goes, its upload stays

    async def _queue_again(self, conn: AsyncConnection, record: JobRecord) -> None:
        """Give a job set back to queued (within `conn`'s transaction) a procrastinate job:
        in the place its priority and round gave it at its submit (or its retry's wait)."""
        await defer(self.app, conn, record)

    async def _requeue(self, run: Run) -> None:
        """A shutdown stopped the job: queue it again (with a procrastinate job of its own).
        A job a cancel asked to stop meanwhile ends as cancelled instead: the shutdown's
        abort can come before the cancel's does, and a job queued again would run again."""
        record = run.record
        async with self.pool.connection() as conn, conn.transaction():
            rows = await schema.fetch(
                conn, QUERIES["requeue_run"], (run.id, record.attempt))
            if rows:
                await self._queue_again(conn, record)
        if not rows:  # cancelled (or no longer this run's job: then its end writes nothing)
            await self._finish(run, Ending(lifecycle.after_interrupted_run(True)))
            return
        if self.files.remote:  # it runs again from the store's copy, wherever it runs
            await asyncio.to_thread(jobfiles.remove_job_dir, self.files.out_dir, run.id)
        run.outcome = ("requeued", None)
        log.info("job %s: stopped by the worker's shutdown; queued again", run.id)
