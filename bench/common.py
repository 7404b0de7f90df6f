"""Shared pieces of the benchmarks: a real server on a free loopback port, timing, tables."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CACHE = ROOT / "bench" / ".cache"
sys.path.insert(0, str(ROOT / "src"))

from jobqueue.local import cluster  # noqa: E402 - found through the path above


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    out_dir: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server(env: dict[str, str] | None = None, **settings: object) -> Iterator[Server]:
    """`python src/main.py` with JOBQUEUE_* settings (and other variables: `env`), in a
    throw-away output folder."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="jobqueue-bench-") as folder:
        env = {**os.environ, **(env or {}), "JOBQUEUE_OUT_DIR": folder,
               "JOBQUEUE_RATE_LIMIT": "10000000/minute"}
        env.update({f"JOBQUEUE_{k.upper()}": str(v) for k, v in settings.items()})
        process = subprocess.Popen(
            [sys.executable, "src/main.py", "--port", str(port)], cwd=ROOT, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the server did not start") from None
                time.sleep(0.1)
            yield Server(url, process, Path(folder))
        finally:
            cluster.stop([process], 15, signal.SIGINT)


def timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def spread(samples: list[float]) -> str:
    """median (min–max)"""
    return f"{statistics.median(samples):.2f} ({min(samples):.2f}–{max(samples):.2f})"


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def make_clip(path: Path, seconds: int, size: str) -> Path:
    """A test-pattern clip with a tone, made once and kept in bench/.cache."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["ffmpeg", "-v", "error", "-y",
             "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30:duration={seconds}",
             "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
             "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
             "-c:a", "aac", "-shortest", str(path)], check=True)
    return path
