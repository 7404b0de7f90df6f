"""The distributed mode under faults, with real processes: a replica or a worker killed with
-9, a worker stopped with SIGTERM, PostgreSQL stopped and started mid-run, and the limits that
replicas share through redis; `make cluster`'s launcher keeping its processes up."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from conftest import DATA, ROOT, eventually, free_port
from deployments import children_of, deploy, kill, settings_env
from jobqueue.local import cluster
from jobqueue.local.postgres import LocalPostgres
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
        assert done["attempt"] == 2  # the killed run, then the one that succeeded
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
        queued = client.get(f"/jobs/{job['id']}").json()
        assert (queued["status"], queued["attempt"]) == ("queued", 1)
        cluster.start_worker()
        done = wait_until(client, job["id"])
        assert (done["status"], done["attempt"]) == ("succeeded", 2)


def test_the_event_feed_shows_a_requeued_jobs_attempt(postgres, tmp_path):
    """Queued at attempt 0, then queued again at attempt 1 by a worker's SIGTERM: the same
    status, progress and queue position, a new attempt; the feed says so."""
    with deploy("postgres", tmp_path, postgres, workers=0, message_workers=1,
                shutdown_grace=1) as cluster, cluster.client() as client, \
            cluster.client(timeout=httpx.Timeout(10, read=None)) as watcher:
        job = submit(client, json={"data": "long", "seconds": 30})
        seen: list[dict] = []

        def read() -> None:
            # Until the test ends and closes the client under it.
            with contextlib.suppress(httpx.HTTPError), watcher.stream("GET", "/events") as response:
                event = None
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:") and event in ("jobs", "job"):
                        data = json.loads(line[5:])
                        seen.extend(item for item in (data if event == "jobs" else [data])
                                    if item["id"] == job["id"])

        threading.Thread(target=read, daemon=True).start()
        eventually(lambda: seen and seen[0]["status"] == "queued")
        assert seen[0]["attempt"] == 0
        worker = cluster.start_worker()
        wait_until(client, job["id"], ("running",))
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        assert client.get(f"/jobs/{job['id']}").json()["attempt"] == 1
        eventually(lambda: any(item["status"] == "running" for item in seen)
                   and seen[-1]["status"] == "queued")
        assert seen[-1]["attempt"] == 1, seen
        client.delete(f"/jobs/{job['id']}")


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


def consecutive_ports(count: int) -> int:
    """The first of `count` free loopback ports in a row."""
    while True:
        first = free_port()
        if all(free_port() == first + n for n in range(1, count)):
            return first


@contextmanager
def launcher(replicas: int, workers: int, **settings: object
             ) -> Iterator[tuple[subprocess.Popen, Path, list[str]]]:
    """`python -m jobqueue.local.cluster` as `make cluster` runs it, in a folder of its own
    (not under pytest's tmp: its PostgreSQL runs as the postgres user); until its replicas
    answer. Yields the launcher, its log and the replicas' URLs; stopped with SIGTERM."""
    folder = Path(tempfile.mkdtemp(prefix="jobqueue-cluster-"))
    folder.chmod(0o755)
    port = consecutive_ports(replicas)
    env = {**settings_env(folder / "out", settings), "PYTHONPATH": str(ROOT / "src")}
    log_path = folder / "launcher.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "jobqueue.local.cluster", "--replicas", str(replicas),
             "--workers", str(workers), "--port", str(port), "--folder", str(folder)],
            cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "API replicas:" not in log_path.read_text():
            assert process.poll() is None, f"the launcher exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        yield process, log_path, [f"http://127.0.0.1:{port + n}" for n in range(replicas)]
        assert process.poll() is None, f"the launcher exited:\n{log_path.read_text()}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)


def children_running(parent: int, *words: str) -> list[int]:
    """Live child processes of `parent` whose command line holds all of `words`."""
    pids = []
    for pid in children_of(parent, "python"):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(word.encode() in args for word in words):
            pids.append(pid)
    return pids


def kill_9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(pid):
        assert time.monotonic() < deadline, f"{pid} outlived a kill -9"
        time.sleep(0.02)


def listed_workers(client: httpx.Client) -> list[dict]:
    return client.get("/health").json().get("workerProcesses") or []


def test_launcher_restarts_a_killed_worker_or_replica_and_leaves_the_others():
    with launcher(replicas=2, workers=1) as (process, log_path, urls), \
            httpx.Client(base_url=urls[0], timeout=10) as client:
        (worker,) = children_running(process.pid, "jobqueue.worker")
        replicas = [children_running(process.pid, "--port", url.rsplit(":", 1)[1])[0]
                    for url in urls]
        kill_9(worker)
        deadline = time.monotonic() + 60
        while not (again := [pid for pid in children_running(process.pid, "jobqueue.worker")
                             if pid != worker]):
            assert process.poll() is None, f"the launcher exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        (again,) = again
        text = log_path.read_text()
        assert f"worker 1 (pid {worker}) exited with signal SIGKILL; starting it again" in text
        assert f"worker 1 started again (pid {again})" in text
        host = socket.gethostname()
        deadline = time.monotonic() + 60
        while f"{host}-{again}" not in [w["name"] for w in listed_workers(client)]:
            assert time.monotonic() < deadline, "the restarted worker never beat"
            time.sleep(0.2)
        job = submit(client, json={"data": "after the kill", "seconds": 0})
        assert wait_until(client, job["id"])["status"] == "succeeded"
        assert all(alive(pid) for pid in replicas)
        assert not re.search(r"replica on port \d+ \(pid \d+\) exited", text)
        # A replica killed: started again on its port, the worker and the other replica left be.
        kill_9(replicas[1])
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{urls[1]}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, f"the launcher exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        assert f"(pid {replicas[1]}) exited with signal SIGKILL" in log_path.read_text()
        assert alive(again) and alive(replicas[0])
        with httpx.Client(base_url=urls[1], timeout=10) as restarted:
            job = submit(restarted, json={"data": "after the replica's kill", "seconds": 0})
            assert wait_until(restarted, job["id"])["status"] == "succeeded"


def test_launcher_gives_each_worker_its_own_fixed_metrics_port():
    first = consecutive_ports(2)
    with launcher(replicas=1, workers=2, worker_metrics_port=first) as (process, log_path, urls), \
            httpx.Client(base_url=urls[0], timeout=10) as client:
        deadline = time.monotonic() + 60
        while len(workers := listed_workers(client)) < 2:
            assert process.poll() is None, f"the launcher exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        ports = sorted(int(re.search(r":(\d+)/metrics$", w["metrics"]).group(1)) for w in workers)
        assert ports == [first, first + 1]
        for port in ports:
            assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
        assert "exited with" not in log_path.read_text()


def test_a_process_that_keeps_exiting_is_started_again_later_each_time(caplog):
    """The launcher's back-off: 1 s, doubled up to 30 s while the process exits soon after its
    start, 1 s again once it had run a while; each exit logged."""
    caplog.set_level(logging.INFO, logger="jobqueue.local.cluster")
    now = [1000.0]

    class Exited:
        pid = 4242

        def poll(self) -> int:
            return 1

    service = cluster.Service("worker 1", Exited, Path("worker-1.log"), clock=lambda: now[0])
    service.start()
    delays = []
    for _ in range(7):
        service.check()  # sees the exit
        delays.append(service.restart_at - now[0])
        now[0] = service.restart_at
        service.check()  # starts it again
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    now[0] += cluster.RESTART_RESET_SECONDS + 1  # this start ran for a while before it exited
    service.check()
    assert service.restart_at - now[0] == 1
    assert caplog.text.count("worker 1 (pid 4242) exited with code 1; starting it again") == 8
    assert caplog.text.count("worker 1 started again (pid 4242)") == 7
