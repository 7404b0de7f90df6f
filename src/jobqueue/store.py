"""Job records in SQLite, so accepted jobs survive a restart.

`JobStore` is the whole interface the server uses; a shared store (Postgres, Redis) can replace
it by offering the same methods. Every call is one short statement on a WAL database
(tens of microseconds), so callers on the event loop may use it directly.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    job_type TEXT NOT NULL,
    status TEXT NOT NULL,
    options TEXT NOT NULL,
    input_path TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    worker_name TEXT,
    progress TEXT,
    error TEXT,
    bad_input INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    origin TEXT NOT NULL DEFAULT 'jobs',
    owner TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""
# Columns added after the first release, for databases made before them.
ADDED_COLUMNS = {"owner": "TEXT NOT NULL DEFAULT ''"}
JSON_COLUMNS = ("options", "progress", "result")


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
    bad_input: bool = False
    result: dict[str, Any] | None = None
    origin: str = "jobs"  # "put" when a client waited on /put for it
    owner: str = ""  # which API key submitted it (a hash of it), "" without API keys


class JobStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            present = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
            for column, definition in ADDED_COLUMNS.items():
                if column not in present:
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {definition}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def save(self, record: JobRecord) -> None:
        """Insert or replace the record (the id keeps its place in the order of arrival)."""
        row = asdict(record)
        for column in JSON_COLUMNS:
            row[column] = json.dumps(row[column])
        columns = ", ".join(row)
        updates = ", ".join(f"{c} = excluded.{c}" for c in row if c != "id")
        with self._lock:
            self._db.execute(
                f"INSERT INTO jobs ({columns}) VALUES ({', '.join('?' * len(row))}) "
                f"ON CONFLICT(id) DO UPDATE SET {updates}",
                tuple(row.values()),
            )

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    def list(self, status: str | None = None, job_type: str | None = None,
             limit: int = 50, offset: int = 0, owner: str = "") -> list[JobRecord]:
        """One owner's jobs, newest first, optionally filtered by status and job type."""
        where, params = ["owner = ?"], [owner]
        if status:
            where.append("status = ?")
            params.append(status)
        if job_type:
            where.append("job_type = ?")
            params.append(job_type)
        sql = "SELECT * FROM jobs WHERE " + " AND ".join(where)
        return self._query(sql + " ORDER BY seq DESC LIMIT ? OFFSET ?", (*params, limit, offset))

    def unfinished(self) -> list[JobRecord]:
        """Queued and running jobs in the order they arrived."""
        return self._query("SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY seq")

    def finished_before(self, timestamp: float) -> list[JobRecord]:
        return self._query("SELECT * FROM jobs WHERE finished_at < ?", (timestamp,))

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def _query(self, sql: str, params: tuple = ()) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        records = []
        for row in rows:
            values = dict(row)
            values.pop("seq")
            for column in JSON_COLUMNS:
                values[column] = json.loads(values[column]) if values[column] else None
            values["progress"] = values["progress"] or {}
            values["bad_input"] = bool(values["bad_input"])
            records.append(JobRecord(**values))
        return records
