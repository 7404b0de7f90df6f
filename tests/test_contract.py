"""The contract both engines keep: the same requests get the same answers from the embedded
server and from the distributed mode (two API replicas and a worker process on PostgreSQL).
In the distributed mode, a job is submitted on one replica and followed on the other."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import sqlite3
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import DATA, ROOT, eventually
from deployments import ENGINES, Deployment, deploy, kill

sys.path.insert(0, str(ROOT / "tests" / "corpus"))
import make_corpus  # noqa: E402

ALPHA, BETA = "alpha-key-1234", "beta-key-5678"
CAPACITY = 5
FINISHED = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module", params=ENGINES)
def deployment(request, tmp_path_factory) -> Deployment:
    postgres = request.getfixturevalue("postgres") if request.param == "postgres" else None
    with deploy(request.param, tmp_path_factory.mktemp(request.param), postgres, replicas=2,
                message_workers=1, message_queue_size=CAPACITY, message_timeout=2) as deployment:
        yield deployment


@pytest.fixture
def first(deployment) -> httpx.Client:
    with deployment.client(0) as client:
        yield client


@pytest.fixture
def second(deployment) -> httpx.Client:
    """The other replica in the distributed mode; the same server in the embedded one."""
    with deployment.client(1) as client:
        yield client


def submit(client: httpx.Client, **kwargs) -> dict:
    response = client.post("/jobs", **kwargs)
    assert response.status_code == 202, response.text
    return response.json()


def wait_until(client: httpx.Client, job_id: str, statuses=FINISHED, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while (job := client.get(f"/jobs/{job_id}").json())["status"] not in statuses:
        assert time.monotonic() < deadline, f"job {job_id} never reached {statuses}: {job}"
        time.sleep(0.05)
    return job


def wait_stored_attempt(database: Path, job_id: str, attempt: int, seconds: float = 30) -> None:
    """Until the embedded engine's SQLite file holds `attempt` for the job (its writer
    commits a moment after the change)."""
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.closing(sqlite3.connect(database, timeout=5)) as conn:
            row = conn.execute("SELECT attempt FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is not None and row[0] == attempt:
            return
        assert time.monotonic() < deadline, f"job {job_id}'s stored attempt is {row}"
        time.sleep(0.02)


@pytest.fixture
def blocked(first) -> dict:
    """The one message worker busy with a long job (cancelled afterwards)."""
    blocker = submit(first, json={"data": "blocker", "seconds": 120})
    wait_until(first, blocker["id"], ("running",))
    yield blocker
    first.delete(f"/jobs/{blocker['id']}")


def test_submit_on_one_replica_and_follow_on_the_other(first, second):
    job = submit(first, json={"data": "hello", "seconds": 0.2})
    assert second.get(f"/jobs/{job['id']}/result").status_code in (200, 409)
    done = wait_until(second, job["id"])
    assert done["status"] == "succeeded" and done["progress"]["done"] == 0.2
    assert second.get(f"/jobs/{job['id']}/result").json() == {
        "message": "hello", "length": 5, "seconds": 0.2}


def test_health_and_the_event_feed_count_the_workers(deployment, second):
    health = second.get("/health").json()
    assert health["queues"]["message"]["workers"] == 1
    with second.stream("GET", "/events") as response:
        events = []  # up to the snapshot of jobs, which comes after queues (and workers)
        for line in response.iter_lines():
            events.append(line)
            if line == "event: jobs":
                break
    if deployment.engine == "postgres":  # the worker processes, from their heartbeats
        (process,) = health["workerProcesses"]
        assert process["kinds"]["message"] == 1 and process["lastSeen"] < 60
        assert process["metrics"].startswith("http://"), "a worker process has its own port"
        assert "event: workers" in events
    else:
        assert "workerProcesses" not in health and "event: workers" not in events


def test_put_waits_for_its_result_and_files_come_from_any_replica(first, second):
    assert first.post("/put", json={"data": "sync", "seconds": 0}).json()["data"]["result"][
        "data"]["message"] == "sync"
    with open(DATA / "sample.pdf", "rb") as pdf:
        answer = first.post("/put", data={"jobType": "pdf2image", "dpi": "30"},
                            files={"file": ("scan.pdf", pdf, "application/pdf")})
    assert answer.status_code == 200, answer.text
    result = answer.json()["data"]["result"]
    assert result["data"]["pages"] == 4 and len(result["files"]) == 4
    page = second.get(httpx.URL(result["files"][0]).path)
    assert page.status_code == 200 and page.content.startswith(b"\x89PNG")


def test_a_one_page_pdfs_result_is_its_png(first, second, tmp_path):
    from PIL import Image

    path = tmp_path / "one-page.pdf"
    Image.new("RGB", (200, 100), "white").save(path, "PDF")
    with path.open("rb") as pdf:
        job = submit(first, data={"jobType": "pdf2image", "dpi": "30"},
                     files={"file": ("one-page.pdf", pdf, "application/pdf")})
    assert wait_until(second, job["id"])["status"] == "succeeded"
    result = second.get(f"/jobs/{job['id']}/result")
    assert result.status_code == 200 and result.content.startswith(b"\x89PNG")
    assert result.headers["content-type"] == "image/png"
    assert f'filename="pdf2image-{job["id"]}.png"' in result.headers["content-disposition"]


def test_exactly_capacity_of_forty_concurrent_submits_is_accepted(deployment, blocked):
    def post(number: int) -> httpx.Response:
        with deployment.client(number) as client:
            return client.post("/jobs", json={"data": f"burst {number}", "seconds": 60})

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(post, range(40)))
    accepted = [answer.json()["id"] for answer in answers if answer.status_code == 202]
    refused = [answer for answer in answers if answer.status_code != 202]
    try:
        assert len(accepted) == CAPACITY, [answer.status_code for answer in answers]
        assert {answer.status_code for answer in refused} == {503}
        assert all("Retry-After" in answer.headers for answer in refused)
        assert "message queue is full" in refused[0].json()["detail"]
    finally:
        with deployment.client() as client:
            for job_id in accepted:
                client.delete(f"/jobs/{job_id}")


def test_put_timeout_is_504_and_stops_the_job(first, second):
    answer = first.post("/put", json={"data": "too slow", "seconds": 60})
    assert answer.status_code == 504
    assert "JOBQUEUE_MESSAGE_TIMEOUT" in answer.json()["detail"]
    job = second.get("/jobs?limit=1").json()["items"][0]
    # The distributed mode's stop reaches the worker through procrastinate's abort, a moment
    # after the 504: wait for the job's end, then check how it ended.
    assert wait_until(second, job["id"])["status"] == "cancelled", job
    # The worker is free again: the next job runs at once.
    assert first.post("/put", json={"data": "next", "seconds": 0}).status_code == 200


def test_cancel_queued_and_running_jobs(first, second, blocked):
    queued = submit(first, json={"data": "waiting", "seconds": 30})
    state = second.get(f"/jobs/{queued['id']}").json()
    assert state["status"] == "queued" and state["queuePosition"] == 1
    cancelled = second.delete(f"/jobs/{queued['id']}").json()
    assert cancelled["status"] == "cancelled" and "startedAt" not in cancelled
    stopped = second.delete(f"/jobs/{blocked['id']}").json()
    assert stopped["status"] == "cancelled"
    assert first.get(f"/jobs/{blocked['id']}").json()["status"] == "cancelled"
    assert second.get(f"/jobs/{blocked['id']}/result").status_code == 409
    # The worker is free: the next job runs, and the cancelled queued one never started.
    assert first.post("/put", json={"data": "after", "seconds": 0}).status_code == 200
    assert "startedAt" not in first.get(f"/jobs/{queued['id']}").json()
    # A second DELETE of a finished job deletes its record.
    assert second.delete(f"/jobs/{queued['id']}").status_code == 200
    assert first.get(f"/jobs/{queued['id']}").status_code == 404


def test_cancel_of_a_running_video_kills_ffmpeg(deployment, first, second):
    with open(DATA / "sample.mp4", "rb") as video:
        job = submit(first, data={"jobType": "video", "width": "3840"},
                     files={"file": ("clip.mp4", video, "video/mp4")})
    deadline = time.monotonic() + 20
    while not deployment.children("ffmpeg"):
        assert time.monotonic() < deadline, "ffmpeg never started"
        time.sleep(0.02)
    assert second.delete(f"/jobs/{job['id']}").json()["status"] == "cancelled"
    deadline = time.monotonic() + 5  # the worker may be another process: it stops within 1 s
    while deployment.children("ffmpeg"):
        assert time.monotonic() < deadline, "ffmpeg outlived the cancel"
        time.sleep(0.02)
    wait_until(first, job["id"])
    assert not (deployment.out_dir / job["id"] / "output.mp4").exists()


def test_progress_events_rise_to_a_final_event_on_the_other_replica(first, second):
    job = submit(first, json={"data": "watch me", "seconds": 1})
    events = []
    with second.stream("GET", f"/jobs/{job['id']}/events") as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert events[-1]["status"] == "succeeded"
    progress = [event["progress"]["done"] for event in events if event.get("progress")]
    assert progress == sorted(progress) and len(set(progress)) >= 3, progress


def test_attempt_counts_the_runs_started(first, second, blocked):
    assert first.get(f"/jobs/{blocked['id']}").json()["attempt"] == 1
    never = submit(first, json={"data": "never runs", "seconds": 0})
    job = submit(first, json={"data": "waits, then runs", "seconds": 0.2})
    assert second.get(f"/jobs/{job['id']}").json()["attempt"] == 0
    assert second.delete(f"/jobs/{never['id']}").json()["attempt"] == 0
    events = []
    with second.stream("GET", f"/jobs/{job['id']}/events") as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if len(events) == 1:  # the current state first: still waiting
                    first.delete(f"/jobs/{blocked['id']}")
    assert (events[0]["status"], events[0]["attempt"]) == ("queued", 0)
    assert (events[-1]["status"], events[-1]["attempt"]) == ("succeeded", 1)
    assert {event["attempt"] for event in events if event["status"] == "running"} <= {1}
    assert second.get(f"/jobs/{job['id']}").json()["attempt"] == 1
    assert second.get(f"/jobs/{never['id']}").json()["attempt"] == 0
    listed = {item["id"]: item for item in first.get("/jobs?limit=5").json()["items"]}
    assert listed[job["id"]]["attempt"] == 1 and listed[never["id"]]["attempt"] == 0


def test_list_pages_and_filters(first, second):
    ids = [submit(first, json={"data": f"list {n}", "seconds": 0})["id"] for n in range(5)]
    for job_id in ids:
        wait_until(second, job_id)
    listed, url = [], "/jobs?jobType=message&status=succeeded&limit=2"
    while url and len(listed) < 5:
        page = second.get(url).json()
        assert len(page["items"]) <= 2
        assert all("result" not in item or "data" not in item["result"] for item in page["items"])
        listed += [item["id"] for item in page["items"]]
        url = page.get("next")
    assert listed[:5] == ids[::-1], "newest first"
    assert second.get("/jobs?jobType=video&status=queued").json()["items"] == []
    assert second.get("/jobs?status=nonsense").status_code == 422


def test_a_failed_job_keeps_its_upload_and_none_of_its_partial_output(deployment, first):
    """Page 1 renders, page 2 is a flate bomb: the job fails, and page 1's PNG goes (it could
    not be downloaded from a failed job anyway) while the upload stays with the record."""
    job = submit(first, data={"jobType": "pdf2image"},
                 files={"file": ("bomb.pdf", make_corpus.good_page_then_bomb())})
    ended = wait_until(first, job["id"])
    assert ended["status"] == "failed" and "JOBQUEUE_RENDER_MAX_MB" in ended["error"], ended
    folder = deployment.out_dir / job["id"]  # tidied just after the end is recorded
    eventually(lambda: sorted(path.name for path in folder.iterdir()) == [".job", "input"])


def test_an_idempotency_key_gets_the_first_job_back(first, second):
    headers = {"Idempotency-Key": "upload-7f3a"}
    one = submit(first, json={"data": "once", "seconds": 0}, headers=headers)
    again = second.post("/jobs", json={"data": "once", "seconds": 0}, headers=headers)
    assert again.status_code == 202 and again.json()["id"] == one["id"]
    other = submit(second, json={"data": "once", "seconds": 0},
                   headers={"Idempotency-Key": "upload-7f3b"})
    assert other["id"] != one["id"]
    assert wait_until(first, one["id"])["status"] == "succeeded"


@pytest.mark.parametrize("engine", ENGINES)
def test_each_key_sees_only_its_own_jobs(engine, request, tmp_path):
    postgres = request.getfixturevalue("postgres") if engine == "postgres" else None
    with deploy(engine, tmp_path, postgres, replicas=2, api_keys=f"{ALPHA},{BETA}") as cluster:
        alpha = cluster.client(0, headers={"X-API-Key": ALPHA})
        beta = cluster.client(1, headers={"X-API-Key": BETA})
        with alpha, beta:
            headers = {"Idempotency-Key": "same-key"}
            mine = submit(alpha, json={"data": "alpha's", "seconds": 0}, headers=headers)
            theirs = submit(beta, json={"data": "beta's", "seconds": 0}, headers=headers)
            assert theirs["id"] != mine["id"], "an idempotency key belongs to one API key"
            wait_until(alpha, mine["id"])
            assert beta.get(f"/jobs/{mine['id']}").status_code == 404
            assert beta.delete(f"/jobs/{mine['id']}").status_code == 404
            assert [item["id"] for item in beta.get("/jobs").json()["items"]] == [theirs["id"]]
            assert alpha.get(f"/jobs/{mine['id']}/result").json()["message"] == "alpha's"
            assert cluster.client().get("/jobs").status_code == 401


@pytest.mark.parametrize("engine", ENGINES)
def test_every_accepted_job_runs_once_after_everything_is_killed(engine, request, tmp_path):
    """kill -9 of every process mid-run, then a start on the same records: every job that was
    accepted succeeds, the one that was running included, and none twice."""
    postgres = request.getfixturevalue("postgres") if engine == "postgres" else None
    settings = {"message_workers": 1}
    with deploy(engine, tmp_path, postgres, **settings) as before, before.client() as client:
        database = before.env.get("JOBQUEUE_DATABASE_URL")
        jobs = [submit(client, json={"data": f"job {n}", "seconds": 1}) for n in range(3)]
        wait_until(client, jobs[0]["id"], ("running",))
        if engine == "embedded":  # the start in the store of record, not only in memory
            wait_stored_attempt(before.out_dir / "jobs.db", jobs[0]["id"], 1)
        for process in [server.process for server in before.replicas] + before.workers:
            kill(process)
    with deploy(engine, tmp_path, database_url=database, **settings) as after, \
            after.client() as client:
        finished = [wait_until(client, job["id"]) for job in jobs]
        assert [job["status"] for job in finished] == ["succeeded"] * 3
        assert [job["result"]["data"]["message"] for job in finished] == [
            "job 0", "job 1", "job 2"]
        # The one that was running when everything was killed ran again: its second run.
        assert [job["attempt"] for job in finished] == [2, 1, 1]
        if engine == "postgres":  # the workers' logs of both runs (the same files)
            for job in jobs:
                assert after.logs().count(f"job {job['id']}: succeeded") == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_retry_after_of_a_full_queue_is_when_a_slot_frees(engine, request, tmp_path):
    """Every slot holds a long job that has run a while, after a history of short jobs: the
    next slot frees when that job ends, not in the short jobs' mean per worker (1 s)."""
    postgres = request.getfixturevalue("postgres") if engine == "postgres" else None
    with deploy(engine, tmp_path, postgres, message_workers=1, message_queue_size=1) as cluster, \
            cluster.client() as client:
        for n in range(3):
            assert wait_until(client, submit(client, json={"data": f"short {n}", "seconds": 0})
                              ["id"])["status"] == "succeeded"
        long = submit(client, json={"data": "long", "seconds": 120})["id"]
        deadline = time.monotonic() + 60
        while (client.get(f"/jobs/{long}").json().get("progress") or {}).get("done", 0) < 3:
            assert time.monotonic() < deadline, client.get(f"/jobs/{long}").json()
            time.sleep(0.1)
        waiting = submit(client, json={"data": "waiting", "seconds": 0})["id"]
        full = client.post("/jobs", json={"data": "one too many", "seconds": 0})
        assert full.status_code == 503, full.text
        # It has run 3 s or more, past the recent mean: about as long again is left.
        assert 3 <= int(full.headers["Retry-After"]) <= 300, full.headers
        for job_id in (waiting, long):
            assert client.delete(f"/jobs/{job_id}").status_code == 200
