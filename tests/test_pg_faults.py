"""The distributed mode's faults that used to strand a job or run it twice: a job that ends
while PostgreSQL is stopped, and a worker draining after SIGTERM."""

from __future__ import annotations

import shutil
import signal
import tempfile
from pathlib import Path

import psycopg

from conftest import eventually, free_port
from deployments import deploy
from jobqueue.localpg import LocalPostgres
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
