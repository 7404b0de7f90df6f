"""Engines: what runs jobs. Routes use one by job id through the `JobEngine` facade (base.py);
`embedded` runs jobs on threads in the server's own process, `postgres` hands them to worker
processes through PostgreSQL (procrastinate)."""

from __future__ import annotations

from jobqueue.engines.base import JobEngine, NewJob, RecordChanges
from jobqueue.jobs import JobKind
from jobqueue.metrics import Metrics
from jobqueue.settings import Settings

__all__ = ["JobEngine", "NewJob", "RecordChanges", "make_engine"]


def make_engine(settings: Settings, kinds: dict[str, JobKind], metrics: Metrics,
                with_workers: bool = True) -> JobEngine:
    """The engine the settings ask for: PostgreSQL with JOBQUEUE_DATABASE_URL, else embedded.
    It counts the jobs it starts and ends in `metrics`."""
    if settings.database_url.get_secret_value():
        from jobqueue.engines.postgres.engine import PostgresEngine

        return PostgresEngine(settings, kinds, metrics, with_workers=with_workers)
    from jobqueue.engines.embedded.engine import EmbeddedEngine

    return EmbeddedEngine(settings, kinds, metrics)
