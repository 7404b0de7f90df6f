"""scaling: does adding worker processes add throughput? The distributed mode (one API replica,
PostgreSQL, 1, 2 and 3 worker processes of one job slot each) runs 24 message jobs of 0.5 s
submitted at once through the API; the embedded server with as many worker threads runs the
same jobs in the same run, as the reference a single machine gives.

Throughput is jobs per second from the first job's creation to the last one's end, both taken
from the job records, so polling adds nothing. Target: 3 workers ≥ 2.7 × one worker.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

from common import free_port, server, table
from jobqueue.local import cluster
from jobqueue.local.postgres import LocalPostgres

JOBS = 24
SECONDS = 0.5
WORKERS = (1, 2, 3)


def run_jobs(url: str, jobs: int, seconds: float) -> float:
    """Submit `jobs` message jobs at once; jobs per second, creation of the first to end of
    the last."""
    with httpx.Client(base_url=url, timeout=60) as client:
        def submit(number: int) -> str:
            answer = client.post("/jobs", json={"data": f"job {number}", "seconds": seconds})
            answer.raise_for_status()
            return answer.json()["id"]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(submit, range(jobs)))
        records = []
        deadline = time.monotonic() + 60 + jobs * seconds
        for job_id in ids:
            while (record := client.get(f"/jobs/{job_id}").json())["status"] in (
                    "queued", "running"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"job {job_id} did not finish")
                time.sleep(0.05)
            if record["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} {record['status']}")
            records.append(record)
    ends = [datetime.fromisoformat(r["finishedAt"]) for r in records]
    starts = [datetime.fromisoformat(r["createdAt"]) for r in records]
    return jobs / (max(ends) - min(starts)).total_seconds()


def distributed(database_url: str, out_dir: Path, workers: int, runs: int, jobs: int,
                seconds: float) -> list[float]:
    env = {**os.environ, "JOBQUEUE_DATABASE_URL": database_url, "JOBQUEUE_OUT_DIR": str(out_dir),
           "JOBQUEUE_RATE_LIMIT": "10000000/minute", "JOBQUEUE_MESSAGE_WORKERS": "1",
           "JOBQUEUE_MESSAGE_QUEUE_SIZE": "1000", "JOBQUEUE_SHUTDOWN_GRACE": "0"}
    logs = out_dir / "logs"
    port = free_port()
    processes = [cluster.start_worker(env, logs / f"worker-{n}.log", ["message"])
                 for n in range(workers)]
    processes.append(cluster.start_replica(env, port, logs / "replica.log"))
    url = f"http://127.0.0.1:{port}"
    try:
        cluster.wait_ready(url, processes[-1], logs / "replica.log")
        deadline = time.monotonic() + 30  # until every worker's heartbeat is in
        while httpx.get(f"{url}/health").json()["queues"]["message"]["workers"] < workers:
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not start")
            time.sleep(0.1)
        return [run_jobs(url, jobs, seconds) for _ in range(runs)]
    finally:
        cluster.stop(processes, 15)


def embedded(workers: int, runs: int, jobs: int, seconds: float) -> list[float]:
    with server(message_workers=workers, message_queue_size=1000) as srv:
        return [run_jobs(srv.url, jobs, seconds) for _ in range(runs)]


def run(runs: int, jobs: int = JOBS, seconds: float = SECONDS,
        workers: tuple[int, ...] = WORKERS) -> dict:
    rows, one = [], None
    with tempfile.TemporaryDirectory(prefix="jobqueue-bench-scaling-") as folder:
        # Not inside `folder`: the server runs as the postgres user when we are root, and
        # only root may enter `folder`.
        database = LocalPostgres(Path(tempfile.mkdtemp(prefix="jobqueue-bench-pg-")))
        database.start()
        try:
            for count in workers:
                out_dir = Path(folder) / f"out-{count}"
                rates = distributed(database.url, out_dir, count, runs, jobs, seconds)
                local = embedded(count, runs, jobs, seconds)
                rate = statistics.median(rates)
                one = one or rate
                rows.append([f"{count} worker process{'es' if count > 1 else ''}",
                             f"{rate:.2f}", f"{rate / one:.2f}",
                             f"{statistics.median(local):.2f}",
                             f"{rate / statistics.median(local):.2f}"])
        finally:
            database.stop()
            shutil.rmtree(database.folder, ignore_errors=True)
    text = table([f"scaling: {jobs} × {seconds:g} s message jobs", "distributed jobs/s",
                  "× one worker (target at 3: ≥ 2.7)", "embedded, as many threads, jobs/s",
                  "distributed ÷ embedded"], rows)
    return {"name": "scaling", "text": text}


if __name__ == "__main__":
    print(run(1)["text"])
