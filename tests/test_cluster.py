"""The distributed mode under faults, with real processes: a replica or a worker killed with
-9, a worker stopped with SIGTERM, PostgreSQL stopped and started mid-run, and the limits that
replicas share through redis."""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx

from conftest import DATA, free_port
from deployments import children_of, deploy, kill
from jobqueue.localpg import LocalPostgres
from test_contract import submit, wait_until

ALPHA = "alpha-key-1234"


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def watch(client: httpx.Client, job_id: str, events: list[dict]) -> threading.Thread:
    """Read the job's event stream into `events` in a thread, until the stream ends."""
    def read() -> None:
        with client.stream("GET", f"/jobs/{job_id}/events") as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def succeeded_lines(logs: str, job_id: str) -> int:
    return logs.count(f"job {job_id}: succeeded")


def test_replica_kill_9_loses_no_accepted_job(postgres, tmp_path):
    with deploy("postgres", tmp_path, postgres, replicas=2, workers=1, message_workers=2,
                message_queue_size=100) as cluster, cluster.client(0) as doomed, \
            cluster.client(1) as survivor:
        accepted = [submit(doomed, json={"data": f"a{n}", "seconds": 0.3})["id"] for n in range(6)]
        events: list[dict] = []
        stream = watch(survivor, accepted[-1], events)
        kill(cluster.replicas[0].process)
        accepted += [submit(survivor, json={"data": f"b{n}", "seconds": 0.3})["id"]
                     for n in range(6)]
        for job_id in accepted:
            assert wait_until(survivor, job_id)["status"] == "succeeded"
        stream.join(60)
        assert not stream.is_alive() and events[-1]["status"] == "succeeded"
        logs = cluster.logs()
        assert all(succeeded_lines(logs, job_id) == 1 for job_id in accepted)


def test_worker_kill_9_mid_video_reruns_elsewhere_and_leaves_no_ffmpeg(postgres, tmp_path):
    with deploy("postgres", tmp_path, postgres, workers=2) as cluster, cluster.client() as client:
        with open(DATA / "sample.mp4", "rb") as video:
            job = submit(client, data={"jobType": "video", "width": "3840"},
                         files={"file": ("clip.mp4", video, "video/mp4")})
        deadline = time.monotonic() + 30
        while not (busy := [(worker, pids) for worker in cluster.workers
                            if (pids := children_of(worker.pid, "ffmpeg"))]):
            assert time.monotonic() < deadline, "ffmpeg never started"
            time.sleep(0.02)
        (victim, ffmpeg), = busy
        assert len(client.get("/health").json()["workerProcesses"]) == 2
        kill(victim)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in ffmpeg):
            assert time.monotonic() < deadline, "ffmpeg outlived its worker"
            time.sleep(0.05)
        done = wait_until(client, job["id"], seconds=120)
        assert done["status"] == "succeeded", done
        assert done["result"]["data"]["width"] == 3840
        survivor = next(worker for worker in cluster.workers if worker is not victim)
        deadline = time.monotonic() + 60  # its heartbeat goes stale
        while len(client.get("/health").json()["workerProcesses"]) != 1:
            assert time.monotonic() < deadline, "the dead worker is still listed"
            time.sleep(0.2)
        assert succeeded_lines(survivor.log_path.read_text(), job["id"]) == 1
        assert succeeded_lines(victim.log_path.read_text(), job["id"]) == 0


def test_worker_sigterm_requeues_what_it_cannot_finish_in_the_grace(postgres, tmp_path):
    with deploy("postgres", tmp_path, postgres, workers=1, message_workers=1,
                shutdown_grace=1) as cluster, cluster.client() as client:
        job = submit(client, json={"data": "long", "seconds": 3})
        wait_until(client, job["id"], ("running",))
        first = cluster.workers[0]
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0
        assert "queued again" in first.log_path.read_text()
        assert client.get(f"/jobs/{job['id']}").json()["status"] == "queued"
        cluster.start_worker()
        assert wait_until(client, job["id"])["status"] == "succeeded"


def test_postgresql_stopped_and_started_mid_run(tmp_path):
    """Replicas answer 503 naming the database while it is down (no 500, no hang), reconnect by
    themselves when it is back, and every accepted job succeeds."""
    folder = Path(tempfile.mkdtemp(prefix="jobqueue-pg-outage-"))
    database = LocalPostgres(folder, port=free_port(), fast=True)
    try:
        database.start()
        with deploy("postgres", tmp_path, database_url=database.url, workers=1,
                    message_workers=2, max_upload_mb=1) as cluster, \
                cluster.client(timeout=30) as client:
            jobs = [submit(client, json={"data": f"job {n}", "seconds": 1})["id"]
                    for n in range(4)]
            wait_until(client, jobs[0], ("running",))
            database.stop()
            health = client.get("/health")
            assert health.status_code == 503
            assert "postgresql" in health.json()["dependencies"]
            # An upload hears it before its file is read (over the size cap: not a 413).
            upload = client.post("/jobs", data={"jobType": "pdf2image"},
                                 files={"file": ("a.pdf", b"%PDF-1.4\n" + b"0" * 2**21)})
            for answer in (client.get(f"/jobs/{jobs[0]}"),
                           client.post("/jobs", json={"data": "while down", "seconds": 0}),
                           upload):
                assert answer.status_code == 503, answer.text
                assert "PostgreSQL" in answer.json()["detail"]
            metrics = client.get("/metrics")  # the counters still answer; the queues cannot
            assert metrics.status_code == 200
            assert 'jobqueue_dependency_up{dependency="postgresql"} 0.0' in metrics.text
            assert "jobqueue_jobs_waiting{" not in metrics.text
            database.start()
            deadline = time.monotonic() + 60
            while client.get("/health").status_code != 200:
                assert time.monotonic() < deadline, "the replica never reconnected"
                time.sleep(0.2)
            for job_id in jobs:
                assert wait_until(client, job_id, seconds=90)["status"] == "succeeded"
            assert client.post("/put", json={"data": "after", "seconds": 0}).status_code == 200
    finally:
        database.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_rate_limit_and_wrong_key_lockout_are_shared_through_redis(postgres, redis, tmp_path):
    with deploy("postgres", tmp_path, postgres, replicas=2, workers=0, rate_limit="5/minute",
                rate_limit_storage=redis, api_keys=ALPHA) as cluster:
        clients = [cluster.client(n, headers={"X-API-Key": ALPHA}) for n in range(2)]
        answers = [clients[n % 2].post("/jobs", json={"seconds": 0}).status_code
                   for n in range(8)]
        assert sorted(answers) == [202] * 5 + [429] * 3, answers
        anonymous = [cluster.client(n) for n in range(2)]
        for guess in range(20):
            answer = anonymous[guess % 2].get("/jobs", headers={"X-API-Key": f"guess-{guess}"})
            assert answer.status_code == 401
        for client in anonymous:
            assert client.get("/jobs", headers={"X-API-Key": "guess-20"}).status_code == 429
        for client in clients + anonymous:
            client.close()


def test_without_redis_each_replica_counts_alone(postgres, tmp_path):
    with deploy("postgres", tmp_path, postgres, replicas=2, workers=0,
                rate_limit="2/minute") as cluster:
        answers = []
        for n in range(2):
            with cluster.client(n) as client:
                answers += [client.post("/jobs", json={"seconds": 0}).status_code
                            for _ in range(3)]
        assert answers == [202, 202, 429] * 2
