"""503 when a queue is full, 504 that really stops the job, cancel on disconnect, 429."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from pathlib import Path

import httpx
import pytest

from conftest import DATA, Server, eventually, run_server, scrape, value

MESSAGE_TIMEOUT = 2
VIDEO_TIMEOUT = 1


@pytest.fixture(scope="module")
def tight(tmp_path_factory) -> Server:
    """One message worker with two queue slots, and short timeouts."""
    with run_server(tmp_path_factory.mktemp("tight"), message_workers=1, message_queue_size=2,
                    message_timeout=MESSAGE_TIMEOUT, video_timeout=VIDEO_TIMEOUT) as server:
        yield server


def test_full_queue_answers_503_with_retry_after(tight):
    def put(_: int) -> httpx.Response:
        with tight.client() as client:
            return client.post("/put", json={"data": "x", "seconds": 0.4})

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(put, range(10)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 3 and codes.count(503) >= 1, codes
    refused = next(r for r in responses if r.status_code == 503)
    assert int(refused.headers["Retry-After"]) >= 1
    assert "message queue is full (2 jobs waiting)" in refused.json()["detail"]


def test_timeout_is_504_and_the_worker_is_free_again(tight):
    with tight.client() as client:
        started = time.monotonic()
        response = client.post("/put", json={"data": "slow", "seconds": 30})
        assert response.status_code == 504
        assert time.monotonic() - started < MESSAGE_TIMEOUT + 5  # not the job's 30 s
        detail = response.json()["detail"]
        assert "in the queue and ran" in detail and "JOBQUEUE_MESSAGE_TIMEOUT" in detail
        # Had the job kept running, this one would wait behind it on the only worker past
        # its own 2 s timeout, and get a 504 too.
        response = client.post("/put", json={"data": "next", "seconds": 0})
        assert response.status_code == 200
        assert response.json()["data"]["result"]["workerName"] == "message-worker-1"
        assert client.get("/health").json()["queues"]["message"]["busy"] == 0


# 0.02 s: gone before the server starts watching for it (put.WATCH_AFTER_SECONDS).
@pytest.mark.parametrize("leave_after", [0.02, 0.5])
def test_client_disconnect_cancels_the_job(tight, leave_after):
    def ended(outcome: str) -> float:
        return value(scrape(f"{tight.url}/metrics"), "jobqueue_jobs_total", kind="message",
                     outcome=outcome)

    cancelled, deadline = ended("cancelled"), ended("deadline")
    with tight.client(timeout=httpx.Timeout(5, read=leave_after)) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/put", json={"data": "abandoned", "seconds": 30})
    # Ended by its client's leaving, not by its 2 s timeout (which counts as a deadline).
    eventually(lambda: ended("cancelled") == cancelled + 1)
    assert ended("deadline") == deadline
    assert "client disconnected" in tight.log()
    with tight.client() as client:
        assert client.post("/put", json={"data": "next", "seconds": 0}).status_code == 200


def test_video_timeout_kills_ffmpeg(tight):
    with tight.client() as client, open(DATA / "sample.mp4", "rb") as video:
        # Upscaling to 4K takes several seconds: far past the 1 s video timeout.
        response = client.post("/put", data={"jobType": "video", "width": "3840"},
                               files={"file": ("clip.mp4", video, "video/mp4")})
        assert response.status_code == 504, response.text
        job_id = response.json()["detail"].split()[1]
        folder = tight.out_dir / job_id
        deadline = time.monotonic() + 1.0
        while (tight.children("ffmpeg") or folder.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tight.children("ffmpeg") == []
        assert not folder.exists(), "a cancelled job's folder is removed"
        assert client.get("/health").json()["queues"]["video"]["busy"] == 0


def test_rate_limit_answers_429_with_headers(tmp_path):
    with run_server(tmp_path, rate_limit="3/minute") as server, server.client() as client:
        for _ in range(3):
            ok = client.post("/jobs", json={"data": "x", "seconds": 0})
            assert ok.status_code == 202
            assert "Retry-After" not in ok.headers, "only 429 and 503 say when to retry"
        limited = client.post("/jobs", json={"data": "x", "seconds": 0})
        assert limited.status_code == 429
        assert int(limited.headers["Retry-After"]) > 0
        assert limited.headers["X-RateLimit-Limit"] == "3"
        assert limited.headers["X-RateLimit-Remaining"] == "0"
        assert "Rate limit exceeded" in limited.json()["detail"]
        assert client.get("/health").status_code == 200, "only job submission is limited"


def test_rate_limit_counts_each_jobs_retries_apart(tmp_path):
    """As slowapi counted by URL: each job's POST /jobs/{id}/retry has a budget of its own,
    and none of them is /put's or POST /jobs'. A retry counts whatever its answer (here 409,
    for jobs that succeeded), as a submission does."""
    with run_server(tmp_path, rate_limit="2/minute") as server, server.client() as client:
        first, second = (client.post("/jobs", json={"data": "x", "seconds": 0}).json()["id"]
                         for _ in range(2))
        assert client.post("/jobs", json={"seconds": 0}).status_code == 429
        for _ in range(2):
            assert client.post(f"/jobs/{first}/retry").status_code == 409
        limited = client.post(f"/jobs/{first}/retry")
        assert limited.status_code == 429 and limited.headers["X-RateLimit-Limit"] == "2"
        assert client.post(f"/jobs/{second}/retry").status_code == 409, "its own budget"
        assert client.post("/put", json={"seconds": 0}).status_code == 200, "/put's own"


def test_ctrl_c_stops_running_jobs_and_leaves_no_ffmpeg(tmp_path):
    with run_server(tmp_path, video_timeout=60) as server:
        def put_slow_video() -> int:
            with server.client() as client, open(DATA / "sample.mp4", "rb") as video:
                try:
                    return client.post("/put", data={"jobType": "video", "width": "3840"},
                                       files={"file": ("clip.mp4", video)}).status_code
                except httpx.TransportError:
                    return 0

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(put_slow_video)
            deadline = time.monotonic() + 10
            while not server.children("ffmpeg") and time.monotonic() < deadline:
                time.sleep(0.05)
            [ffmpeg_pid] = server.children("ffmpeg")
            server.process.send_signal(signal.SIGINT)
            server.process.wait(15)
            assert answer.result() != 200
    deadline = time.monotonic() + 2
    while Path(f"/proc/{ffmpeg_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{ffmpeg_pid}").exists(), "ffmpeg outlived the server"
    assert "workers stopped" in server.log()
