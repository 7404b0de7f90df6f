"""A bounded burst at ten times every queue's capacity: only 200/202/503/429 answers, /health
answering throughout, and threads, open files, child processes and memory back to their
baseline. How fast /health answers under load is a benchmark's business (bench/
responsiveness.py), not a test's: a shared CI machine would make that figure flaky."""

from __future__ import annotations

import concurrent.futures
import threading
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
def resources(server: Server) -> dict[str, int]:
    """What the server process holds: threads, open files, live children, memory (KB)."""
    proc = Path(f"/proc/{server.process.pid}")
    status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines())
    children = sum(len(server.children(name)) for name in ("ffmpeg", "ffprobe", "pdftoppm",
                                                             "pdfinfo", "python", "setpriv",
                                                             "prlimit"))
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

        health: list[int] = []
        done = threading.Event()

        def watch_health() -> None:
            with server.client() as client:
                while not done.is_set():
                    health.append(client.get("/health").status_code)
                    time.sleep(0.02)

        watcher = threading.Thread(target=watch_health)
        watcher.start()
        try:
            answers = burst(server, 10)
        finally:
            done.set()
            watcher.join()
        assert health and set(health) == {200}, "/health answers all through the burst"
        idle(server)

        assert set(answers) <= ALLOWED, answers
        assert answers[503] > 0, "ten times capacity must overflow some queue"
        assert answers[200] + answers[202] > 0

        after = settle(server)
        assert after["children"] == 0
        assert after["threads"] <= baseline["threads"] + 2, (baseline, after)
        assert after["fds"] <= baseline["fds"] + 2, (baseline, after)
        assert after["rss_kb"] - baseline["rss_kb"] < 40_000, (baseline, after)
        print(f"answers {dict(answers)}; baseline {baseline}; after {after}")
