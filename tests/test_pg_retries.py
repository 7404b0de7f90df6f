"""The distributed engine's retries of what tests/test_scheduling.py (both engines) leaves out:
a batched kind's failed attempts, and RetryLater on a kind without a Retry of its own, against
a real PostgreSQL: a replica and a worker process serving tests/kinds/flaky.py's kinds. The
kinds count their attempts in files, so a test waits for states and never for a time."""

from __future__ import annotations

import uuid

import httpx
import pytest

from conftest import wait_finished
from deployments import Deployment, deploy

KINDS = "flaky:FLAKY,flaky:LATER,flaky:BATCHED"
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


def test_retry_later_is_retried_on_a_kind_without_a_retry_of_its_own(client):
    job = wait_finished(client, submit(client, "later", tag=tag(), fail_times=2))
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 3
    assert len(job["earlierErrors"]) == 2
