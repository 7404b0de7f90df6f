"""The distributed mode's faults that used to strand a job or run it twice: a job that ends
while PostgreSQL is stopped, and a worker draining after SIGTERM."""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

from conftest import eventually, free_port
from deployments import deploy
from jobqueue.local.postgres import LocalPostgres
from test_contract import submit, wait_until


def starts(logs: str, job_id: str) -> int:
    return logs.count(f"job {job_id}: message started on")


def test_a_job_that_ends_while_postgresql_is_stopped_keeps_its_end_and_runs_once(tmp_path):
    """Its worker holds the end until the database is back. Every heartbeat is stale then,
    the live workers' too: nobody may take the job for stranded and run it again."""
    folder = Path(tempfile.mkdtemp(prefix="jobqueue-pg-held-"))
    database = LocalPostgres(folder, port=free_port(), fast=True)
    try:
        database.start()
        with deploy("postgres", tmp_path, database_url=database.url, workers=2,
                    message_workers=1) as cluster, cluster.client(timeout=30) as client:
            job_id = submit(client, json={"data": "held", "seconds": 2})["id"]
            wait_until(client, job_id, ("running",))
            database.stop()
            # Held for longer than a worker may go without beating (8 s): its first try
            # waits for a connection for 30 s.
            eventually(lambda: f"job {job_id}: could not record its end" in cluster.logs(),
                       120)
            database.start()
            job = wait_until(client, job_id, seconds=90)
            assert job["status"] == "succeeded", job
            # Rescue rounds run every 2 s once the workers have beaten again; this job
            # waits through them.
            later = submit(client, json={"data": "later", "seconds": 14})["id"]
            assert wait_until(client, later, seconds=90)["status"] == "succeeded"
            assert client.get(f"/jobs/{job_id}").json()["status"] == "succeeded"
            logs = cluster.logs()
        assert starts(logs, job_id) == 1, logs
    finally:
        database.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_draining_worker_keeps_its_job_and_a_delete_still_reaches_it(postgres, tmp_path):
    """procrastinate stops a worker's heartbeat and abort polling before it waits for the
    running jobs (procrastinate issue #1598). Through a drain longer than the stall threshold,
    no other worker starts the job, and a DELETE still stops it at once."""
    with deploy("postgres", tmp_path, postgres, workers=1, message_workers=1,
                shutdown_grace=60) as cluster, cluster.client() as client:
        job_id = submit(client, json={"data": "long", "seconds": 120})["id"]
        wait_until(client, job_id, ("running",))
        draining = cluster.workers[0]
        cluster.start_worker()  # the other worker, idle, that must not take it
        eventually(lambda: "serves" in cluster.workers[1].log_path.read_text(), 60)
        draining.send_signal(signal.SIGTERM)
        eventually(lambda: "stopping: running jobs get" in draining.log_path.read_text())
        # Past the stall threshold: procrastinate's heartbeat of the draining worker is stale.
        url = cluster.env["JOBQUEUE_DATABASE_URL"]
        with psycopg.connect(url, autocommit=True) as conn:
            def stale() -> bool:
                row = conn.execute("SELECT count(*) FROM procrastinate_workers WHERE "
                                   "last_heartbeat < now() - interval '12 seconds'").fetchone()
                return row[0] > 0
            eventually(stale, 60)
        assert client.get(f"/jobs/{job_id}").json()["status"] == "running"
        assert draining.poll() is None  # still in its grace
        assert client.delete(f"/jobs/{job_id}").status_code == 200
        assert wait_until(client, job_id, seconds=10)["status"] == "cancelled"
        assert draining.wait(30) == 0
        logs = cluster.logs()
    assert starts(logs, job_id) == 1, logs
    assert f"job {job_id}: cancelled; stopping it" in logs


def test_two_workers_rescuing_one_stranded_job_queue_it_again_once(postgres, tmp_path):
    """Every worker looks for stranded jobs, unsynchronised: two that find the same one (its
    worker dead) give it one procrastinate job between them, not one each (two runs)."""
    from psycopg_pool import AsyncConnectionPool

    from jobqueue.engines.postgres import schema
    from jobqueue.engines.postgres.runner import Runner, schema_sql
    from jobqueue.kinds import DEFAULT_KINDS, load_kinds

    KINDS = load_kinds(DEFAULT_KINDS)
    from jobqueue.metrics import Metrics
    from jobqueue.records import COLUMNS, JobRecord, Origin
    from jobqueue.settings import Settings

    url = postgres.new_database()
    settings = Settings(database_url=url, out_dir=tmp_path / "out")
    job_id = str(uuid.uuid4())

    async def scenario() -> list[int]:
        async with AsyncConnectionPool(url, min_size=1, max_size=6, open=False) as pool:
            async with pool.connection() as conn:
                await schema.ensure(conn, schema_sql())
            runners = [Runner(settings, {"message": KINDS["message"]}, pool,
                              Metrics(["message"])) for _ in range(2)]
            for runner in runners:
                await runner.app.open_async(pool=pool)
            record = JobRecord(id=job_id, job_type="message", status="running",
                               options={"data": "x", "seconds": 0}, input_path=None,
                               created_at=time.time(), origin=Origin.JOBS)
            async with pool.connection() as conn, conn.transaction():
                await conn.execute(
                    f"INSERT INTO jobqueue_jobs ({', '.join(COLUMNS)}) "
                    f"VALUES ({', '.join(['%s'] * len(COLUMNS))})", schema.params(record))
                await conn.execute("UPDATE jobqueue_jobs SET worker_name = 'dead', "
                                   "attempt = 1, procrastinate_id = NULL WHERE id = %s",
                                   (job_id,))
            # Both found it (job id, no procrastinate job left); both rescue it at once.
            await asyncio.gather(*(runner._rescue_one(None, job_id) for runner in runners))
            async with pool.connection() as conn:
                cursor = await conn.execute(
                    "SELECT id FROM procrastinate_jobs WHERE args->>'job_id' = %s "
                    "AND status = 'todo'", (job_id,))
                queued = [row[0] for row in await cursor.fetchall()]
            for runner in runners:
                await runner.app.close_async()
                runner.executor.shutdown(wait=False)
            return queued

    queued = asyncio.run(scenario())
    assert len(queued) == 1, queued


def test_procrastinate_s_wrapped_connection_errors_are_503_not_500(postgres, tmp_path):
    """procrastinate wraps psycopg's errors (a connection terminated as PostgreSQL stops,
    in the middle of deferring a job) in its ConnectorException: still the database being
    away, a 503, never a 500 (seen as a /put in flight at a stop)."""
    import psycopg
    import pytest
    from procrastinate.exceptions import ConnectorException

    from jobqueue.engines.postgres.engine import PostgresEngine
    from jobqueue.errors import Unavailable
    from jobqueue.kinds import DEFAULT_KINDS, load_kinds

    KINDS = load_kinds(DEFAULT_KINDS)
    from jobqueue.metrics import Metrics
    from jobqueue.settings import Settings

    settings = Settings(database_url=postgres.new_database(), out_dir=tmp_path / "out")

    async def scenario() -> None:
        engine = PostgresEngine(settings, KINDS, Metrics(list(KINDS)))
        await engine.start()
        try:
            with pytest.raises(Unavailable, match="PostgreSQL"):
                async with engine._db():
                    raise ConnectorException("Database error.") from psycopg.errors.AdminShutdown(
                        "terminating connection due to administrator command")
            with pytest.raises(ConnectorException):  # any other: not taken for an outage
                async with engine._db():
                    raise ConnectorException("Database error.") from ValueError("a bug")
        finally:
            await engine.stop()

    asyncio.run(scenario())


def test_a_worker_takes_a_new_job_by_its_notify_with_polling_off(postgres, tmp_path,
                                                                  monkeypatch):
    """A job reaches an idle worker by procrastinate's LISTEN/NOTIFY (the insert trigger of
    runner.insert_queued's job), not by its poll: with the poll an hour apart, a /put job
    submitted once the worker idles still ends within seconds, and the wait for its end (the
    end-only subscriber, which skips the queued and running notifications) sees it."""
    import uuid as uuid_module

    from jobqueue.engines.base import NewJob
    from jobqueue.engines.postgres import runner
    from jobqueue.engines.postgres.engine import PostgresEngine
    from jobqueue.kinds import DEFAULT_KINDS, load_kinds
    from jobqueue.metrics import Metrics
    from jobqueue.records import Origin
    from jobqueue.settings import Settings

    monkeypatch.setattr(runner, "FETCH_POLL_SECONDS", 3600.0)
    kinds = load_kinds(DEFAULT_KINDS)
    settings = Settings(database_url=postgres.new_database(), out_dir=tmp_path / "out")
    kind = kinds["message"]

    async def scenario() -> None:
        engine = PostgresEngine(settings, kinds, Metrics(list(kinds)), with_workers=True)
        await engine.start()
        try:
            await asyncio.sleep(1.0)  # the worker has fetched nothing and waits
            for _ in range(3):
                new = NewJob(id=str(uuid_module.uuid4()), kind=kind,
                             options=kind.options.model_validate({"data": "x", "seconds": 0}),
                             input_path=None, origin=Origin.PUT)
                await engine.submit(new, durable=False)
                # With the poll an hour apart, only the NOTIFY can start it within the wait
                # (a TimeoutError otherwise): a state waited for, not a time asserted.
                record = await engine.wait(new.id, 120)
                assert record.status == "succeeded", record
                await asyncio.sleep(0.5)  # idle again between jobs
        finally:
            await engine.stop()

    asyncio.run(scenario())
