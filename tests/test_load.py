"""A bounded burst at ten times every queue's capacity: only 200/202/503/429 answers, /health
fast throughout, and threads, open files, child processes and memory back to their baseline."""

from __future__ import annotations

import concurrent.futures
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from conftest import Server, run_server

KINDS = {  # job kind: (body, workers, queue size)
    "message": ({"jobType": "message", "seconds": 0.2}, 2, 5),
    "pdf2image": ({"jobType": "pdf2image", "dpi": 30}, 2, 5),
    "video": ({"jobType": "video", "width": 64}, 1, 3),
}
ALLOWED = {200, 202, 429, 503}
WATCH_HEALTH = """
import json, os, sys, time
import httpx
url, stop = sys.argv[1], sys.argv[2]
samples = []
with httpx.Client(base_url=url) as client:
    while not os.path.exists(stop):
        started = time.perf_counter()
        assert client.get("/health").status_code == 200
        samples.append((time.perf_counter() - started) * 1000)
        time.sleep(0.02)
print(json.dumps(samples))
"""


def resources(server: Server) -> dict[str, int]:
    """What the server process holds: threads, open files, live children, memory (KB)."""
    proc = Path(f"/proc/{server.process.pid}")
    status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines())
    children = sum(len(server.children(name)) for name in ("ffmpeg", "ffprobe", "pdftoppm",
                                                             "pdfinfo"))
    return {"threads": int(status["Threads"]), "fds": len(list((proc / "fd").iterdir())),
            "children": children, "rss_kb": int(status["VmRSS"].split()[0])}


def burst(server: Server, factor: int) -> Counter:
    """`factor` times each queue's capacity (workers + queue size) in requests, all at once,
    half to /put and half to /jobs."""
    requests = []
    for body, workers, queue_size in KINDS.values():
        for number in range(factor * (workers + queue_size)):
            requests.append(("/put" if number % 2 else "/jobs", body))
    answers: Counter = Counter()
    with server.client(timeout=60) as client:
        def send(request) -> int:
            return client.post(request[0], json=request[1]).status_code
        with concurrent.futures.ThreadPoolExecutor(48) as pool:
            for status in pool.map(send, requests):
                answers[status] += 1
    return answers


def idle(server: Server, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    with server.client() as client:
        while any(queue["busy"] or queue["queued"]
                  for queue in client.get("/health").json()["queues"].values()):
            assert time.monotonic() < deadline, "jobs still running long after the burst"
            time.sleep(0.1)


def settle(server: Server) -> dict[str, int]:
    """Resources once the burst's helper threads are gone. The request thread pool (AnyIO's)
    keeps idle threads for 10 s and lets them go at its next use, so wait, then use it."""
    time.sleep(10.5)
    with server.client() as client:
        finished = client.get("/jobs", params={"status": "succeeded", "limit": 1}).json()
        client.delete(f"/jobs/{finished['items'][0]['id']}")  # runs rmtree in the pool
    time.sleep(0.5)
    return resources(server)


def test_ten_times_capacity_burst(tmp_path):
    settings = {"rate_limit": "100000/minute"}
    for kind, (_, workers, queue_size) in KINDS.items():
        settings[f"{kind}_workers"] = workers
        settings[f"{kind}_queue_size"] = queue_size
    with run_server(tmp_path, **settings) as server:
        burst(server, 1)  # warm-up: thread pools, imports and caches reach their working size
        idle(server)
        baseline = settle(server)

        # /health is timed from its own process: in this one, the 48 sending threads would
        # make it wait for the GIL and the test would time itself, not the server.
        stop = tmp_path / "stop-watching"
        watcher = subprocess.Popen([sys.executable, "-c", WATCH_HEALTH, server.url, str(stop)],
                                   stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(0.3)
            answers = burst(server, 10)
            idle(server)
        finally:
            stop.touch()
            output, _ = watcher.communicate(timeout=30)
        health_ms = json.loads(output)

        assert set(answers) <= ALLOWED, answers
        assert answers[503] > 0, "ten times capacity must overflow some queue"
        assert answers[200] + answers[202] > 0
        p99 = statistics.quantiles(health_ms, n=100)[98]
        assert p99 < 50, f"/health p99 {p99:.1f} ms during the burst"

        after = settle(server)
        assert after["children"] == 0
        assert after["threads"] <= baseline["threads"] + 2, (baseline, after)
        assert after["fds"] <= baseline["fds"] + 2, (baseline, after)
        assert after["rss_kb"] - baseline["rss_kb"] < 40_000, (baseline, after)
        print(f"answers {dict(answers)}; /health p99 {p99:.1f} ms over {len(health_ms)} "
              f"samples; baseline {baseline}; after {after}")
