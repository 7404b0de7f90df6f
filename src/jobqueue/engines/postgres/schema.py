"""What the distributed engine keeps in PostgreSQL, beside procrastinate's own tables.

`jobqueue_jobs` holds the job records (the same fields as the embedded engine's SQLite table,
and what a cancel said it was, for the worker's metrics); a record and its procrastinate job
are written in one transaction. `jobqueue_workers` holds a heartbeat per worker process, with
the kinds it serves, how many of each at once and where its metrics are: the cluster's live
workers, for /health and the dashboard. `jobqueue_minutes` counts the jobs that ran to an end
per owner, kind, minute and run time (rollup.py), for the dashboard's chart. Every change of a
record is announced with NOTIFY on CHANNEL, in the transaction that makes it.
"""

from __future__ import annotations

import json
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from jobqueue import rollup
from jobqueue.errors import Unavailable
from jobqueue.records import COLUMNS, JobRecord, list_filter

CHANNEL = "jobqueue_jobs"
# Taken while the schema is made, so replicas and workers starting together make it once.
SCHEMA_LOCK = 7357_0001

MINUTES = "jobqueue_minutes"  # the jobs-per-minute rollup (rollup.py)
TABLES = """
CREATE TABLE IF NOT EXISTS jobqueue_jobs (
    seq bigserial UNIQUE,
    id text PRIMARY KEY,
    job_type text NOT NULL,
    status text NOT NULL,
    options jsonb NOT NULL,
    input_path text,
    created_at double precision NOT NULL,
    started_at double precision,
    finished_at double precision,
    worker_name text,
    progress jsonb NOT NULL DEFAULT '{}',
    error text,
    error_kind text,
    result jsonb,
    origin text NOT NULL,
    owner text NOT NULL DEFAULT '',
    attempt integer NOT NULL DEFAULT 0,
    idempotency_key text,
    procrastinate_id bigint,
    cancelled_as text
);
CREATE INDEX IF NOT EXISTS jobqueue_jobs_waiting ON jobqueue_jobs (job_type, status, seq);
CREATE INDEX IF NOT EXISTS jobqueue_jobs_listing ON jobqueue_jobs (owner, seq);
CREATE INDEX IF NOT EXISTS jobqueue_jobs_procrastinate ON jobqueue_jobs (procrastinate_id);
CREATE UNIQUE INDEX IF NOT EXISTS jobqueue_jobs_idempotency
    ON jobqueue_jobs (owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS jobqueue_workers (
    name text PRIMARY KEY,
    kinds jsonb NOT NULL,
    heartbeat double precision NOT NULL,
    metrics text
);
""" + rollup.table_sql(MINUTES, "bigint") + """
-- The store's own id (records.JobStore.store_id), made once by whoever makes the tables.
CREATE TABLE IF NOT EXISTS jobqueue_store (name text PRIMARY KEY, value text NOT NULL);
INSERT INTO jobqueue_store VALUES ('id', gen_random_uuid()::text),
    ('created_at', extract(epoch FROM clock_timestamp())::text) ON CONFLICT DO NOTHING;
-- Columns added since the first tables were made.
ALTER TABLE jobqueue_jobs ADD COLUMN IF NOT EXISTS cancelled_as text;
ALTER TABLE jobqueue_workers ADD COLUMN IF NOT EXISTS metrics text;
"""

JSON_FIELDS = ("options", "progress", "result")
SUMMARY_COLUMNS = ", ".join(
    "'{}'::jsonb AS options" if column == "options" else
    "CASE WHEN jsonb_typeof(result) = 'object' "
    "THEN jsonb_build_object('files', result -> 'files') END AS result" if column == "result" else
    column for column in COLUMNS)
# A record and its procrastinate job if that has ended (workers delete theirs as they finish
# them; this catches one a worker died with). A job still to do or running stays for its
# worker, which finds no record and lets it go.
DELETE = ("WITH gone AS (DELETE FROM jobqueue_jobs WHERE id = %s "
          "RETURNING owner, procrastinate_id), "
          "queue AS (DELETE FROM procrastinate_jobs WHERE id IN "
          "(SELECT procrastinate_id FROM gone) AND status NOT IN ('todo', 'doing')) "
          "SELECT owner FROM gone")
# Jobs of `kinds` that nothing will bring to an end: running (since before `started`) on a
# worker whose heartbeat is `stalled` seconds old by the database's clock (or gone), running
# here (`me`) on no run of this process (`mine`), or queued with no procrastinate job left to
# run them (its abort came before its claim).
STRANDED = """
SELECT j.id, j.procrastinate_id FROM jobqueue_jobs j
WHERE j.job_type = ANY(%(kinds)s) AND (
    (j.status = 'running' AND j.started_at < %(started)s AND (
        j.worker_name = %(me)s AND NOT j.id = ANY(%(mine)s)
        OR NOT EXISTS (SELECT 1 FROM jobqueue_workers w WHERE w.name = j.worker_name
                       AND w.heartbeat >= extract(epoch FROM now()) - %(stalled)s)))
    OR (j.status = 'queued' AND NOT EXISTS (
        SELECT 1 FROM procrastinate_jobs p
        WHERE p.id = j.procrastinate_id AND p.status IN ('todo', 'doing'))))
"""
INSERT = (f"INSERT INTO jobqueue_jobs ({', '.join(COLUMNS)}) "
          f"VALUES ({', '.join('%s' for _ in COLUMNS)})")


def list_query(status: str | None, job_type: str | None, limit: int, offset: int,
               owner: str) -> tuple[str, tuple]:
    """SELECT of one owner's job summaries, newest first, filtered and paged."""
    where, args = list_filter(status, job_type, owner, "%s")
    return (f"SELECT {SUMMARY_COLUMNS} FROM jobqueue_jobs WHERE {where} "
            "ORDER BY seq DESC LIMIT %s OFFSET %s", (*args, limit, offset))


async def ensure(conn: AsyncConnection, procrastinate_schema: str) -> None:
    """Make procrastinate's schema and ours, once, whoever starts first."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        cursor = await conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")
        if not (await cursor.fetchone())[0]:
            await conn.execute(procrastinate_schema)
        await conn.execute(TABLES)


def params(record: JobRecord) -> list[Any]:
    """The record as INSERT's parameters."""
    return [Jsonb(getattr(record, column)) if column in JSON_FIELDS
            else record.origin.value if column == "origin"
            else getattr(record, column) for column in COLUMNS]


def from_row(row: dict[str, Any]) -> JobRecord:
    values = {column: row[column] for column in COLUMNS}
    values["progress"] = values["progress"] or {}
    return JobRecord(**values)


async def fetch(conn: AsyncConnection, sql: str, args: tuple = ()) -> list[JobRecord]:
    async with conn.cursor(row_factory=dict_row) as cursor:
        await cursor.execute(sql, args)
        return [from_row(row) for row in await cursor.fetchall()]


async def notify(conn: AsyncConnection, job_id: str, owner: str, removed: bool = False) -> None:
    """Tell every replica the job changed (sent when the transaction commits)."""
    payload = json.dumps({"id": job_id, "owner": owner, "removed": removed})
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


def unavailable(error: BaseException) -> Unavailable:
    """The 503 for a database that cannot be reached, with the first line of why."""
    lines = str(error).strip().splitlines()
    return Unavailable(f"The database (PostgreSQL) cannot be reached "
                       f"({lines[0] if lines else type(error).__name__}); retry in a few seconds.")
