"""A kind's resource (JobKind setup and teardown), on both engines: made once per process that
runs the kind's jobs, on a thread while the server already answers; shared by every job of the
kind there; its jobs wait while it loads; a failed setup shows in /health, refuses new jobs of
its kind with 503 and is tried again; torn down at shutdown. The kinds are
tests/kinds/resourceful.py's; their setups wait for files the tests create, so every test waits
for states, never for a time."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from pydantic import BaseModel

from conftest import Server, eventually, free_port, wait_finished
from deployments import ENGINES, Deployment, deploy
from jobqueue.engines.postgres import schema
from jobqueue.engines.postgres.engine import cluster_status, worker_status
from jobqueue.engines.postgres.runner import schema_sql
from jobqueue.errors import SetupFailed
from jobqueue.jobs import JobKind, Output
from jobqueue.local import cluster
from jobqueue.resources import (
    SETUP_FIRST_RETRY_SECONDS,
    SETUP_MAX_RETRY_SECONDS,
    Resource,
    State,
    Status,
)

COUNTED, SLOW, FLAKY = "resourceful:COUNTED", "resourceful:SLOW", "resourceful:FLAKY"


@contextlib.contextmanager
def serving(request, engine: str, folder: Path, kinds: str, **settings) -> Iterator[Deployment]:
    """The embedded server, or a replica and a worker process, serving `kinds`."""
    postgres = request.getfixturevalue("postgres") if engine == "postgres" else None
    with deploy(engine, folder, postgres, kinds=kinds, **settings) as deployment:
        yield deployment


def files(deployment: Deployment) -> Path:
    """Where the resourceful kinds keep their files (resourceful.folder)."""
    return deployment.out_dir / "resourceful"


def queue(client: httpx.Client, kind: str) -> dict:
    return client.get("/health").json()["queues"][kind]


def state_is(client: httpx.Client, kind: str, state: str) -> bool:
    return queue(client, kind)["state"] == state


def submit(client: httpx.Client, kind: str, text: str = "") -> str:
    answer = client.post("/jobs", json={"jobType": kind, "text": text})
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def succeeded(client: httpx.Client, job_id: str) -> dict:
    """The job's result data, once it has succeeded."""
    job = wait_finished(client, job_id)
    assert job["status"] == "succeeded", job
    return job["result"]["data"]


@pytest.mark.parametrize("engine", ENGINES)
def test_setup_runs_once_per_process_and_every_job_shares_its_resource(request, engine,
                                                                       tmp_path):
    with serving(request, engine, tmp_path, f"message,{COUNTED}") as deployment:
        with deployment.client() as client:
            assert queue(client, "message")["state"] == "ready"  # no setup: ready at once
            eventually(lambda: state_is(client, "counted", "ready"))
            ids = [submit(client, "counted", str(n)) for n in range(12)]
            answers = [succeeded(client, job_id) for job_id in ids]
            put = client.post("/put", json={"jobType": "counted", "text": "put"})
            assert put.status_code == 200, put.text
            answers.append(put.json()["data"]["result"]["data"])
        (pid,) = {process.pid for process in deployment.job_processes()}
    assert {(a["pid"], a["setups"], a["token"]) for a in answers} == \
        {(pid, 1, answers[0]["token"])}
    assert sorted(a["job"] for a in answers) == list(range(1, 14))  # one resource, mutated
    assert files(deployment).joinpath("setups").read_text().split() == [str(answers[0]["pid"])]
    # Torn down at shutdown, after its jobs: it saw all of them.
    assert files(deployment).joinpath(f"teardown-{answers[0]['pid']}").read_text() == "13"


def test_each_worker_process_sets_up_its_own_and_an_api_replica_none(postgres, tmp_path):
    with deploy("postgres", tmp_path, postgres, workers=2, kinds=COUNTED,
                counted_workers=1) as deployment:
        with deployment.client() as client:
            eventually(lambda: state_is(client, "counted", "ready"))
            eventually(lambda: len(client.get("/health").json()["workerProcesses"]) == 2)
            eventually(lambda: all(
                process["states"] == {"counted": {"state": "ready"}}
                for process in client.get("/health").json()["workerProcesses"]))
            # Enough jobs at once that both workers take some (each runs one at a time).
            answers: list[dict] = []
            while len({a["pid"] for a in answers}) < 2:
                assert len(answers) < 400, "one worker took every job"
                ids = [submit(client, "counted") for _ in range(20)]
                answers += [succeeded(client, job_id) for job_id in ids]
        workers = {worker.pid for worker in deployment.workers}
    # One setup in each worker, none in the API replica (it runs no jobs).
    setups = files(deployment).joinpath("setups").read_text().split()
    assert sorted(map(int, setups)) == sorted(workers)
    by_pid = {a["pid"]: (a["setups"], a["token"]) for a in answers}
    assert set(by_pid) == workers
    assert len({(a["pid"], a["token"]) for a in answers}) == 2  # one resource per process
    assert all(setups == 1 for setups, _ in by_pid.values())
    for pid in workers:
        assert files(deployment).joinpath(f"teardown-{pid}").exists()


def test_a_replica_started_with_workers_sets_up_its_kinds_and_one_without_none(postgres,
                                                                             tmp_path):
    with deploy("postgres", tmp_path, postgres, workers=0, kinds=COUNTED) as deployment:
        port = free_port()
        url, log_path = f"http://127.0.0.1:{port}", tmp_path / "with-workers.log"
        process = cluster.start_replica(deployment.env, port, log_path, with_workers=True)
        deployment.replicas.append(Server(url, process, deployment.out_dir, log_path))
        cluster.wait_ready(url, process, log_path)
        with deployment.client(0) as client:  # the replica without workers
            eventually(lambda: state_is(client, "counted", "ready"))
            answer = succeeded(client, submit(client, "counted"))
            # The replica's workers have no metrics port of their own (its /metrics has
            # them): left out, not null, as the Health model documents.
            health = client.get("/health")
            (worker,) = health.json()["workerProcesses"]
            assert "metrics" not in worker and "null" not in health.text, health.text
    assert answer["pid"] == process.pid and answer["setups"] == 1
    assert files(deployment).joinpath("setups").read_text().split() == [str(process.pid)]
    assert files(deployment).joinpath(f"teardown-{process.pid}").read_text() == "1"


@pytest.mark.parametrize("engine", ENGINES)
def test_jobs_wait_while_their_kind_loads_and_run_once_it_is_ready(request, engine, tmp_path):
    with serving(request, engine, tmp_path, f"message,{SLOW}", slow_timeout=1) as deployment:
        with deployment.client() as client:
            # The server answers while the setup waits, and says the kind is loading (once a
            # distributed worker's first heartbeat has said so).
            eventually(lambda: state_is(client, "slow", "loading"))
            health = client.get("/health")
            assert health.status_code == 200 and health.json()["status"] == "ok"
            assert health.json()["queues"]["slow"]["state"] == "loading"
            assert "error" not in health.json()["queues"]["slow"]
            waiting = [submit(client, "slow", str(n)) for n in range(3)]
            # The other kinds run meanwhile.
            done = client.post("/put", json={"jobType": "message", "data": "hi", "seconds": 0})
            assert done.status_code == 200, done.text
            eventually(lambda: queue(client, "slow")["queued"] == 3)
            for job_id in waiting:
                assert client.get(f"/jobs/{job_id}").json()["status"] == "queued"
            # A /put waits as long as its kind's timeout, then 504 as ever (and its job goes).
            late = client.post("/put", json={"jobType": "slow"})
            assert late.status_code == 504, late.text
            files(deployment).joinpath("release").touch()
            eventually(lambda: state_is(client, "slow", "ready"))
            for job_id in waiting:
                assert succeeded(client, job_id)["resource"] == "released"
            assert queue(client, "slow")["queued"] == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_a_failed_setup_refuses_its_kind_and_is_tried_again(request, engine, tmp_path):
    with serving(request, engine, tmp_path, f"message,{FLAKY}") as deployment:
        with deployment.client() as client:
            tries = files(deployment) / "tries"
            eventually(lambda: tries.exists())
            waiting = submit(client, "flaky", "early")  # accepted while it loads
            files(deployment).joinpath("go").touch()
            eventually(lambda: state_is(client, "flaky", "failed"))
            health = client.get("/health")
            assert health.status_code == 200, "a load balancer keeps this server"
            assert health.json()["status"] == "degraded"
            assert health.json()["queues"]["flaky"]["error"] == "OSError: model.bin not found"
            assert health.json()["queues"]["message"]["state"] == "ready"
            if engine == "postgres":
                (process,) = health.json()["workerProcesses"]
                assert process["states"]["flaky"] == {
                    "state": "failed", "error": "OSError: model.bin not found"}
            # New jobs of it are refused, naming the kind and the error; the others run.
            for path in ("/jobs", "/put"):
                refused = client.post(path, json={"jobType": "flaky"})
                assert refused.status_code == 503, refused.text
                detail = refused.json()["detail"]
                assert "flaky" in detail and "OSError: model.bin not found" in detail
                assert 1 <= int(refused.headers["Retry-After"]) <= 60
            done = client.post("/put", json={"jobType": "message", "seconds": 0})
            assert done.status_code == 200, done.text
            # The job accepted before still waits.
            assert client.get(f"/jobs/{waiting}").json()["status"] == "queued"
            files(deployment).joinpath("fixed").touch()
            eventually(lambda: state_is(client, "flaky", "ready"))
            assert len(tries.read_text().split()) >= 2
            assert "error" not in queue(client, "flaky")
            assert client.get("/health").json()["status"] == "ok"
            assert succeeded(client, waiting)["resource"] == "fixed"
            assert succeeded(client, submit(client, "flaky"))["resource"] == "fixed"


# ---- in this process: the back-off, teardown, the distributed states -------------------------

class NoOptions(BaseModel):
    pass


def kind_with(setup=None, teardown=None) -> JobKind:
    return JobKind("k", "a kind with a setup", NoOptions, lambda job: Output(data={}),
                   setup=setup, teardown=teardown)


class Waits:
    """Stands in for a Resource's shutdown event: notes each wait between tries, never waits;
    with `tries`, the shutdown comes after that many."""

    def __init__(self, tries: int | None = None) -> None:
        self.waits: list[float] = []
        self.closed = False
        self.tries = tries

    def is_set(self) -> bool:
        return self.closed

    def set(self) -> None:
        self.closed = True

    def wait(self, seconds: float | None = None) -> bool:
        self.waits.append(seconds)
        return self.closed or len(self.waits) == self.tries


def test_a_failing_setup_is_tried_again_after_1_s_doubling_to_60_s():
    seen: list[Status] = []

    def setup(settings) -> str:
        seen.append(resource.status())
        if len(seen) < 10:
            raise RuntimeError(f"try {len(seen)}")
        return "up"

    changes: list[State] = []
    resource = Resource(kind_with(setup), None, lambda: changes.append(resource.status().state))
    resource._closed = Waits()
    assert resource.status() == Status(State.LOADING)
    resource._load()  # on this thread: the same loop the setup thread runs
    assert resource._closed.waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert (SETUP_FIRST_RETRY_SECONDS, SETUP_MAX_RETRY_SECONDS) == (1, 60)
    # Failed (with the last try's error) from the first failure until a try succeeds.
    assert seen[0].state is State.LOADING
    assert [status.error for status in seen[1:]] == [f"RuntimeError: try {n}"
                                                     for n in range(1, 10)]
    assert {status.state for status in seen[1:]} == {State.FAILED}
    assert changes == [State.FAILED] * 9 + [State.READY]
    assert resource.ready and resource.value == "up" and resource.status().error is None


def test_a_failed_kind_refuses_with_the_time_to_its_next_try():
    resource = Resource(kind_with(lambda settings: 1 / 0), None)
    resource._closed = Waits(tries=1)
    resource._load()
    with pytest.raises(SetupFailed) as refused:
        resource.check()
    assert refused.value.kind == "k" and refused.value.error == "ZeroDivisionError: " \
        "division by zero"
    assert str(refused.value).startswith("k jobs cannot run now: the kind's setup failed "
                                         "(ZeroDivisionError: division by zero)")
    assert refused.value.retry_after == 1  # the first retry is 1 s away at most
    assert Resource(kind_with(), None).status() == Status(State.READY)  # no setup: ready


def test_a_teardown_that_raises_is_logged_and_the_shutdown_goes_on(caplog):
    def teardown(resource) -> None:
        raise RuntimeError(f"could not free {resource}")

    resource = Resource(kind_with(lambda settings: "the model", teardown), None)
    resource._load()
    resource.teardown()
    resource.teardown()  # once only
    assert caplog.text.count("k: teardown failed") == 1
    assert "could not free the model" in caplog.text


def test_a_setup_still_running_at_shutdown_is_not_waited_for_and_tears_down_itself():
    release, torn_down = threading.Event(), threading.Event()
    torn: list[str] = []

    def setup(settings) -> str:
        release.wait(30)
        return "late"

    def teardown(resource) -> None:
        torn.append(resource)
        torn_down.set()

    resource = Resource(kind_with(setup, teardown), None)
    resource.start()
    resource.teardown()  # returns at once: nothing is ready to tear down yet
    assert not resource.wait_ready()  # a worker slot waiting for it stops waiting
    assert torn == []
    release.set()
    assert torn_down.wait(30)
    assert torn == ["late"] and not resource.ready


def test_a_replica_reads_a_kind_ready_if_any_worker_has_it():
    ready, loading = Status(State.READY), Status(State.LOADING)
    failed = [Status(State.FAILED, "OSError: a", 3.0), Status(State.FAILED, "OSError: b", 1.5)]
    assert cluster_status([]) == ready  # nobody serves it: nothing is wrong with a resource
    assert cluster_status([failed[0], loading, ready]) == ready
    assert cluster_status([failed[0], loading]) == loading
    assert cluster_status(failed) == Status(State.FAILED, "OSError: a", 1.5)
    # As the heartbeats tell it: none (a worker of before states), a retry counted from now.
    assert worker_status(None) == worker_status({}) == ready
    assert worker_status({"state": "later"}) == ready
    assert worker_status({"state": "failed", "error": "E: x", "retryIn": 5}, age=2) == \
        Status(State.FAILED, "E: x", 3)


def test_a_database_made_before_states_gets_them_and_its_workers_count_as_ready(postgres):
    url = postgres.new_database()

    async def scenario() -> Any:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await schema.ensure(conn, schema_sql())
            await conn.execute("ALTER TABLE jobqueue_workers DROP COLUMN states")  # as before
            await conn.execute("INSERT INTO jobqueue_workers (name, kinds, heartbeat) VALUES "
                               "('old-1', '{\"message\": 1}', extract(epoch FROM now()))")
            await schema.ensure(conn, schema_sql())  # a replica or worker of now starts
            cursor = await conn.execute("SELECT kinds, states FROM jobqueue_workers")
            return await cursor.fetchall()

    ((kinds, states),) = asyncio.run(scenario())
    assert kinds == {"message": 1} and states == {}
    assert worker_status(states.get("message")) == Status(State.READY)


def test_no_teardown_while_a_handler_still_runs(tmp_path):
    """A handler that ignores its cancel still holds the resource when the embedded server
    stops (it gives up waiting for its thread): freeing the resource under the handler could
    crash it, so the teardown is skipped, and logged. (A distributed worker waits for its
    stopped handlers before its teardowns.)"""
    with deploy("embedded", tmp_path, kinds="message,resourceful:STUBBORN") as deployment:
        with deployment.client() as client:
            submit(client, "stubborn")
            eventually(lambda: files(deployment).joinpath("stubborn-started").exists())
        process = deployment.server.process
        process.send_signal(signal.SIGINT)
        eventually(lambda: "the stubborn teardown is skipped"
                   in deployment.server.log_path.read_text())
        files(deployment).joinpath("release-stubborn").write_text("")
        process.wait(60)
    assert not files(deployment).joinpath("teardown-stubborn").exists()
