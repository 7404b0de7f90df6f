"""The distributed mode with a frozen PostgreSQL (SIGSTOP of the server and its backends): the
kernel still holds every TCP connection open, so nothing but the replica's own clock can end a
request that waits on it. Every request answers 503 naming PostgreSQL, and the replica is back
promptly after SIGCONT with no accepted job lost."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import eventually, free_port
from deployments import deploy
from jobqueue.local.postgres import LocalPostgres
from test_contract import submit, wait_until

# A hang fails the test: without time-outs of its own a request waits for the whole freeze.
CLIENT_SECONDS = 15


def descendants(parent: int) -> list[int]:
    """Every live process under `parent` (PostgreSQL's backends and helpers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [parent]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@contextmanager
def own_postgres(prefix: str) -> Iterator[LocalPostgres]:
    """A PostgreSQL of the test's own, to stop and freeze; removed after."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    database = LocalPostgres(folder, port=free_port(), fast=True)
    try:
        database.start()
        yield database
    finally:
        database.stop()
        shutil.rmtree(folder, ignore_errors=True)


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def assert_unavailable(answer) -> None:
    assert answer.status_code == 503, answer.text
    assert "PostgreSQL" in answer.json()["detail"], answer.text
    assert int(answer.headers["Retry-After"]) > 0


def test_frozen_postgresql_answers_503_and_recovers(tmp_path):
    with own_postgres("jobqueue-pg-freeze-") as database, \
            deploy("postgres", tmp_path, database_url=database.url, workers=1,
                   message_workers=2) as cluster, \
            cluster.client(timeout=CLIENT_SECONDS) as client:
        done = submit(client, json={"data": "before", "seconds": 0})["id"]
        assert wait_until(client, done)["status"] == "succeeded"
        running = submit(client, json={"data": "across the freeze", "seconds": 2})["id"]
        wait_until(client, running, ("running",))
        # The postmaster first (it forks no new backend then), then everything under it.
        postmaster = database.process.pid
        os.kill(postmaster, signal.SIGSTOP)
        frozen = [postmaster]
        try:
            frozen += descendants(postmaster)
            signal_all(frozen[1:], signal.SIGSTOP)
            for _ in range(2):  # pooled connections first, then the ones made since
                health = client.get("/health")
                assert health.status_code == 503, health.text
                assert "postgresql" in health.json()["dependencies"]
                assert_unavailable(client.get(f"/jobs/{done}"))
                assert_unavailable(client.post("/jobs", json={"data": "frozen", "seconds": 0}))
        finally:
            signal_all(frozen, signal.SIGCONT)
        eventually(lambda: client.get("/health").status_code == 200, 60)
        after = submit(client, json={"data": "after", "seconds": 0})["id"]
        for job_id in (done, running, after):
            assert wait_until(client, job_id, seconds=90)["status"] == "succeeded"


def test_put_at_a_postgresql_stop_is_503_and_the_replica_comes_back(tmp_path):
    """A /put waiting when PostgreSQL stops gets its 503 (its wait and then its cancel each
    need the database), /health says 503 meanwhile, and once the database is back the replica
    serves again by itself."""
    with own_postgres("jobqueue-pg-restart-") as database, \
            deploy("postgres", tmp_path, database_url=database.url, workers=1,
                   message_workers=2) as cluster, \
            cluster.client(timeout=CLIENT_SECONDS) as client:
        done = submit(client, json={"data": "before", "seconds": 0})["id"]
        answers: dict[str, object] = {}

        def put() -> None:
            try:
                answers["put"] = client.post("/put", json={"data": "p", "seconds": 30})
            except Exception as error:  # a hang: the assertion below says so
                answers["put"] = error

        waiting = threading.Thread(target=put)
        waiting.start()
        eventually(lambda: client.get("/jobs", params={"status": "running"}).json()["items"],
                   30)
        database.stop()
        waiting.join(CLIENT_SECONDS + 5)
        answer = answers["put"]
        assert not isinstance(answer, Exception), answer
        assert_unavailable(answer)
        assert client.get("/health").status_code == 503
        database.start()
        eventually(lambda: client.get("/health").status_code == 200, 60)
        after = submit(client, json={"data": "after", "seconds": 0})["id"]
        for job_id in (done, after):
            assert wait_until(client, job_id, seconds=90)["status"] == "succeeded"
