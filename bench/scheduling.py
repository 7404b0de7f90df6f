"""scheduling: what fair share between API keys and retries with back-off do, on the embedded
server.

Fair share under a flood: key A floods the `message` kind (one worker, JOBQUEUE_MESSAGE_WORKERS=1)
with 200 jobs of 20 ms through POST /jobs, then key B submits one job of the same kind and
priority. Figure: the time from B's submit (the client's clock, just before its POST) to B's
start (its record's startedAt; same machine, same clock). Against: the same job submitted with
key A's key, so it has the same owner as the flood: plain FIFO, what one queue gives every
client in Celery, arq or RQ. Both run on one server (JOBQUEUE_API_KEYS=a,b), alternating, each
after the queue has drained.

Retries: bench/kinds/flaky.py's `flaky` kind (one worker, Retry(attempts=3, backoff=0.01,
jitter=False), no work of its own) under wrk's /put at 64 connections, jobs that fail twice
and succeed on their third attempt (`fails: 2`) against jobs of the same kind that succeed at
once (`fails: 0`), alternating on one server. Figures: jobs/s, the server's CPU time per job
(/proc/<pid>/stat, the steadier figure on a shared machine), and at one connection the p50 of
a /put, which for a retried job includes its two back-offs (0.01 s + 0.02 s).
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import shutil
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

from common import ROOT, server, table
from overhead import wrk

KINDS_DIR = ROOT / "bench" / "kinds"  # flaky.py, imported by the server as flaky:FLAKY
KEY_A, KEY_B = "a", "b"
FLOOD, FLOOD_SECONDS = 200, 0.02
BACKOFFS = 0.01 + 0.02  # flaky's two back-offs before its third attempt
# Enough that the back-offs do not bound the throughput: a connection waits at least BACKOFFS
# per retried job, so 16 would cap it near 16 / 0.035 s = 460 jobs/s whatever the server does.
CONNECTIONS = 64
PUT_SCRIPT = """wrk.method = "POST"
wrk.body = '{"jobType": "flaky", "fails": %d}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = "a"
"""


def submit(client: httpx.Client, key: str, text: str) -> str:
    answer = client.post("/jobs", headers={"X-API-Key": key},
                         json={"jobType": "message", "data": text, "seconds": FLOOD_SECONDS})
    answer.raise_for_status()
    return answer.json()["id"]


def finished(client: httpx.Client, key: str, job_id: str, deadline: float) -> dict:
    """The job's record once it has ended (a job is seen only with its owner's key)."""
    while (record := client.get(f"/jobs/{job_id}", headers={"X-API-Key": key}).json()
           )["status"] in ("queued", "running"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} did not finish")
        time.sleep(0.02)
    if record["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} {record['status']}")
    return record


def flood_then_one(url: str, flood: int, second_key: str) -> dict:
    """Key A's flood of `flood` jobs, then one job with `second_key`: that job's wait (its
    submit to its start), how many of the flood had not started at its submit, and how many of
    those started before it."""
    with httpx.Client(base_url=url, timeout=60) as client, \
            concurrent.futures.ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda n: submit(client, KEY_A, f"a{n}"), range(flood)))
        sent = time.time()
        single = submit(client, second_key, "b")
        deadline = time.monotonic() + 30 + flood * FLOOD_SECONDS * 3
        record = finished(client, second_key, single, deadline)
        # The whole flood, once it has drained (so the next run starts on an empty queue).
        starts = [datetime.fromisoformat(finished(client, KEY_A, job_id, deadline)["startedAt"])
                  .timestamp() for job_id in ids]
    started = datetime.fromisoformat(record["startedAt"]).timestamp()
    if second_key != KEY_A and started > max(starts):
        raise RuntimeError("B's job started after the whole flood in spite of fair share")
    return {"wait": started - sent, "waiting": sum(1 for start in starts if start > sent),
            "ahead": sum(1 for start in starts if sent < start < started)}


def fair_share(runs: int, flood: int) -> tuple[str, dict]:
    samples: dict[str, list[dict]] = {"fair": [], "fifo": []}
    with server(kinds="message", api_keys=f"{KEY_A},{KEY_B}", message_workers=1,
                message_queue_size=flood + 100) as srv:
        flood_then_one(srv.url, 10, KEY_B)  # warm up
        for _ in range(runs):
            samples["fair"].append(flood_then_one(srv.url, flood, KEY_B))
            samples["fifo"].append(flood_then_one(srv.url, flood, KEY_A))
    med = {mode: {key: statistics.median(s[key] for s in runs_)
                  for key in ("wait", "waiting", "ahead")} for mode, runs_ in samples.items()}
    ratio = med["fair"]["wait"] / med["fifo"]["wait"]
    rows = [["fair share: B's own key (JOBQUEUE_API_KEYS=a,b)",
             f"{med['fair']['wait'] * 1000:.0f}",
             ", ".join(f"{s['wait'] * 1000:.0f}" for s in samples["fair"]),
             f"{med['fair']['ahead']:.0f} of {med['fair']['waiting']:.0f}"],
            ["plain FIFO: B submits with A's key (one owner, as in Celery/arq/RQ)",
             f"{med['fifo']['wait'] * 1000:.0f}",
             ", ".join(f"{s['wait'] * 1000:.0f}" for s in samples["fifo"]),
             f"{med['fifo']['ahead']:.0f} of {med['fifo']['waiting']:.0f}"]]
    text = table([f"scheduling: fair share, key A floods {flood} × {FLOOD_SECONDS * 1000:g} ms "
                  "message jobs (1 worker), then key B submits one",
                  "B's submit → start, ms (median)", "each run, ms",
                  "flood jobs started before B, of those not started at B's submit"],
                 rows)
    text += "\n\n" + table(["fair share ratio", "value"],
                           [["B's wait, fair share / plain FIFO", f"**{ratio:.3f}**"],
                            ["plain FIFO / fair share", f"{1 / ratio:.0f} ×"]])
    return text, {"fair_wait": med["fair"]["wait"], "fifo_wait": med["fifo"]["wait"],
                  "fair_ratio": ratio}


def per(part: float, whole: float) -> float:
    return part / whole if whole else math.nan


def retries(runs: int, seconds: float) -> tuple[str, dict]:
    fails = {"at once": 0, "retried": 2}
    env = {"PYTHONPATH": os.pathsep.join(
        part for part in (str(KINDS_DIR), os.environ.get("PYTHONPATH", "")) if part)}
    samples: dict[str, dict[int, list[dict]]] = {name: {CONNECTIONS: [], 1: []} for name in fails}
    with tempfile.TemporaryDirectory() as folder, \
            server(env, kinds="message,flaky:FLAKY", api_keys=f"{KEY_A},{KEY_B}") as srv:
        scripts = {}
        for name, count in fails.items():
            scripts[name] = Path(folder) / f"put-{count}.lua"
            scripts[name].write_text(PUT_SCRIPT % count)
        put, pid = f"{srv.url}/put", srv.process.pid
        for script in scripts.values():
            wrk(put, 4, 1, script)  # warm up
        for _ in range(runs):
            for connections in (CONNECTIONS, 1):
                for name, script in scripts.items():
                    result = wrk(put, connections, seconds, script, pid)
                    if result["errors"]:
                        raise RuntimeError(f"{result['errors']} /put answers were not 2xx "
                                           f"({name}, {connections} connections)")
                    samples[name][connections].append(result)
        metrics = httpx.get(f"{srv.url}/metrics").text
    retried_total = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                        if line.startswith("jobqueue_jobs_total{") and 'kind="flaky"' in line
                        and 'outcome="retried"' in line)
    med = {name: {connections: {key: statistics.median(s[key] for s in runs_)
                                for key in ("rps", "p50", "cpu_ms")}
                  for connections, runs_ in by_connections.items()}
           for name, by_connections in samples.items()}
    at_once, retried = med["at once"], med["retried"]
    # A short run on a loaded machine (the smoke's second) may finish no retried job: nan.
    ratio = per(retried[CONNECTIONS]["rps"], at_once[CONNECTIONS]["rps"])
    extra_wall = per(1, retried[CONNECTIONS]["rps"]) - per(1, at_once[CONNECTIONS]["rps"])
    extra_cpu = retried[CONNECTIONS]["cpu_ms"] - at_once[CONNECTIONS]["cpu_ms"]
    extra_p50 = retried[1]["p50"] - at_once[1]["p50"]
    rows = [[f"{name}: `fails: {fails[name]}`", f"{med[name][CONNECTIONS]['rps']:.0f}",
             f"{med[name][CONNECTIONS]['cpu_ms']:.2f}", f"{med[name][CONNECTIONS]['p50']:.1f}",
             f"{med[name][1]['p50']:.1f}"] for name in fails]
    text = table(["scheduling: retries, flaky kind (1 worker, no work) through /put (wrk)",
                  f"jobs/s at {CONNECTIONS} connections", "server CPU ms per job",
                  f"p50 ms at {CONNECTIONS}", "p50 ms at 1 connection"], rows)
    text += "\n\n" + table(
        ["retries ratio", "value"],
        [[f"jobs/s, failing twice / succeeding at once ({CONNECTIONS} connections)",
          f"**{ratio:.2f}**"],
         ["time per job added by two retries: 1 / jobs/s, retried − at once",
          f"{extra_wall * 1000:.2f} ms"],
         ["server CPU per job added by two retries", f"{extra_cpu:.2f} ms"],
         ["p50 at 1 connection added by two retries (of which back-off)",
          f"{extra_p50:.1f} ms ({BACKOFFS * 1000:.0f} ms)"],
         ["failed attempts retried, from /metrics", f"{retried_total:.0f}"]])
    return text, {"retry_ratio": ratio, "retry_ms": extra_wall * 1000,
                  "retry_cpu_ms": extra_cpu, "retry_p50_ms": extra_p50}


def run(runs: int, flood: int = FLOOD, seconds: float = 2) -> dict:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed; `make bench` installs it with apt-get")
    fair_text, fair = fair_share(runs, flood)
    retry_text, retry = retries(runs, seconds)
    return {"name": "scheduling", "text": fair_text + "\n\n" + retry_text, **fair, **retry}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="one run, a flood of 20, 1 s runs")
    args = parser.parse_args()
    print((run(1, flood=20, seconds=1) if args.smoke else run(args.runs))["text"])
