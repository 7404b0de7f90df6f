"""Which job starts next, and what a failure leads to, the same on both engines: priorities,
fair share between API keys and its cap, retries with back-off (and by hand), the admission of
a /put by its estimated start, and the Prefer headers that hand a /put over or let POST /jobs
wait.

The kinds are tests/kinds/scheduling.py's. Orders are made deterministic with a gate: one
worker is held by a gated job while the test queues the others, then the gate opens and the
jobs' start times (their records' startedAt) give the order they ran in. Nothing waits for a
time."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from conftest import eventually, scrape, value, wait_finished
from deployments import ENGINES, Deployment, deploy

KINDS = "message,pdf2image,scheduling:GATE,scheduling:STEP,scheduling:BRISK"
ALPHA, BETA = "alpha-key-0123456789", "beta-key-0123456789"


@pytest.fixture(scope="module", params=ENGINES)
def deployment(request, tmp_path_factory) -> Deployment:
    postgres = request.getfixturevalue("postgres") if request.param == "postgres" else None
    with deploy(request.param, tmp_path_factory.mktemp(f"sched-{request.param}"), postgres,
                kinds=KINDS, api_keys=f"{ALPHA},{BETA}", gate_workers=1, brisk_workers=1,
                max_queued_per_key=30, max_priority_per_key=f"{BETA}=2,*=10",
                rate_limit="10000/minute") as deployment:
        yield deployment


@pytest.fixture
def alpha(deployment) -> httpx.Client:
    with deployment.client(headers={"X-API-Key": ALPHA}) as client:
        yield client


@pytest.fixture
def beta(deployment) -> httpx.Client:
    with deployment.client(headers={"X-API-Key": BETA}) as client:
        yield client


def submit(client: httpx.Client, kind: str = "gate", **options) -> str:
    answer = client.post("/jobs", json={"jobType": kind, **options})
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def job(client: httpx.Client, job_id: str) -> dict:
    return client.get(f"/jobs/{job_id}").json()


def hold(client: httpx.Client, gate: Path) -> str:
    """A gated job that holds the gate kind's one worker until `gate` exists."""
    blocker = submit(client, gate=str(gate))
    eventually(lambda: job(client, blocker)["status"] == "running")
    return blocker


def start_order(client: httpx.Client, ids: list[str]) -> list[str]:
    """The jobs in the order they started, once all have finished."""
    return by_start({job_id: wait_finished(client, job_id) for job_id in ids})


def by_start(ended: dict[str, dict]) -> list[str]:
    assert all(state["status"] == "succeeded" for state in ended.values()), ended
    return sorted(ended, key=lambda job_id: datetime.fromisoformat(ended[job_id]["startedAt"]))


def test_one_keys_job_starts_second_after_another_keys_twenty(alpha, beta, tmp_path):
    gate = tmp_path / "gate"
    blocker = hold(alpha, gate)
    flood = [submit(alpha, gate=str(gate), text=f"a{n}") for n in range(20)]
    single = submit(beta, gate=str(gate), text="b")
    assert job(beta, single)["queuePosition"] == 1  # ahead of the whole flood already
    assert job(alpha, flood[0])["queuePosition"] == 2
    gate.touch()
    ended = {job_id: wait_finished(alpha, job_id) for job_id in [blocker, *flood]}
    ended[single] = wait_finished(beta, single)
    started = by_start(ended)
    assert started[:3] == [blocker, single, flood[0]]
    assert started[3:] == flood[1:]  # a key's own jobs keep their order


def test_higher_priority_starts_first_and_equal_keeps_its_order(alpha, tmp_path):
    gate = tmp_path / "gate"
    blocker = hold(alpha, gate)
    low = submit(alpha, gate=str(gate), priority=-3)
    plain = submit(alpha, gate=str(gate))
    high = submit(alpha, gate=str(gate), priority=5)
    high_too = submit(alpha, gate=str(gate), priority=5)
    assert job(alpha, high)["priority"] == 5
    assert job(alpha, high)["queuePosition"] == 1
    gate.touch()
    assert start_order(alpha, [blocker, low, plain, high, high_too]) == [
        blocker, high, high_too, plain, low]


@pytest.mark.parametrize("priority", [11, -11, "high", 2.5, True, "²", "+-5", "99"])
def test_a_priority_out_of_range_is_422(alpha, priority):
    answer = alpha.post("/jobs", json={"jobType": "step", "priority": priority})
    assert answer.status_code == 422
    assert "priority" in answer.json()["detail"]


def test_a_priority_as_a_form_field_on_put(alpha):
    sample = Path(__file__).parents[1] / "data" / "sample.pdf"
    answer = alpha.post("/put", data={"jobType": "pdf2image", "priority": "7", "dpi": "30"},
                        files={"file": ("sample.pdf", sample.read_bytes(), "application/pdf")})
    assert answer.status_code == 200, answer.text
    assert job(alpha, answer.json()["data"]["id"])["priority"] == 7


def test_a_key_may_ask_only_for_its_cap(beta):
    answer = beta.post("/jobs", json={"jobType": "step", "priority": 3})
    assert answer.status_code == 422
    assert "JOBQUEUE_MAX_PRIORITY_PER_KEY" in answer.json()["detail"]
    assert beta.post("/jobs", json={"jobType": "step", "priority": 2}).status_code == 202


def test_past_its_cap_a_key_gets_429_while_others_get_in(alpha, beta, tmp_path):
    gate = tmp_path / "gate"
    blocker = hold(alpha, gate)
    mine = [submit(alpha, gate=str(gate)) for _ in range(30)]
    refused = alpha.post("/jobs", json={"jobType": "gate", "gate": str(gate)})
    assert refused.status_code == 429
    assert "JOBQUEUE_MAX_QUEUED_PER_KEY" in refused.json()["detail"]
    assert int(refused.headers["Retry-After"]) >= 1
    other = submit(beta, gate=str(gate))
    gate.touch()
    start_order(alpha, [blocker, *mine])
    assert wait_finished(beta, other)["status"] == "succeeded"


def test_a_job_that_fails_twice_succeeds_on_its_third_attempt(alpha, deployment, tmp_path):
    job_id = submit(alpha, "step", fails=2, tally=str(tmp_path / "tally"), text="third")
    ended = wait_finished(alpha, job_id)
    assert ended["status"] == "succeeded", ended
    assert ended["attempt"] == 3 and ended["maxAttempts"] == 3
    assert [e["attempt"] for e in ended["earlierErrors"]] == [1, 2]
    assert "internal error" in ended["earlierErrors"][0]["error"]
    assert ended["result"]["data"]["attempt"] == 3
    if deployment.engine == "embedded":  # a distributed worker counts its own (test_cluster)
        samples = scrape(f"{deployment.server.url}/metrics")
        assert value(samples, "jobqueue_jobs_total", kind="step", outcome="retried") >= 2


def test_a_job_that_keeps_failing_fails_after_its_attempts(alpha, tmp_path):
    job_id = submit(alpha, "step", fails=9, tally=str(tmp_path / "tally"))
    ended = wait_finished(alpha, job_id)
    assert ended["status"] == "failed"
    assert ended["attempt"] == 3 and len(ended["earlierErrors"]) == 2
    assert (tmp_path / "tally").read_text() == "xxx"


def test_bad_input_is_never_retried(alpha, tmp_path):
    job_id = submit(alpha, "step", answer="bad", tally=str(tmp_path / "tally"))
    ended = wait_finished(alpha, job_id)
    assert ended["status"] == "failed" and ended["attempt"] == 1
    assert "earlierErrors" not in ended
    assert "not something step can do" in ended["error"]


def test_retry_later_waits_queued_and_says_when(alpha, tmp_path):
    job_id = submit(alpha, "step", answer="later", later=600, fails=1,
                    tally=str(tmp_path / "tally"))
    eventually(lambda: "nextAttemptAt" in job(alpha, job_id))
    waiting = job(alpha, job_id)
    assert waiting["status"] == "queued" and waiting["attempt"] == 1
    assert "upstream busy (attempt 1)" in waiting["earlierErrors"][0]["error"]
    cancelled = alpha.delete(f"/jobs/{job_id}").json()
    assert cancelled["status"] == "cancelled"


def test_a_failed_job_runs_again_by_hand(alpha, tmp_path):
    job_id = submit(alpha, "step", fails=3, tally=str(tmp_path / "tally"))
    assert wait_finished(alpha, job_id)["status"] == "failed"
    answer = alpha.post(f"/jobs/{job_id}/retry")
    assert answer.status_code == 202, answer.text
    assert answer.headers["Location"].endswith(f"/jobs/{job_id}")
    ended = wait_finished(alpha, job_id)
    assert ended["status"] == "succeeded" and ended["attempt"] == 4
    assert len(ended["earlierErrors"]) == 3
    again = alpha.post(f"/jobs/{job_id}/retry")
    assert again.status_code == 409
    assert "only a failed job" in again.json()["detail"]


def test_a_retry_of_a_job_whose_upload_is_gone_is_410(alpha):
    answer = alpha.post("/put", data={"jobType": "pdf2image"},
                        files={"file": ("broken.pdf", b"%PDF-1.4 not really", "application/pdf")})
    assert answer.status_code in (415, 422), answer.text
    job_id = answer.headers["Location"].rsplit("/", 1)[1]
    assert job(alpha, job_id)["status"] == "failed"
    gone = alpha.post(f"/jobs/{job_id}/retry")
    assert gone.status_code == 410
    assert "upload" in gone.json()["detail"]


def test_another_keys_job_cannot_be_retried(alpha, beta, tmp_path):
    job_id = submit(alpha, "step", answer="bad")
    wait_finished(alpha, job_id)
    assert beta.post(f"/jobs/{job_id}/retry").status_code == 404


def test_put_with_respond_async_hands_its_job_over(alpha, tmp_path):
    gate = tmp_path / "gate"
    answer = alpha.post("/put", json={"jobType": "gate", "gate": str(gate), "text": "kept"},
                        headers={"Prefer": "respond-async, wait=0.2"})
    assert answer.status_code == 202, answer.text
    assert answer.headers["Preference-Applied"] == "respond-async"
    job_id = answer.json()["id"]
    assert answer.headers["Location"].endswith(f"/jobs/{job_id}")
    assert answer.json()["status"] in ("queued", "running")
    gate.touch()
    assert wait_finished(alpha, job_id)["status"] == "succeeded"
    download = alpha.get(f"/jobs/{job_id}/result")
    assert download.status_code == 200 and download.content == b"kept"


def test_a_handed_over_put_job_runs_past_the_put_timeout(alpha, tmp_path):
    """brisk's /put waits 1 s: its job, handed over, is a kept job whose deadline is
    JOBQUEUE_JOB_MAX_SECONDS from its start, so it is still running once that 1 s is long
    past (a wait for its record to be older than that: a bound, not a figure)."""
    gate = tmp_path / "gate"
    answer = alpha.post("/put", json={"jobType": "brisk", "gate": str(gate)},
                        headers={"Prefer": "respond-async, wait=0.1"})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    created = datetime.fromisoformat(job(alpha, job_id)["createdAt"]).timestamp()
    eventually(lambda: time.time() > created + 3)
    assert job(alpha, job_id)["status"] == "running"
    gate.touch()
    assert wait_finished(alpha, job_id)["status"] == "succeeded"


def test_put_without_prefer_still_answers_its_result(alpha):
    answer = alpha.post("/put", json={"jobType": "gate", "text": "now"},
                        headers={"Prefer": "respond-async, wait=30"})
    assert answer.status_code == 200
    assert answer.json()["data"]["result"]["data"]["text"] == "now"


def test_post_jobs_with_prefer_wait(alpha, tmp_path):
    done = alpha.post("/jobs", json={"jobType": "step", "text": "quick"},
                      headers={"Prefer": "wait=30"})
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "succeeded"
    assert done.json()["result"]["data"]["text"] == "quick"
    assert done.headers["Preference-Applied"] == "wait=30"
    gate = tmp_path / "gate"
    later = alpha.post("/jobs", json={"jobType": "gate", "gate": str(gate)},
                       headers={"Prefer": "wait=0.2"})
    assert later.status_code == 202
    gate.touch()
    assert wait_finished(alpha, later.json()["id"])["status"] == "succeeded"


def test_a_put_that_would_start_after_its_timeout_is_refused_at_once(alpha, tmp_path):
    """brisk: one worker, /put waits 1 s. Twenty runs of 0.2 s give the median; then with the
    worker held and six jobs queued, a /put would start about 6 × 0.2 s later: 503 now."""
    for _ in range(20):
        assert wait_finished(alpha, submit(alpha, "brisk", seconds=0.2))["status"] == "succeeded"
    gate = tmp_path / "gate"
    blocker = submit(alpha, "brisk", gate=str(gate))
    eventually(lambda: job(alpha, blocker)["status"] == "running")
    queued = [submit(alpha, "brisk", gate=str(gate)) for _ in range(6)]
    assert job(alpha, queued[-1])["estimatedStartSeconds"] >= 1.0
    refused = alpha.post("/put", json={"jobType": "brisk"})
    assert refused.status_code == 503, refused.text
    assert "JOBQUEUE_BRISK_TIMEOUT" in refused.json()["detail"]
    assert int(refused.headers["Retry-After"]) >= 1
    handed = alpha.post("/put", json={"jobType": "brisk"},
                        headers={"Prefer": "respond-async, wait=0.1"})
    assert handed.status_code == 202
    gate.touch()
    for job_id in [blocker, *queued, handed.json()["id"]]:
        assert wait_finished(alpha, job_id)["status"] == "succeeded"
