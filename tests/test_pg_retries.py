"""The distributed engine's retries, client retries, fair share, the per-key cap and the hand-
over of a /put job, against a real PostgreSQL: a replica and a worker process serving
tests/kinds/flaky.py's kinds. The kinds count their attempts in files, so a test waits for
states and never for a time."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from conftest import eventually, wait_finished
from deployments import Deployment, deploy

KINDS = "flaky:FLAKY,flaky:LATER,flaky:BATCHED,flaky:GATED"
KEYS = ("key-a", "key-b")
CAP = 25  # JOBQUEUE_MAX_QUEUED_PER_KEY: more than the fair-share test queues


@pytest.fixture(scope="module")
def deployment(request, tmp_path_factory) -> Deployment:
    postgres = request.getfixturevalue("postgres")
    with deploy("postgres", tmp_path_factory.mktemp("pg-retries"), postgres, kinds=KINDS,
                api_keys=",".join(KEYS), max_queued_per_key=CAP) as deployment:
        yield deployment


@pytest.fixture
def client(deployment) -> httpx.Client:
    with deployment.client(headers={"X-API-Key": KEYS[0]}) as client:
        yield client


def submit(client: httpx.Client, kind: str, **options) -> str:
    answer = client.post("/jobs", json={"jobType": kind, **options})
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def tag() -> str:
    return uuid.uuid4().hex


def open_gate(deployment: Deployment, gate: str) -> None:
    folder = deployment.out_dir / "flaky"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / gate).touch()


@pytest.mark.parametrize("kind", ["flaky", "flakybatch"])
def test_a_job_that_fails_twice_then_succeeds_ends_succeeded_at_its_third_attempt(client,
                                                                                   kind):
    job = wait_finished(client, submit(client, kind, tag=tag(), fail_times=2))
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 3
    assert job["result"]["data"] == {"attempts": 3}
    errors = job["earlierErrors"]
    assert [error["attempt"] for error in errors] == [1, 2]
    assert all(error["error"] for error in errors)


def test_a_job_that_always_fails_ends_failed_after_its_kinds_attempts(client):
    job = wait_finished(client, submit(client, "flaky", tag=tag(), fail_times=100))
    assert job["status"] == "failed", job
    assert job["attempt"] == 3
    assert len(job["earlierErrors"]) == 2


def test_bad_input_is_never_retried(client):
    job = wait_finished(client, submit(client, "flaky", tag=tag(), bad=True))
    assert job["status"] == "failed", job
    assert job["attempt"] == 1
    assert not job.get("earlierErrors")


def test_retry_later_is_retried_on_a_kind_without_a_retry_of_its_own(client):
    job = wait_finished(client, submit(client, "later", tag=tag(), fail_times=2))
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 3
    assert len(job["earlierErrors"]) == 2


def test_a_job_waiting_for_its_retry_is_queued_and_a_cancel_ends_it(client):
    job_id = submit(client, "later", tag=tag(), fail_times=1, after=600)
    eventually(lambda: client.get(f"/jobs/{job_id}").json().get("earlierErrors"))
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "queued", job
    assert job["attempt"] == 1
    assert job.get("nextAttemptAt")
    assert client.delete(f"/jobs/{job_id}").status_code in (200, 202, 204)
    assert wait_finished(client, job_id)["status"] == "cancelled"


def test_a_client_retries_a_failed_job_by_hand(client):
    job_id = submit(client, "flaky", tag=tag(), fail_times=3)  # its three attempts fail
    assert wait_finished(client, job_id)["status"] == "failed"
    answer = client.post(f"/jobs/{job_id}/retry")
    assert answer.status_code == 202, answer.text
    job = wait_finished(client, job_id)
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 4
    assert [error["attempt"] for error in job["earlierErrors"]] == [1, 2, 3]
    # Only a failed job may be retried; another owner's is not found.
    assert client.post(f"/jobs/{job_id}/retry").status_code == 409
    assert client.post(f"/jobs/{uuid.uuid4()}/retry").status_code == 404


def test_an_owner_with_one_job_gets_in_ahead_of_anothers_backlog(deployment, client):
    gate = tag()
    backlog = [submit(client, "gated", gate=gate) for _ in range(20)]
    with deployment.client(headers={"X-API-Key": KEYS[1]}) as other:
        single = submit(other, "gated", gate=gate)
        open_gate(deployment, gate)
        ended = {job_id: wait_finished(client, job_id) for job_id in backlog}
        ended[single] = wait_finished(other, single)
    assert {job["status"] for job in ended.values()} == {"succeeded"}
    order = sorted(ended, key=lambda job_id: ended[job_id]["startedAt"])
    assert order[0] == backlog[0]
    assert order[1] == single
    assert order[2:] == backlog[1:]


def test_a_higher_priority_starts_before_jobs_queued_earlier(deployment, client):
    gate = tag()
    first = submit(client, "gated", gate=gate)
    eventually(lambda: client.get(f"/jobs/{first}").json()["status"] == "running")
    plain = [first, *(submit(client, "gated", gate=gate) for _ in range(3))]
    urgent = submit(client, "gated", gate=gate, priority=5)
    assert client.get(f"/jobs/{urgent}").json()["priority"] == 5
    open_gate(deployment, gate)
    ended = {job_id: wait_finished(client, job_id) for job_id in [*plain, urgent]}
    order = sorted(ended, key=lambda job_id: ended[job_id]["startedAt"])
    assert order == [plain[0], urgent, *plain[1:]]


def test_an_owner_past_the_cap_is_refused_while_others_get_in(deployment, client):
    gate = tag()
    first = submit(client, "gated", gate=gate)
    eventually(lambda: client.get(f"/jobs/{first}").json()["status"] == "running")
    queued = [submit(client, "gated", gate=gate) for _ in range(CAP)]
    refused = client.post("/jobs", json={"jobType": "gated", "gate": gate})
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    with deployment.client(headers={"X-API-Key": KEYS[1]}) as other:
        theirs = submit(other, "gated", gate=gate)
        open_gate(deployment, gate)
        assert wait_finished(other, theirs)["status"] == "succeeded"
    for job_id in [first, *queued]:
        assert wait_finished(client, job_id)["status"] == "succeeded"


def test_a_put_job_handed_over_runs_past_its_timeout(deployment, client):
    gate = tag()
    answer = client.post("/put", json={"jobType": "gated", "gate": gate},
                         headers={"Prefer": "respond-async, wait=0.5"})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    # Past its /put deadline (the kind's 3 s timeout from its submission), it runs on.
    deadline = time.time() + 4.5
    eventually(lambda: time.time() > deadline, seconds=10)
    assert client.get(f"/jobs/{job_id}").json()["status"] == "running"
    open_gate(deployment, gate)
    assert wait_finished(client, job_id)["status"] == "succeeded"
