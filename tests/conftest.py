"""Fixtures that start the real server the way a user does: python src/main.py --port P."""

from __future__ import annotations

import itertools
import os
import random
import re
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
from typing import TYPE_CHECKING

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobqueue.local import cluster

if TYPE_CHECKING:
    from jobqueue.local.postgres import LocalPostgres

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
# Modules of job kinds the tests serve by import path (JOBQUEUE_KINDS=module:ATTRIBUTE): on
# the PYTHONPATH of every server and worker a test starts.
TEST_KINDS = ROOT / "tests" / "kinds"
# The example kinds' packages: installed into the venv (make examples) for their entry points,
# and imported from this checkout wherever that install points (a venv shared by checkouts).
EXAMPLES = [ROOT / "examples" / "ocr", ROOT / "examples" / "digits"]
KINDS_PATH = os.pathsep.join(str(path) for path in [TEST_KINDS, *EXAMPLES])
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


def scrape(url: str, token: str | None = None) -> dict[tuple, float]:
    """Every sample of a /metrics answer: (name, sorted labels) -> value."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    answer = httpx.get(url, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.text)
            for sample in family.samples}


def value(samples: dict[tuple, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def eventually(condition, seconds: float = 30) -> None:
    """Until `condition()` holds (polled every 0.1 s); fails after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "never got there"
        time.sleep(0.1)


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
# a client's connection before the server binds it. (Another test session on the same machine
# can: run_server then starts again on the next port.)
PORT_BLOCK = 2000
BLOCKS = 6  # 20000-31999
_worker = int(re.sub(r"\D", "", os.environ.get("PYTEST_XDIST_WORKER", "")) or 0) % BLOCKS
_first = 20000 + PORT_BLOCK * _worker
_start = _first + random.randrange(PORT_BLOCK)
_ports = itertools.chain(range(_start, _first + PORT_BLOCK), range(_first, _start))


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
def run_server(tmp_path: Path, env: dict[str, str] | None = None,
               **settings: object) -> Iterator[Server]:
    """Start `python src/main.py` on a free loopback port with JOBQUEUE_* settings, and
    `env`'s other variables (OTEL_*) on top of this process's environment."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    extra = env or {}
    # No shutdown grace unless a test asks for one: stopping a test server should not wait.
    env = {**os.environ, "PYTHONPATH": KINDS_PATH, "JOBQUEUE_OUT_DIR": str(tmp_path / "out"),
           "JOBQUEUE_RATE_LIMIT": "100000/minute", "JOBQUEUE_SHUTDOWN_GRACE": "0", **extra}
    env.update({f"JOBQUEUE_{key.upper()}": str(value) for key, value in settings.items()})
    for attempt in range(3):
        server = _start_server(tmp_path, env)
        try:
            cluster.wait_ready(server.url, server.process, server.log_path, STARTUP_SECONDS)
            break
        except BaseException as error:
            cluster.stop([server.process], 15, signal.SIGINT)
            # Another test session's server took the port first: start on the next one.
            if "address already in use" not in str(error) or attempt == 2:
                raise
    try:
        yield server
    finally:
        cluster.stop([server.process], 15, signal.SIGINT)


def _start_server(tmp_path: Path, env: dict[str, str]) -> Server:
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "src/main.py", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    return Server(f"http://127.0.0.1:{port}", process, tmp_path / "out", log_path)


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
    from jobqueue.local.postgres import LocalPostgres

    folder = Path(tempfile.mkdtemp(prefix="jobqueue-pg-"))
    server = LocalPostgres(folder, port=free_port(), fast=True)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def redis(tmp_path_factory) -> Iterator[str]:
    """A redis-server (Debian's package) for rate limits shared by replicas; its URL."""
    from jobqueue.local.cluster import LocalRedis

    server = LocalRedis(tmp_path_factory.mktemp("redis"), port=free_port())
    server.start()
    yield server.url
    server.stop()
