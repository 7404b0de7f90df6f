"""Job records: what is kept of each job, so accepted jobs survive a restart.

`JobRecord` is a job as every part of the server sees it; `JobStore` is what keeps them. The
embedded engine keeps them in SQLite (`SqliteJobStore`, here, with its statements in
records.sql); the distributed one in its PostgreSQL table (`engines/postgres/`).

In SQLite, writes go behind:
`save` and `delete` only note the change, and one writer thread commits
what has piled up in a single transaction. Saving is then a dict assignment wherever it is
called (the event loop, a worker thread between two steps of a job), and a burst of jobs costs
one commit rather than three each. Reads see every change noted before them: `get` looks at
the changes not yet committed first, the other queries wait until they are (`flush`, so call
them off the event loop). A caller that must know its record is on disk (POST /jobs, before
it answers 202) awaits `written()`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from jobqueue import rollup, sql
from jobqueue.errors import CannotStart, RecordsDiskFull

# Every statement the store sends, by name (records.sql).
QUERIES = sql.load("jobqueue", "records.sql")
# Columns added after the first release, for databases made before them: the query that adds
# each, and the one that fills it in (in the same transaction), if it needs one.
ADDED_COLUMNS = {
    "owner": ("add_owner", None),
    "error_kind": ("add_error_kind", None),
    "attempt": ("add_attempt", "backfill_attempt"),
    "idempotency_key": ("add_idempotency_key", None),
    "priority": ("add_priority", None),
    "fair_round": ("add_fair_round", None),
    "next_attempt_at": ("add_next_attempt_at", None),
    "earlier_errors": ("add_earlier_errors", None),
    "fair_key": ("add_fair_key", None),
    "traceparent": ("add_traceparent", None),
}
JSON_COLUMNS = ("options", "progress", "result", "earlier_errors")
# After a failed commit (a full disk), the writer tries again this much later, twice as late
# after each further failure up to RETRY_MAX_SECONDS: a disk with room again is used within
# seconds, and a disk that stays full is not hammered every second meanwhile.
RETRY_SECONDS = 1.0
RETRY_MAX_SECONDS = 5.0
# How long the writer lets changes pile up before it commits them, unless someone waits for
# them (flush, written): fewer commits, and fewer wake-ups of the writer competing with the
# event loop and the workers for the interpreter.
BATCH_SECONDS = 0.01

log = logging.getLogger(__name__)


class Origin(str, Enum):
    """How a job came: a client waiting on /put for it, or one that comes back (POST /jobs)."""

    PUT = "put"
    JOBS = "jobs"


@dataclass
class JobRecord:
    """What the store keeps of a job; `result` is {"data": ..., "files": [names]}."""

    id: str
    job_type: str
    status: str
    options: dict[str, Any]
    input_path: str | None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    worker_name: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    # The category of the error it failed with (errors.category_of), not a job kind: what /put
    # answers, by errors.HTTP_STATUS.
    error_kind: str | None = None
    result: dict[str, Any] | None = None
    origin: Origin = Origin.JOBS
    owner: str = ""  # which API key submitted it (a hash of it), "" without API keys
    attempt: int = 0  # runs started; a run after a crash or a restart counts again
    idempotency_key: str | None = None  # POST /jobs' Idempotency-Key, per owner
    priority: int = 0  # -10…10: higher runs first, within its kind
    # Its place among its owner's queued jobs (lifecycle.fair_round): jobs of one kind and
    # priority are dispatched by round, then as they came, so owners take turns.
    fair_round: int = 0
    # While it waits for its next attempt after a failure (a Retry): when that may start.
    next_attempt_at: float | None = None
    # The failed attempts before this one: [{"attempt", "error", "finishedAt"}] (epoch s).
    earlier_errors: list[dict[str, Any]] = field(default_factory=list)
    # Whose turn it takes in fair share: the API key's owner name, or the client's address on
    # a server without keys (api/ratelimit.client_key).
    fair_key: str = ""
    # The W3C traceparent of the request that submitted it, while tracing is on (tracing.py):
    # its queue and run spans, wherever it runs, continue that request's trace.
    traceparent: str | None = None

    def __post_init__(self) -> None:
        if type(self.origin) is not Origin:  # a row's text; an engine's record has one already
            self.origin = Origin(self.origin)


COLUMNS = [column.name for column in fields(JobRecord)]
COLUMN_SET = set(COLUMNS)


class _Change(NamedTuple):
    """A noted save (the record, and its row if made already) or delete (record None)."""

    record: JobRecord | None
    row: tuple | None = None


def _row(record: JobRecord) -> tuple:
    return tuple(json.dumps(getattr(record, column)) if column in JSON_COLUMNS
                 else record.origin.value if column == "origin"
                 else getattr(record, column) for column in COLUMNS)


def list_query(queries: sql.Queries, status: str | None, job_type: str | None, limit: int,
               offset: int, owner: str) -> tuple[str, tuple]:
    """A page of one owner's job summaries, newest first, of one status and one kind if
    given: the `list_jobs` query of `queries` (SQLite's QUERIES, or PostgreSQL's) with its
    filters, and its parameters."""
    filters, params = [], [owner]
    if status:
        filters.append(queries["and_status"])
        params.append(status)
    if job_type:
        filters.append(queries["and_job_type"])
        params.append(job_type)
    return (sql.fill(queries["list_jobs"], filters=" ".join(filters)),
            (*params, limit, offset))


class JobStore(Protocol):
    """Where job records are kept. Reads see every change made before them."""

    def save(self, record: JobRecord, ended: bool = False) -> None:
        """Insert or replace the record; `ended`: its job has just ended (rollup.py)."""

    def delete(self, job_id: str) -> None: ...

    def get(self, job_id: str) -> JobRecord | None: ...

    def known(self, job_ids: list[str]) -> set[str]:
        """Which of these jobs have a record."""

    def find_idempotent(self, owner: str, key: str) -> JobRecord | None:
        """The job an owner submitted with this Idempotency-Key, if it is still kept."""

    def list(self, status: str | None = None, job_type: str | None = None,
             limit: int = 50, offset: int = 0, owner: str = "") -> list[JobRecord]: ...

    def unfinished(self) -> list[JobRecord]: ...

    def forget_minutes_before(self, timestamp: float) -> None:
        """Drop the jobs-per-minute rollup (rollup.py) older than `timestamp`."""

    def finished_before(self, timestamp: float) -> list[JobRecord]: ...

    async def written(self) -> None:
        """Until every change made so far is durable."""

    def add_callback(self, job_id: str, owner: str, url: str) -> None:
        """The job's callback URL (webhooks.py), kept until the job is deleted."""

    def claim_deliveries(self, now: float, limit: int, lease: float) -> list[dict[str, Any]]:
        """Webhook deliveries due now, each claimed for `lease` seconds."""

    def delivery_done(self, job_id: str, ended_at: float, status: str, attempts: int,
                      last_error: str | None, next_at: float | None, payload: str,
                      claimed_until: float | None = None) -> None:
        """An attempt's outcome, if the claim (`claimed_until`) is still the one made."""

    def release_delivery(self, job_id: str, ended_at: float,
                         claimed_until: float | None) -> None: ...

    def delivery(self, job_id: str) -> dict[str, Any] | None: ...

    def release_deliveries(self) -> None: ...

    def close(self) -> None: ...

    # Made once with the store and kept with it: each job folder is marked with it, so that a
    # new or emptied store, which knows none of them, never takes them for leftovers.
    store_id: str
    created_at: float  # when the store was made (epoch seconds): nothing older is its own
    location: str  # where the records are, for messages: a path, or a database's name


def new_store_id() -> str:
    return str(uuid.uuid4())


class SqliteJobStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.location = str(path)
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._lock = threading.Lock()  # the writer's connection: one statement at a time
            with self._lock:
                self._db.execute(QUERIES["journal_mode"])
                self._db.execute(QUERIES["synchronous"])
                # A damaged file would otherwise open, and every read of a bad page be a 500.
                problems = [row[0] for row in self._db.execute(QUERIES["quick_check"])]
                if problems != ["ok"]:
                    raise sqlite3.DatabaseError("; ".join(problems))
                self._db.executescript(QUERIES["make_tables"])
                present = {row["name"] for row in self._db.execute(QUERIES["table_columns"])}
                for column, (add, backfill) in ADDED_COLUMNS.items():
                    if column not in present:
                        self._db.execute("BEGIN IMMEDIATE")
                        self._db.execute(QUERIES[add])
                        if backfill is not None:
                            self._db.execute(QUERIES[backfill])
                        self._db.execute("COMMIT")
                self._db.executescript(QUERIES["make_indexes"])
                self._db.executescript(QUERIES["make_deliveries"])
                self._db.executemany(QUERIES["note_store"],
                                     [("id", new_store_id()), ("created_at", str(time.time()))])
                made = dict(self._db.execute(QUERIES["store_made"]).fetchall())
                self.store_id, self.created_at = made["id"], float(made["created_at"])
        except sqlite3.OperationalError as error:  # a full disk, no access: not damage
            if "locked" in str(error):
                raise
            raise CannotStart(f"The job database {path} cannot be opened ({error}). Check the "
                              "disk it is on and that this user may write it and its folder, "
                              "or set JOBQUEUE_DB_PATH.") from None
        except sqlite3.DatabaseError as error:
            raise CannotStart(
                f"The job database {path} is damaged ({error}). Stop the server, keep a copy "
                f"of the file, then recover what it holds: sqlite3 {path} \".recover\" | "
                f"sqlite3 {path}.recovered && mv {path}.recovered {path} (remove {path}-wal "
                "and -shm first). Or move it aside to start with no records; job folders are "
                "then left alone.") from None
        # Reads have a connection of their own: in WAL mode they never wait for a commit.
        self._reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._reader.row_factory = sqlite3.Row
        self._read_lock = threading.Lock()
        # Changes not written yet, by job id (None: delete), in the order each id first came:
        # the order of arrival that `seq` keeps.
        self._pending: dict[str, _Change] = {}
        self._writing: dict[str, _Change] = {}  # taken by the writer, not committed yet
        # Jobs that ran to an end, to add to the rollup with the pending changes.
        self._ended: Counter[rollup.Key] = Counter()
        # Callback URLs of new jobs (webhooks.py), written with the pending changes:
        # (id, owner, url).
        self._callbacks: list[tuple[str, str, str]] = []
        # Taken by the writer, not committed yet; and those whose job had no row when they
        # were (a worker started the job before its submit saved it: its row comes with the
        # start's save, in a later batch).
        self._writing_callbacks: list[tuple[str, str, str]] = []
        self._unplaced: list[tuple[str, str, str]] = []
        self._noted = 0  # changes noted so far
        self._written = 0  # of those, committed
        self._error: Exception | None = None  # why the last commit failed, if it did
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._hurry = False  # someone waits for the pending changes: commit them now
        self._changed = threading.Condition()
        self._closing = False
        self._writer = threading.Thread(target=self._write_forever, name="store-writer",
                                        daemon=True)
        self._writer.start()

    def close(self) -> None:
        """Write what is pending, then stop the writer and close the database."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._writer.join()
        with self._lock, self._read_lock:
            self._db.close()
            self._reader.close()

    def save(self, record: JobRecord, ended: bool = False) -> None:
        """Insert or replace the record (the id keeps its place in the order of arrival).
        `ended`: the job has just ended; it counts in the jobs-per-minute rollup."""
        if not ended:
            # Made into a row by the writer, and only if it is still the job's latest when
            # the batch is committed (a short job's queued record seldom is). It holds only
            # what the server made: its options as validated, no handler output yet.
            self._note(record.id, _Change(record))
            return
        # Made into a row here, so a result that cannot be stored (data JSON cannot hold)
        # fails its caller, not the writer thread.
        ended_key = rollup.key(record.owner, record.job_type, record.status,
                               record.started_at, record.finished_at)
        self._note(record.id, _Change(record, _row(record)), ended_key)

    def delete(self, job_id: str) -> None:
        """Forget the job, and its webhook delivery with it."""
        with self._changed:
            self._unplaced = [c for c in self._unplaced if c[0] != job_id]
        self._note(job_id, _Change(None))

    def add_callback(self, job_id: str, owner: str, url: str) -> None:
        """The job's callback URL (webhooks.py), written in the same commit as its record
        saved before this (none if the job is deleted first)."""
        with self._changed:
            if not self._pending:
                self._changed.notify()
            self._callbacks.append((job_id, owner, url))
            self._noted += 1

    def _note(self, job_id: str, change: _Change, ended: rollup.Key | None = None) -> None:
        with self._changed:
            if not self._pending:
                self._changed.notify()  # the writer starts its batch
            self._pending[job_id] = change
            if ended is not None:
                self._ended[ended] += 1
            self._noted += 1

    def flush(self, raise_error: bool = True) -> None:
        """Wait until every change noted before this call is committed. If the commit failed
        (a full disk), raise its error, or with `raise_error=False` return at once: a read
        can still show what is on disk."""
        with self._changed:
            target = self._noted
            self._hurry = True
            self._changed.notify_all()
            while self._written < target:
                if self._error is not None:
                    if raise_error:
                        raise self._error
                    return
                if not self._writer.is_alive():
                    raise RuntimeError("the job store's writer thread has stopped")
                self._changed.wait(1.0)

    async def written(self) -> None:
        """Like flush, without holding up the event loop."""
        loop = asyncio.get_running_loop()
        with self._changed:
            if self._written >= self._noted:
                return
            if self._error is not None:
                raise self._error
            future = loop.create_future()
            self._waiters.append((self._noted, future))
            self._hurry = True
            self._changed.notify_all()
        await future

    def _write_forever(self) -> None:
        retry = RETRY_SECONDS
        while True:
            with self._changed:
                while not (self._pending or self._callbacks) and not self._closing:
                    self._changed.wait()
                if not (self._pending or self._callbacks):
                    return  # closing, and everything is written
                deadline = time.monotonic() + BATCH_SECONDS
                while not (self._hurry or self._closing):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._changed.wait(left)
                self._hurry = False
                # Still visible to get() while it is being committed.
                batch, self._pending, self._writing = self._pending, {}, self._pending
                ended, self._ended = self._ended, Counter()
                callbacks = [*self._unplaced, *self._callbacks]
                self._callbacks, self._unplaced = [], []
                self._writing_callbacks = callbacks
                target = self._noted
            try:
                unplaced = self._commit(batch, ended, callbacks)
            except Exception as error:  # the writer must outlive any one failed commit
                log.error("could not write %d job records to %s (trying again in %g s): %s",
                          len(batch), self.location, retry, error)
                self._shrink_log()
                if isinstance(error, sqlite3.OperationalError) and "full" in str(error):
                    error = RecordsDiskFull(self.location)  # SQLITE_FULL: 507, not a bug
                with self._changed:
                    self._error = error
                    self._pending = {**batch, **self._pending}  # newer changes win
                    self._ended.update(ended)
                    self._callbacks = [*callbacks, *self._callbacks]
                    self._writing, self._writing_callbacks = {}, []
                    self._changed.notify_all()
                    ready = self._ready_waiters()
                self._tell(ready, error)
                if self._closing:
                    return
                time.sleep(retry)
                retry = min(retry * 2, RETRY_MAX_SECONDS)
                continue
            if self._error is not None:
                log.info("job records are written to %s again", self.location)
            retry = RETRY_SECONDS
            with self._changed:
                self._written = target
                self._writing, self._writing_callbacks = {}, []
                # Kept for the batch that writes their job's row; one deleted meanwhile goes.
                deleted = {job_id for job_id, change in self._pending.items()
                           if change.record is None}
                self._unplaced = [c for c in unplaced if c[0] not in deleted]
                self._error = None
                self._changed.notify_all()
                ready = self._ready_waiters()
            self._tell(ready)

    def _ready_waiters(self) -> list[asyncio.Future[None]]:
        """Futures to settle now: after a failure all of them, else those written up to."""
        if self._error is not None:
            ready, self._waiters = [f for _, f in self._waiters], []
            return ready
        ready = [future for target, future in self._waiters if target <= self._written]
        self._waiters = [(t, f) for t, f in self._waiters if t > self._written]
        return ready

    @staticmethod
    def _tell(futures: list[asyncio.Future[None]], error: Exception | None = None) -> None:
        for future in futures:
            def settle(future: asyncio.Future[None] = future) -> None:
                if not future.done():
                    if error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(error)
            try:
                future.get_loop().call_soon_threadsafe(settle)
            except RuntimeError:  # its loop is closed: nobody waits any more
                pass

    def _commit(self, batch: dict[str, _Change], ended: Counter[rollup.Key],
                callbacks: list[tuple[str, str, str]] = ()) -> list[tuple[str, str, str]]:
        """Write a batch; the callbacks whose job has no row yet (to write later)."""
        unplaced = []
        with self._lock:
            self._db.execute("BEGIN")
            try:
                # One change per job in a batch, so deletes and saves need no order between
                # them; the saves go in one executemany, not a call and a lookup each.
                saves = []
                for job_id, change in batch.items():
                    if change.record is None:
                        self._db.execute(QUERIES["delete_job"], (job_id,))
                        self._db.execute(QUERIES["delete_delivery"], (job_id,))
                    else:
                        saves.append(change.row or _row(change.record))
                self._db.executemany(QUERIES["save_job"], saves)
                for job_id, owner, url in callbacks:
                    change = batch.get(job_id)
                    if change is not None and change.record is None:
                        continue  # deleted before its row was ever written
                    if change is None and not self._db.execute(QUERIES["job_exists"],
                                                               (job_id,)).fetchone():
                        unplaced.append((job_id, owner, url))
                        continue
                    self._db.execute(QUERIES["add_delivery"], (job_id, owner, url))
                self._db.executemany(QUERIES["add_minutes"],
                                     [(*key, jobs) for key, jobs in ended.items()])
                self._db.execute("COMMIT")
                return unplaced
            except BaseException:
                # A failed COMMIT (a full disk) may have ended the transaction already; a
                # ROLLBACK then fails too, and its error would hide the one that matters.
                if self._db.in_transaction:
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error as error:
                        log.warning("rollback after a failed commit failed: %s", error)
                raise

    def _shrink_log(self) -> None:
        """After a failed commit: give the write-ahead log's space back to the disk (it holds
        nothing committed that the database lacks once checkpointed), so that retrying the
        backlog does not keep a full disk full."""
        try:
            with self._lock:
                self._db.execute(QUERIES["shrink_log"])
        except sqlite3.Error as error:
            log.warning("could not shrink %s-wal: %s", self.location, error)

    def find_idempotent(self, owner: str, key: str) -> JobRecord | None:
        with self._changed:
            for changes in (self._pending, self._writing):
                for change in changes.values():
                    record = change.record
                    if record and record.owner == owner and record.idempotency_key == key:
                        return record
        rows = self._query(QUERIES["select_idempotent"], (owner, key), flush=False)
        # A record deleted meanwhile (pending, not written yet) does not count.
        return next((r for r in rows if self.get(r.id) is not None), None)

    def get(self, job_id: str) -> JobRecord | None:
        with self._changed:
            for changes in (self._pending, self._writing):  # the newer first
                if job_id in changes:
                    return changes[job_id].record
        rows = self._query(QUERIES["select_job"], (job_id,), flush=False)
        return rows[0] if rows else None

    def known(self, job_ids: list[str]) -> set[str]:
        return {job_id for job_id in job_ids if self.get(job_id) is not None}

    def list(self, status: str | None = None, job_type: str | None = None,
             limit: int = 50, offset: int = 0, owner: str = "") -> list[JobRecord]:
        """One owner's jobs, newest first, optionally filtered by status and job type, as
        summaries: without their options, and with only the file names of their result (a
        page of jobs whose results or options are megabytes each stays small)."""
        return self._query(*list_query(QUERIES, status, job_type, limit, offset, owner))

    def unfinished(self) -> list[JobRecord]:
        """Queued and running jobs in the order they arrived."""
        return self._query(QUERIES["unfinished_jobs"])

    def finished_before(self, timestamp: float) -> list[JobRecord]:
        return self._query(QUERIES["finished_before"], (timestamp,))

    def throughput(self, owner: str, since: float) -> list[rollup.MinuteFigures]:
        """Per kind and minute since `since`: jobs that ran to an end, and their run times."""
        self.flush(raise_error=False)
        with self._read_lock:
            rows = self._reader.execute(QUERIES["select_minutes"], (owner, since)).fetchall()
        return rollup.figures(rows)

    def forget_minutes_before(self, timestamp: float) -> None:
        with self._lock:
            self._db.execute(QUERIES["forget_minutes"], (timestamp,))

    # ---- webhook deliveries (webhooks.py); call off the event loop ----

    def claim_deliveries(self, now: float, limit: int, lease: float) -> list[dict[str, Any]]:
        """Deliveries due now, each claimed for `lease` seconds (webhooks.DeliveryStore)."""
        self.flush(raise_error=False)  # the ends noted so far, to find them
        with self._lock:
            rows = self._db.execute(QUERIES["claim_deliveries"],
                                    {"now": now, "limit": limit, "until": now + lease})
            return [dict(row) for row in rows.fetchall()]

    def delivery_done(self, job_id: str, ended_at: float, status: str, attempts: int,
                      last_error: str | None, next_at: float | None, payload: str,
                      claimed_until: float | None = None) -> None:
        with self._lock:
            self._db.execute(QUERIES["delivery_done"], (status, attempts, last_error, next_at,
                                                        payload, job_id, ended_at,
                                                        claimed_until))

    def release_delivery(self, job_id: str, ended_at: float,
                         claimed_until: float | None) -> None:
        with self._lock:
            self._db.execute(QUERIES["release_delivery"], (job_id, ended_at, claimed_until))

    def delivery(self, job_id: str) -> dict[str, Any] | None:
        """The job's delivery row, if it has a callback URL."""
        with self._changed:
            noted = next((c for c in (*self._callbacks, *self._writing_callbacks,
                                      *self._unplaced) if c[0] == job_id), None)
        if noted is not None:  # not written yet
            return {"url": noted[2], "status": "pending", "attempts": 0, "last_error": None,
                    "ended_at": None}
        with self._read_lock:
            row = self._reader.execute(QUERIES["select_delivery"], (job_id,)).fetchone()
        return dict(row) if row else None

    def release_deliveries(self) -> None:
        """No claim is live as the only process that uses the store starts."""
        with self._lock:
            self._db.execute(QUERIES["release_deliveries"])

    def _query(self, sql: str, params: tuple = (), flush: bool = True) -> list[JobRecord]:
        if flush:
            self.flush(raise_error=False)
        with self._read_lock:
            rows = self._reader.execute(sql, params).fetchall()
        records = []
        for row in rows:
            values = {key: value for key, value in dict(row).items() if key in COLUMN_SET}
            for column in JSON_COLUMNS:
                values[column] = json.loads(values[column]) if values[column] else None
            values["progress"] = values["progress"] or {}
            values["earlier_errors"] = values["earlier_errors"] or []
            records.append(JobRecord(**values))
        return records
