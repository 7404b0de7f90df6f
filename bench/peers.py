"""peers: a tiny job through HTTP against what a user would run instead, every row measured in
the same run on the same machine. A no-op job through `/put` (wrk, one thread, a POST Lua
script; 16 connections for requests a second, 1 connection for the p50), each peer behind
FastAPI with its usual client code, each a uvicorn server with its access log off on a free
loopback port (the apps are in bench/peers/):

- bare: a FastAPI app's GET /health answering a small dict (the baseline of jobqueue's /health)
- to_thread: FastAPI, a pydantic body and `await asyncio.to_thread(work)`: the few lines a user
  writes instead of the embedded server (no queue, no records)
- jobqueue embedded: `python src/main.py` (common.server), JOBQUEUE_MESSAGE_WORKERS=4, queue size
  1024, timeout 60, the rate limit raised; its /put and its /health
- arq 0.28: `await redis.enqueue_job(...)`, `await job.result(poll_delay=0.01)`, an arq worker
  process (poll_delay 0.01 too), Redis
- Celery 5.7: `work.delay(...).get()` on a thread (`asyncio.to_thread`), Redis as broker and
  result backend, a worker with `--pool threads -c 4`
- jobqueue distributed: one API replica and two worker processes of 2 slots each on a
  PostgreSQL of its own (jobqueue.local.postgres), the same settings otherwise

Celery and arq run in venvs of the bench's own (bench/.cache/peers-venv-celery and -arq, made
on first use from bench/requirements-peers-*.txt: the two need redis-py versions that cannot
share one), and Redis is started here (`redis-server --save '' --appendonly no`, on loopback)
and stopped at the end. Each peer runs alone: started, measured and stopped before the next one
starts (an idle peer is not idle: arq's worker polls Redis every 10 ms), `runs` rounds through
all of them. The last column of the table is the machine's busy time over 1 s with the peer up
and idle, just after its warm-up (a noisy reading: anything else on the VM shows in it).

wrk runs one thread on the same two cores as the servers: each run reads wrk's own CPU time
(it is never the bottleneck while it stays well under one core) and the whole machine's busy
time (/proc/stat), from which the CPU per request of everything else (server, workers, Redis,
PostgreSQL).

`run(runs, seconds, smoke=True)` runs only the rows that need nothing extra (bare, to_thread,
jobqueue embedded): no venvs, no Redis, no PostgreSQL.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

import httpx

from common import CACHE, ROOT, free_port, server, table
from jobqueue.local import cluster
from jobqueue.local.postgres import LocalPostgres
from overhead import PUT_SCRIPT, wrk

PEERS = ROOT / "bench" / "peers"
CONNECTIONS = (16, 1)
SETTINGS = {"message_workers": 4, "message_queue_size": 1024, "message_timeout": 60}
DIST_WORKERS, DIST_SLOTS = 2, 2
START_SECONDS = 60


@dataclass
class Target:
    """One row: a URL to drive, with the POST script or without (GET)."""

    label: str
    url: str
    post: bool
    samples: dict[int, list[dict]] = field(default_factory=dict)


def peer_venv(name: str) -> Path:
    """bench/.cache/peers-venv-`name` with bench/requirements-peers-`name`.txt, made (again)
    when the requirements have changed."""
    requirements = ROOT / "bench" / f"requirements-peers-{name}.txt"
    venv = CACHE / f"peers-venv-{name}"
    stamp = venv / ".requirements-sha256"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text() != digest:
        shutil.rmtree(venv, ignore_errors=True)
        print(f"peers: making {venv} (pip install -r {requirements.name})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", "-r", str(requirements)], check=True)
        stamp.write_text(digest)
    return venv / "bin" / "python"


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A process of the bench (in bench/peers/, its output to `log`) that dies with us."""
    with log.open("ab") as out:
        process = subprocess.Popen(["setpriv", "--pdeathsig", "KILL", "--", *args], cwd=PEERS,
                                   env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT)
    process.log = log
    return process


def wait_for(url: str, processes: list[subprocess.Popen], log: Path, post: bool) -> None:
    """Until `url` answers 200 (a POST of a no-op job, or a GET)."""
    deadline = time.monotonic() + START_SECONDS
    while True:
        try:
            answer = (httpx.post(url, json={"data": "", "seconds": 0}, timeout=5) if post
                      else httpx.get(url, timeout=5))
            if answer.status_code == 200:
                return
        except httpx.TransportError:
            pass
        if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
            logs = [log] + [p.log for p in processes if p.poll() is not None and p.log != log]
            raise RuntimeError(f"{url} did not start:\n"
                               + "\n".join(f"{p}:\n{p.read_text()[-2000:]}" for p in logs))
        time.sleep(0.2)


@contextlib.contextmanager
def uvicorn(python: str | Path, module: str, log: Path, env: dict[str, str] | None = None,
            workers: list[subprocess.Popen] = (), path: str = "/put",
            post: bool = True) -> Iterator[str]:
    """`module`:app of bench/peers/ under uvicorn, access log off; yields the URL of `path`."""
    port = free_port()
    process = start([str(python), "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port),
                     "--no-access-log", f"{module}:app"], log, env)
    url = f"http://127.0.0.1:{port}{path}"
    try:
        wait_for(url, [process, *workers], log, post)
        yield url
    finally:
        cluster.stop([process, *workers], 15)


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed; `make bench` installs it")
    port = free_port()
    process = start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no"], folder / "redis.log")
    deadline = time.monotonic() + 20
    while subprocess.run(["redis-cli", "-p", str(port), "ping"],
                         capture_output=True).stdout.strip() != b"PONG":
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("redis-server did not start: "
                               + (folder / "redis.log").read_text()[-2000:])
        time.sleep(0.1)
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        cluster.stop([process], 10)


@contextlib.contextmanager
def distributed(folder: Path) -> Iterator[str]:
    """One API replica and DIST_WORKERS worker processes on a PostgreSQL of their own; yields
    the URL of the replica's /put."""
    # Not inside `folder`: the server runs as the postgres user when we are root (scaling.py).
    database = LocalPostgres(Path(tempfile.mkdtemp(prefix="jobqueue-bench-peers-pg-")))
    database.start()
    out_dir = folder / "dist-out"
    env = {**os.environ, "JOBQUEUE_DATABASE_URL": database.url, "JOBQUEUE_OUT_DIR": str(out_dir),
           "JOBQUEUE_RATE_LIMIT": "10000000/minute", "JOBQUEUE_SHUTDOWN_GRACE": "0",
           **{f"JOBQUEUE_{k.upper()}": str(v) for k, v in SETTINGS.items()},
           "JOBQUEUE_MESSAGE_WORKERS": str(DIST_SLOTS)}
    logs = folder / "dist-logs"
    processes = [cluster.start_worker(env, logs / f"worker-{n}.log", ["message"])
                 for n in range(DIST_WORKERS)]
    port = free_port()
    processes.append(cluster.start_replica(env, port, logs / "replica.log"))
    url = f"http://127.0.0.1:{port}"
    try:
        cluster.wait_ready(url, processes[-1], logs / "replica.log")
        deadline = time.monotonic() + 30  # until every worker's heartbeat is in
        while (httpx.get(f"{url}/health").json()["queues"]["message"]["workers"]
               < DIST_WORKERS * DIST_SLOTS):
            if time.monotonic() > deadline:
                raise RuntimeError("the distributed workers did not start")
            time.sleep(0.1)
        yield f"{url}/put"
    finally:
        cluster.stop(processes, 15)
        database.stop()
        shutil.rmtree(database.folder, ignore_errors=True)


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores; not idle, iowait or steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def measure(target: Target, connections: int, seconds: float, script: Path) -> dict:
    """One wrk run, with wrk's CPU share of one core and the rest of the machine's CPU
    milliseconds per request."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy, started = busy_seconds(), time.monotonic()
    result = wrk(target.url, connections, seconds, script if target.post else None)
    wall, busy = time.monotonic() - started, busy_seconds() - busy
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    requests = max(result["rps"] * seconds, 1)
    if result["errors"]:
        answer = (httpx.post(target.url, json={"data": "", "seconds": 0}, timeout=60)
                  if target.post else httpx.get(target.url, timeout=60))
        raise RuntimeError(f"{target.label}: {result['errors']} answers were not 2xx, such as "
                           f"{answer.status_code} {answer.text[:500]}")
    return {**result, "wrk_core": wrk_cpu / wall, "machine_cores": busy / wall,
            "others_cpu_ms": max(busy - wrk_cpu, 0) * 1000 / requests}


@contextlib.contextmanager
def embedded_server() -> Iterator[list[str]]:
    with server(**SETTINGS) as srv:
        yield [f"{srv.url}/put", f"{srv.url}/health"]


@contextlib.contextmanager
def arq_peer(folder: Path, redis: str) -> Iterator[list[str]]:
    python, env = peer_venv("arq"), {"REDIS_URL": f"{redis}/0"}
    worker = start([str(python), "-m", "arq", "arq_app.WorkerSettings"],
                   folder / "arq-worker.log", env)
    with uvicorn(python, "arq_app", folder / "arq.log", env, [worker]) as url:
        yield [url]


@contextlib.contextmanager
def celery_peer(folder: Path, redis: str) -> Iterator[list[str]]:
    python, env = peer_venv("celery"), {"REDIS_URL": f"{redis}/1"}
    worker = start([str(python), "-m", "celery", "-A", "celery_app:celery", "worker",
                    "--pool", "threads", "-c", "4", "--loglevel", "WARNING"],
                   folder / "celery-worker.log", env)
    with uvicorn(python, "celery_app", folder / "celery.log", env, [worker]) as url:
        yield [url]


@contextlib.contextmanager
def one_url(context) -> Iterator[list[str]]:
    with context as url:
        yield [url]


def run(runs: int, seconds: int = 5, smoke: bool = False) -> dict:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed; `make bench` installs it with apt-get")
    seconds = max(1, round(seconds))  # wrk's -d takes whole seconds
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="jobqueue-peers-")))
        script = folder / "put.lua"
        script.write_text(PUT_SCRIPT)
        python = sys.executable
        # Each peer with the rows it serves: started, measured and stopped before the next, so
        # that no other peer's idle work (arq's worker polls Redis every 10 ms) shares the
        # cores with it; one round after another.
        peers = [
            (lambda: one_url(uvicorn(python, "bare", folder / "bare.log", path="/health",
                                     post=False)),
             [Target("bare FastAPI: GET /health", "", False)]),
            (lambda: one_url(uvicorn(python, "to_thread", folder / "to_thread.log")),
             [Target("to_thread: FastAPI + pydantic + asyncio.to_thread, POST /put", "", True)]),
            (embedded_server, [Target("jobqueue embedded: POST /put", "", True),
                               Target("jobqueue embedded: GET /health", "", False)])]
        if not smoke:
            peer_venv("arq"), peer_venv("celery")  # made before any timing
            redis = stack.enter_context(redis_server(folder))
            peers += [
                (lambda: arq_peer(folder, redis), [Target(
                    "arq 0.28: enqueue_job + job.result(poll_delay=0.01), 1 worker process", "",
                    True)]),
                (lambda: celery_peer(folder, redis), [Target(
                    "Celery 5.7: delay().get() via asyncio.to_thread, worker --pool threads -c 4",
                    "", True)]),
                (lambda: one_url(distributed(folder)), [Target(
                    f"jobqueue distributed: POST /put, 1 replica + {DIST_WORKERS} worker "
                    f"processes of {DIST_SLOTS} slots", "", True)])]
        for _ in range(runs):
            for context, targets in peers:
                with context() as urls:
                    for target, url in zip(targets, urls, strict=True):
                        target.url = url
                        wrk(url, 4, 1, script if target.post else None)  # warm up
                    time.sleep(0.5)
                    busy, started = busy_seconds(), time.monotonic()
                    time.sleep(1)
                    idle = (busy_seconds() - busy) / (time.monotonic() - started)
                    for target in targets:
                        target.samples.setdefault("idle", []).append({"cores": idle})
                        for connections in CONNECTIONS:
                            target.samples.setdefault(connections, []).append(
                                measure(target, connections, seconds, script))
    return report([t for _, targets in peers for t in targets], runs, seconds, smoke)


def report(targets: list[Target], runs: int, seconds: float, smoke: bool) -> dict:
    med = {t.label: {c: {k: median(s[k] for s in t.samples[c]) for k in t.samples[c][0]}
                     for c in (*CONNECTIONS, "idle")} for t in targets}
    rows = []
    for target in targets:
        at16, at1 = med[target.label][16], med[target.label][1]
        rows.append([target.label, f"{at16['rps']:.0f}", f"{at16['p50']:.2f} / {at16['p99']:.2f}",
                     f"{at1['p50']:.2f}", f"{at16['others_cpu_ms']:.2f}",
                     f"{at16['wrk_core']:.2f}", f"{at16['machine_cores']:.2f}",
                     f"{med[target.label]['idle']['cores']:.2f}"])
    text = table(["peers: no-op job via HTTP (wrk)", "req/s at 16", "p50 / p99 ms at 16",
                  "p50 ms at 1", "CPU ms per request at 16 (all but wrk)",
                  "wrk's CPU at 16 (of 1 core)", "machine busy at 16 (of 2 cores)",
                  "machine busy, peer idle"], rows)

    def get(prefix: str) -> dict[int, dict] | None:
        return next((m for label, m in med.items() if label.startswith(prefix)), None)

    bare, to_thread = get("bare"), get("to_thread")
    put, health = get("jobqueue embedded: POST"), get("jobqueue embedded: GET")
    celery, dist = get("Celery"), get("jobqueue distributed")
    ratios = {"put_to_thread": put[16]["rps"] / to_thread[16]["rps"],
              "health_bare": health[16]["rps"] / bare[16]["rps"]}
    lines = [["jobqueue embedded /put ÷ to_thread, req/s at 16", f"{ratios['put_to_thread']:.2f}",
              "≥ 0.5"],
             ["jobqueue /health ÷ bare /health, req/s at 16", f"{ratios['health_bare']:.2f}",
              "≥ 0.8"],
             ["jobqueue embedded /put − to_thread, p50 at 1",
              f"{put[1]['p50'] - to_thread[1]['p50']:.2f} ms", ""]]
    if celery and dist:
        ratios["dist_celery"] = dist[16]["rps"] / celery[16]["rps"]
        ratios["dist_p50_ms"] = dist[1]["p50"]
        lines += [["jobqueue distributed ÷ Celery, req/s at 16", f"{ratios['dist_celery']:.2f}",
                   "≥ 1.5"],
                  ["jobqueue distributed, p50 at 1", f"{dist[1]['p50']:.2f} ms", "≤ 5 ms"]]
    wrk_max = max(med[t.label][c]["wrk_core"] for t in targets for c in CONNECTIONS)
    text += "\n\n" + table(["peers ratio (this run)", "value", "target"], lines)
    text += (f"\n\n{runs} round{'s' if runs > 1 else ''} of {seconds:g} s per row and connection "
             "count (medians); each peer runs alone, started before its rows and stopped after "
             "them. wrk (one thread) used at most "
             f"{wrk_max:.2f} of a core in any run, so it is not the bottleneck: each server's "
             "interpreter is (one process, so about one core, with its worker processes, "
             "Redis or PostgreSQL on the other). jobqueue runs as shipped: its access log "
             "writes a line per job (JOBQUEUE_ACCESS_LOG=jobs, to /dev/null here); the peers "
             "write none (uvicorn's access log off, Celery's worker at WARNING).")
    if smoke:
        text += ("\n\nSmoke run: only the rows that need nothing extra (bare, to_thread, "
                 "jobqueue embedded); arq, Celery and jobqueue distributed are skipped.")
    return {"name": "peers", "text": text, **ratios}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    print(run(args.runs, args.seconds, args.smoke)["text"])
