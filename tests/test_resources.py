"""A kind's resource (JobKind setup and teardown), on both engines: made once per process that
runs the kind's jobs, on a thread while the server already answers; shared by every job of the
kind there; its jobs wait while it loads; a failed setup shows in /health, refuses new jobs of
its kind with 503 and is tried again; torn down at shutdown. The kinds are
tests/kinds/resourceful.py's; their setups wait for files the tests create, so every test waits
for states, never for a time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import eventually, wait_finished
from deployments import ENGINES, Deployment, deploy

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


@pytest.mark.parametrize("engine", ENGINES)
def test_jobs_wait_while_their_kind_loads_and_run_once_it_is_ready(request, engine, tmp_path):
    with serving(request, engine, tmp_path, f"message,{SLOW}", slow_timeout=1) as deployment:
        with deployment.client() as client:
            # The server answers while the setup waits, and says the kind is loading.
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
