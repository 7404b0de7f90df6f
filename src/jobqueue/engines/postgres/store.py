"""The distributed engine's `JobStore`: the job records in PostgreSQL's `jobqueue_jobs`, for the
callers that work on records rather than jobs (the retention sweep, the orphan sweep). Its calls
block, so they run on threads; the engine itself uses its asynchronous pool. No call waits on
the database without a bound, even a frozen one (timeouts.py): a thread is back with
Unavailable within USE_SECONDS."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import PoolTimeout

from jobqueue import rollup
from jobqueue.engines.postgres import schema, timeouts
from jobqueue.errors import Unavailable
from jobqueue.records import COLUMNS, JobRecord

POOL_TIMEOUT_SECONDS = 4.0
# A sweep's statement may read a large table: PostgreSQL ends it after STATEMENT_SECONDS; the
# connection's socket is shut after USE_SECONDS if the server answers nothing at all.
STATEMENT_SECONDS = 20.0
USE_SECONDS = 30.0


class PgJobStore:
    def __init__(self, url: str):
        self._pool = timeouts.SyncPool(url, STATEMENT_SECONDS, min_size=0, max_size=2,
                                         open=False, timeout=POOL_TIMEOUT_SECONDS)
        self._opened = False
        self._lock = threading.Lock()
        self._store: dict[str, str] | None = None
        database = conninfo_to_dict(url).get("dbname", "")
        self.location = f"the PostgreSQL database {database}"

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A connection from the pool; Unavailable (503) when PostgreSQL cannot be reached."""
        with self._lock:
            if not self._opened:
                self._pool.open(wait=False)
                self._opened = True
        try:
            with self._pool.bounded(USE_SECONDS, POOL_TIMEOUT_SECONDS) as conn:
                yield conn
        except (PoolTimeout, psycopg.OperationalError) as error:
            raise schema.unavailable(error) from None

    def _fetch(self, sql: str, args: tuple = ()) -> list[JobRecord]:
        with self._connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
            cursor.execute(sql, args)
            return [schema.from_row(row) for row in cursor.fetchall()]

    def save(self, record: JobRecord, ended: bool = False) -> None:
        updates = ", ".join(f"{column} = excluded.{column}" for column in COLUMNS
                            if column != "id")
        minute = rollup.key(record.owner, record.job_type, record.status, record.started_at,
                            record.finished_at) if ended else None
        with self._connection() as conn, conn.transaction():
            conn.execute(f"{schema.INSERT} ON CONFLICT (id) DO UPDATE SET {updates}",
                         schema.params(record))
            if minute is not None:
                conn.execute(rollup.upsert(schema.MINUTES, "%s"), (*minute, 1))
            conn.execute("SELECT pg_notify(%s, %s)", (
                schema.CHANNEL, json.dumps({"id": record.id, "owner": record.owner})))

    def delete(self, job_id: str) -> None:
        with self._connection() as conn:
            conn.execute(schema.DELETE, (job_id,))

    @property
    def store_id(self) -> str:
        return self._made()["id"]

    @property
    def created_at(self) -> float:
        return float(self._made()["created_at"])

    def _made(self) -> dict[str, str]:
        """The store's id and birth, read once (Unavailable while PostgreSQL cannot be
        reached); the tables' maker (schema.ensure) wrote them."""
        if self._store is None:
            with self._connection() as conn:
                made = dict(conn.execute("SELECT name, value FROM jobqueue_store").fetchall())
            if {"id", "created_at"} - made.keys():
                raise Unavailable("The job database has no tables yet; retry in a few seconds.")
            self._store = made
        return self._store

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._fetch("SELECT * FROM jobqueue_jobs WHERE id = %s", (job_id,))
        return rows[0] if rows else None

    def known(self, job_ids: list[str]) -> set[str]:
        with self._connection() as conn:
            rows = conn.execute("SELECT id FROM jobqueue_jobs WHERE id = ANY(%s)",
                                (job_ids,)).fetchall()
        return {row[0] for row in rows}

    def find_idempotent(self, owner: str, key: str) -> JobRecord | None:
        rows = self._fetch("SELECT * FROM jobqueue_jobs WHERE owner = %s "
                           "AND idempotency_key = %s", (owner, key))
        return rows[0] if rows else None

    def list(self, status: str | None = None, job_type: str | None = None,
             limit: int = 50, offset: int = 0, owner: str = "") -> list[JobRecord]:
        return self._fetch(*schema.list_query(status, job_type, limit, offset, owner))

    def unfinished(self) -> list[JobRecord]:
        return self._fetch("SELECT * FROM jobqueue_jobs WHERE status IN ('queued', 'running') "
                           "ORDER BY seq")

    def finished_before(self, timestamp: float) -> list[JobRecord]:
        return self._fetch("SELECT * FROM jobqueue_jobs WHERE finished_at < %s", (timestamp,))

    def forget_minutes_before(self, timestamp: float) -> None:
        with self._connection() as conn:
            conn.execute(rollup.prune(schema.MINUTES, "%s"), (timestamp,))

    async def written(self) -> None:
        return  # every call commits before it returns

    def close(self) -> None:
        if self._opened:
            self._pool.close()
