"""Fixtures that start the real server the way a user does: python src/main.py --port P."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
STARTUP_SECONDS = 20


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    out_dir: Path
    log_path: Path

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60), **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self, name: str) -> list[int]:
        """Pids of the server's live child processes called `name` (pdftoppm, ffmpeg, ...)."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            comm, _, rest = text.partition("(")[2].rpartition(")")
            fields = rest.split()
            # fields[0] is the state, fields[1] the parent pid; a zombie is not alive.
            if comm == name and int(fields[1]) == self.process.pid and fields[0] != "Z":
                pids.append(int(stat.parent.name))
        return pids


def wait_finished(client: httpx.Client, job_id: str, seconds: float = 60) -> dict:
    """Poll GET /jobs/{id} until the job has finished; its last state."""
    deadline = time.monotonic() + seconds
    while (job := client.get(f"/jobs/{job_id}").json())["status"] not in (
            "succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job {job_id} never finished: {job}"
        time.sleep(0.05)
    return job


# Test servers listen on ports below the kernel's ephemeral range (32768-60999 on Linux), from
# which outgoing connections and bind(0) draw theirs, in a block of their own per
# pytest-xdist worker: a port found free here cannot be taken by another worker's server or by
# a client's connection before the server binds it.
PORT_BLOCK = 2000
_worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_ports = iter(range(20000 + PORT_BLOCK * _worker + random.randrange(PORT_BLOCK // 2),
                    20000 + PORT_BLOCK * (_worker + 1)))


def free_port() -> int:
    """A loopback port nothing listens on, never the same twice in a session."""
    for port in _ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use
                continue
            return port
    raise RuntimeError("this test worker has used up its block of ports")


@contextmanager
def run_server(tmp_path: Path, **settings: object) -> Iterator[Server]:
    """Start `python src/main.py` on a free loopback port with JOBQUEUE_* settings."""
    port = free_port()
    tmp_path.mkdir(parents=True, exist_ok=True)
    out_dir = tmp_path / "out"
    log_path = tmp_path / "server.log"
    # No shutdown grace unless a test asks for one: stopping a test server should not wait.
    env = {**os.environ, "JOBQUEUE_OUT_DIR": str(out_dir), "JOBQUEUE_RATE_LIMIT": "100000/minute",
           "JOBQUEUE_SHUTDOWN_GRACE": "0"}
    env.update({f"JOBQUEUE_{key.upper()}": str(value) for key, value in settings.items()})
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "src/main.py", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", process, out_dir, log_path)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited at start:\n{server.log()}")
            try:
                if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{server.log()}")
            time.sleep(0.1)
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[Server]:
    """A server with room for the concurrency tests."""
    with run_server(tmp_path_factory.mktemp("server"),
                    message_workers=4, message_queue_size=64) as server:
        yield server


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


@pytest.fixture(scope="session")
def postgres() -> Iterator["LocalPostgres"]:
    """One PostgreSQL for the whole session (Debian's package, started by the tests); each
    distributed deployment takes a database of its own on it. Its folder is not under pytest's
    tmp (whose parent only root may enter) because the server runs as the postgres user."""
    from jobqueue.localpg import LocalPostgres

    folder = Path(tempfile.mkdtemp(prefix="jobqueue-pg-"))
    server = LocalPostgres(folder, port=free_port(), fast=True)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def redis(tmp_path_factory) -> Iterator[str]:
    """A redis-server (Debian's package) for rate limits shared by replicas; its URL."""
    from jobqueue.cluster import LocalRedis

    server = LocalRedis(tmp_path_factory.mktemp("redis"), port=free_port())
    server.start()
    yield server.url
    server.stop()
