"""streams: /health latency with JOBQUEUE_MAX_STREAMS event streams open (the cap full) while
jobs change, then through a wave of every stream closing and opening again.

The streams are held by a separate process (asyncio, one connection each), and /health is
timed from this one, so neither side waits for the other's interpreter.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx

from common import percentile, server, table

STREAMS = 200
INTERVAL = 0.02
HOLDER = """
import asyncio, sys
import httpx
url, count, hold, wave = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"

async def stream(client, number, seconds):
    async with client.stream("GET", "/events") as response:
        assert response.status_code == 200, response.status_code
        deadline = asyncio.get_running_loop().time() + seconds
        async for _ in response.aiter_bytes():
            if asyncio.get_running_loop().time() > deadline:
                return

async def main():
    limits = httpx.Limits(max_connections=count + 10)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=None) as client:
        await asyncio.gather(*(stream(client, n, hold) for n in range(count)))
        print("open", flush=True)
        if wave:  # all closed above; all open again at once
            await asyncio.gather(*(stream(client, n, hold) for n in range(count)))

asyncio.run(main())
"""


def sample_health(url: str, seconds: float) -> list[float]:
    latencies = []
    with httpx.Client(base_url=url, timeout=30) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            assert client.get("/health").status_code == 200
            latencies.append((time.perf_counter() - started) * 1e3)
            time.sleep(INTERVAL)
    return latencies


def churn(url: str, stop: threading.Event) -> None:
    """Short jobs all along, so every stream has changes to send."""
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            client.post("/jobs", json={"data": "x", "seconds": 0.05})
            time.sleep(0.05)


def run(runs: int, seconds: float = 10, streams: int = STREAMS) -> dict:
    rows = []
    with server(max_streams=streams, message_queue_size=1000) as srv:
        stop = threading.Event()
        churner = threading.Thread(target=churn, args=(srv.url, stop))
        churner.start()
        try:
            for phase, wave in (("cap full", False), ("close-and-reopen wave", True)):
                holder = subprocess.Popen(
                    [sys.executable, "-c", HOLDER, srv.url, str(streams), str(seconds),
                     "1" if wave else "0"], stdout=subprocess.PIPE, text=True)
                try:
                    time.sleep(1)  # the streams connect
                    latencies = sample_health(srv.url, seconds * (2 if wave else 1))
                finally:
                    holder.wait(seconds * 3 + 30)
                if holder.returncode != 0:
                    raise RuntimeError(f"the stream holder failed ({phase})")
                rows.append([phase, len(latencies), f"{percentile(latencies, .5):.2f}",
                             f"{percentile(latencies, .99):.2f}", f"{max(latencies):.2f}"])
        finally:
            stop.set()
            churner.join()
    text = table([f"streams: /health with {streams} event streams open", "samples", "p50 ms",
                  "p99 ms (target ≤ 50)", "max ms"], rows)
    return {"name": "streams", "text": text}


if __name__ == "__main__":
    print(run(1)["text"])
