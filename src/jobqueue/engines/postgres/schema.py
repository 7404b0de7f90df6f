"""What the distributed engine keeps in PostgreSQL, beside procrastinate's own tables.

`jobqueue_jobs` holds the job records (the same fields as the embedded engine's SQLite table,
and what a cancel said it was, for the worker's metrics); a record and its procrastinate job
are written in one transaction. `jobqueue_workers` holds a heartbeat per worker process, with
the kinds it serves, how many of each at once, the state of its resource of each (the kind's
setup: ready, loading, failed) and where its metrics are: the cluster's live workers, for
/health, the dashboard and the refusal of a kind no worker could set up. `jobqueue_minutes`
counts the jobs that ran to an end per owner, kind, minute and run time (rollup.py), for the
dashboard's chart. Every change of a record is announced with NOTIFY (queries.sql's `notify`),
in the transaction that makes it. The tables are made in schema.sql; every query on them is in
queries.sql, by name (sql.py).
"""

from __future__ import annotations

import json
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from jobqueue import sql
from jobqueue.errors import Unavailable
from jobqueue.jobs import JobStatus
from jobqueue.records import COLUMNS, JobRecord

# Every statement the engine sends, by name: the tables in schema.sql, the rest in queries.sql.
QUERIES = sql.load(__package__, "schema.sql", "queries.sql")
# Taken while the schema is made, so replicas and workers starting together make it once.
SCHEMA_LOCK = 7357_0001
JSON_FIELDS = ("options", "progress", "result", "earlier_errors")
# procrastinate fetches a queue's jobs by `priority DESC, id ASC`; a job's priority there
# encodes its place in lifecycle.dispatch_order (procrastinate_priority). The rounds it can
# tell apart, either side of zero: far more than any queue holds.
ROUND_SPAN = 100_000_000
ROUND_LIMIT = ROUND_SPAN // 2 - 1


def procrastinate_priority(priority: int, fair_round: int) -> int:
    """The procrastinate priority that makes its fetch order lifecycle.dispatch_order: higher
    priority first, then the lower fair round (then the earlier procrastinate job, which is
    near enough the earlier submission). Within int4, the column's type: the priority is
    -10…10 (settings.MIN_PRIORITY, MAX_PRIORITY), so at most about ±1.05e9; a round past
    ±ROUND_LIMIT (never in practice) counts as that limit."""
    return priority * ROUND_SPAN - max(-ROUND_LIMIT, min(ROUND_LIMIT, fair_round))


async def ensure(conn: AsyncConnection, procrastinate_schema: str) -> None:
    """Make procrastinate's schema and ours, once, whoever starts first."""
    async with conn.transaction():
        await conn.execute(QUERIES["lock_schema"], (SCHEMA_LOCK,))
        cursor = await conn.execute(QUERIES["procrastinate_installed"])
        if not (await cursor.fetchone())[0]:
            await conn.execute(procrastinate_schema)
        await conn.execute(QUERIES["make_tables"])


def params(record: JobRecord) -> list[Any]:
    """The record as insert_queued's parameters: records.COLUMNS, in order."""
    return [Jsonb(getattr(record, column)) if column in JSON_FIELDS
            else record.origin.value if column == "origin"
            else getattr(record, column) for column in COLUMNS]


def from_row(row: dict[str, Any]) -> JobRecord:
    values = {column: row[column] for column in COLUMNS}
    values["progress"] = values["progress"] or {}
    values["earlier_errors"] = values["earlier_errors"] or []
    return JobRecord(**values)


async def fetch(conn: AsyncConnection, sql: str, args: tuple = ()) -> list[JobRecord]:
    async with conn.cursor(row_factory=dict_row) as cursor:
        await cursor.execute(sql, args)
        return [from_row(row) for row in await cursor.fetchall()]


async def notify(conn: AsyncConnection, job_id: str, owner: str, removed: bool = False,
                 status: JobStatus | None = None) -> None:
    """Tell every replica the job changed (sent when the transaction commits). A `status`
    that is not an end lets a replica waiting for the job's end skip reading it (only where
    the sender knows it for sure: without one, the waiter reads the record)."""
    change: dict[str, Any] = {"id": job_id, "owner": owner, "removed": removed}
    if status is not None:
        change["status"] = status.value
    payload = json.dumps(change)
    await conn.execute(QUERIES["notify"], (payload,))


def unavailable(error: BaseException) -> Unavailable:
    """The 503 for a database that cannot be reached, with the first line of why."""
    lines = str(error).strip().splitlines()
    return Unavailable(f"The database (PostgreSQL) cannot be reached "
                       f"({lines[0] if lines else type(error).__name__}); retry in a few seconds.")
