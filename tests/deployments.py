"""Both ways to run, started for real: the embedded server (one process), or the distributed
mode (API replicas and worker processes on a PostgreSQL of the tests' own, each test module a
database of its own) — through the same `Deployment`, so one test can run against both."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from conftest import KINDS_PATH, Server, free_port, run_server
from jobqueue.local import cluster
from jobqueue.local.postgres import LocalPostgres

ENGINES = ["embedded", "postgres"]


def settings_env(out_dir: Path, settings: dict[str, object],
                 extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment run_server gives a test server, for replicas and workers too; `extra`:
    other variables (OTEL_*)."""
    env = {**os.environ, "PYTHONPATH": KINDS_PATH,
           "JOBQUEUE_OUT_DIR": str(out_dir), "JOBQUEUE_RATE_LIMIT": "100000/minute",
           "JOBQUEUE_SHUTDOWN_GRACE": "0", **(extra or {})}
    env.update({f"JOBQUEUE_{key.upper()}": str(value) for key, value in settings.items()})
    return env


@dataclass
class Deployment:
    """Replicas answer HTTP (the embedded mode has one, which also runs the jobs); workers are
    the distributed mode's worker processes."""

    engine: str
    replicas: list[Server]
    folder: Path
    env: dict[str, str] = field(default_factory=dict)
    workers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def server(self) -> Server:
        return self.replicas[0]

    @property
    def out_dir(self) -> Path:
        return self.folder / "out"

    def client(self, replica: int = 0, **kwargs) -> httpx.Client:
        return self.replicas[replica % len(self.replicas)].client(**kwargs)

    def start_worker(self, kinds: list[str] | None = None, **settings: object) -> subprocess.Popen:
        env = {**self.env, **{f"JOBQUEUE_{k.upper()}": str(v) for k, v in settings.items()}}
        log_path = self.folder / f"worker-{len(self.workers) + 1}.log"
        worker = cluster.start_worker(env, log_path, kinds)
        worker.log_path = log_path
        self.workers.append(worker)
        return worker

    def start_replica(self) -> Server:
        for attempt in range(3):
            port = free_port()
            log_path = self.folder / f"replica-{port}.log"
            process = cluster.start_replica(self.env, port, log_path)
            server = Server(f"http://127.0.0.1:{port}", process, self.out_dir, log_path)
            self.replicas.append(server)  # stopped with the others if it fails to start
            try:
                cluster.wait_ready(server.url, process, log_path)
                return server
            except RuntimeError as error:  # a port taken by another test session: next one
                if "address already in use" not in str(error) or attempt == 2:
                    raise
                self.replicas.remove(server)

    def job_processes(self) -> list[subprocess.Popen]:
        """The processes that run jobs: the workers, or the embedded server."""
        return self.workers if self.engine == "postgres" else [self.server.process]

    def children(self, name: str) -> list[int]:
        """Live child processes called `name` of whatever runs the jobs."""
        return [pid for process in self.job_processes() for pid in children_of(process.pid, name)]

    def logs(self) -> str:
        paths = [server.log_path for server in self.replicas]
        paths += [worker.log_path for worker in self.workers]
        return "\n".join(path.read_text(errors="replace") for path in paths if path.exists())


def children_of(parent: int, name: str) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, _, rest = text.partition("(")[2].rpartition(")")
        fields = rest.split()
        if comm == name and int(fields[1]) == parent and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


@contextmanager
def deploy(engine: str, folder: Path, postgres: LocalPostgres | None = None,
           database_url: str | None = None, replicas: int = 1, workers: int = 1,
           worker_kinds: list[str] | None = None, env: dict[str, str] | None = None,
           **settings: object) -> Iterator[Deployment]:
    """The embedded server, or `replicas` API replicas and `workers` worker processes sharing
    one out/ folder and a database (`database_url`, or a new one on `postgres`); `env`: other
    variables than JOBQUEUE_* settings for every process (OTEL_*)."""
    folder.mkdir(parents=True, exist_ok=True)
    if engine == "embedded":
        with run_server(folder, env, **settings) as server:
            yield Deployment(engine, [server], folder)
        return
    url = database_url or postgres.new_database()
    deployment = Deployment(engine, [], folder,
                            settings_env(folder / "out", {**settings, "database_url": url}, env))
    try:
        # Workers first: the first replica to start makes the schema either way.
        for _ in range(workers):
            deployment.start_worker(worker_kinds)
        for _ in range(replicas):
            deployment.start_replica()
        yield deployment
    finally:
        processes = [server.process for server in deployment.replicas] + deployment.workers
        cluster.stop(processes, 15)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()

