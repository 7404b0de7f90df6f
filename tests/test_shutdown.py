"""Graceful shutdown on SIGTERM: 503 for new jobs, a grace for running ones, nothing lost."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx

from conftest import run_server
from media import make_clip


def wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_sigterm_refuses_new_jobs_and_lets_running_ones_finish(tmp_path):
    with run_server(tmp_path, shutdown_grace=10, message_workers=1) as server, \
            server.client() as client:
        running = client.post("/jobs", json={"data": "finish me", "seconds": 1.5}).json()["id"]
        queued = client.post("/jobs", json={"data": "after restart", "seconds": 0.1}).json()["id"]
        assert wait_for(lambda: client.get(f"/jobs/{running}").json()["status"] == "running", 5)
        server.process.send_signal(signal.SIGTERM)
        # Load balancers read the status code: draining is 503 on /health, not "ok".
        assert wait_for(lambda: client.get("/health").status_code == 503, 5)
        assert client.get("/health").json()["status"] == "draining"
        refused = client.post("/jobs", json={"data": "too late"})
        assert refused.status_code == 503
        assert int(refused.headers["Retry-After"]) >= 1
        assert "shutting down" in refused.json()["detail"]
        assert client.post("/put", json={"data": "too late"}).status_code == 503
        # Reading still works while running jobs finish.
        assert client.get(f"/jobs/{queued}").json()["status"] == "queued"
        server.process.wait(15)
        assert server.process.returncode is not None
    log = server.log()
    assert "giving running jobs 10 s to finish" in log
    assert "grace over" not in log  # it finished within the grace

    with run_server(tmp_path) as again, again.client() as client:
        assert client.get(f"/jobs/{running}").json()["status"] == "succeeded"
        assert wait_for(lambda: client.get(f"/jobs/{queued}").json()["status"] == "succeeded",
                        10), "the queued job runs after the restart"


def test_grace_runs_out_then_jobs_stop_and_rerun_after_restart(tmp_path):
    clip = make_clip(tmp_path / "long.mp4", 30)
    with run_server(tmp_path, shutdown_grace=1) as server, server.client() as client:
        with clip.open("rb") as video:
            job_id = client.post("/jobs", data={"jobType": "video", "width": "1920"},
                                 files={"file": ("long.mp4", video)}).json()["id"]
        assert wait_for(lambda: server.children("ffmpeg"), 10)
        [ffmpeg_pid] = server.children("ffmpeg")
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(20)
        assert 0.9 < time.monotonic() - started < 10
    assert wait_for(lambda: not Path(f"/proc/{ffmpeg_pid}").exists(), 2), "ffmpeg left behind"
    assert "grace over: stopping the running jobs" in server.log()

    with run_server(tmp_path) as again, again.client() as client:
        job = client.get(f"/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running"), "run again after the restart"
        client.delete(f"/jobs/{job_id}")


def test_second_signal_stops_at_once_and_still_stops_the_engine(tmp_path):
    clip = make_clip(tmp_path / "long.mp4", 30)
    with run_server(tmp_path, shutdown_grace=30) as server, server.client() as client:
        with clip.open("rb") as video:
            client.post("/jobs", data={"jobType": "video", "width": "1920"},
                        files={"file": ("long.mp4", video)})
        assert wait_for(lambda: server.children("ffmpeg"), 10)
        [ffmpeg_pid] = server.children("ffmpeg")
        started = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        try:
            assert client.post("/jobs", json={}).status_code == 503
        except httpx.TransportError:
            pass
        server.process.send_signal(signal.SIGINT)
        server.process.wait(15)
        assert time.monotonic() - started < 8
    assert wait_for(lambda: not Path(f"/proc/{ffmpeg_pid}").exists(), 2), "ffmpeg left behind"
    assert "workers stopped" in server.log()
