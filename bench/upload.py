"""upload memory: peak RSS growth of the server while a 600 MB upload streams to POST /jobs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from common import server, table

CHUNK = 1024 * 1024


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(runs: int, megabytes: int = 600) -> dict:
    def body():
        yield (b"--b\r\nContent-Disposition: form-data; name=\"jobType\"\r\n\r\nvideo\r\n"
               b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.mp4\"\r\n"
               b"\r\n")
        for _ in range(megabytes):
            yield b"\0" * CHUNK
        yield b"\r\n--b--\r\n"

    with server() as srv:
        baseline = rss_mb(srv.process.pid)
        peak = baseline
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_mb(srv.process.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.perf_counter()
        # Zeros are no video: the server stores all of it, then answers 415.
        status = httpx.post(f"{srv.url}/jobs", content=body(), timeout=600,
                            headers={"Content-Type": "multipart/form-data; boundary=b"}).status_code
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
    growth = peak - baseline
    text = table([f"upload memory: {megabytes} MB to POST /jobs", "value"],
                 [["answer", status], ["MB/s", f"{megabytes / seconds:.0f}"],
                  ["RSS before, MB", f"{baseline:.1f}"], ["peak RSS growth, MB (target < 64)",
                                                          f"{growth:.1f}"]])
    return {"name": "upload", "text": text, "growth_mb": growth}


if __name__ == "__main__":
    print(run(1)["text"])
