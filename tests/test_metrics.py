"""GET /metrics after a known sequence of jobs, read with prometheus_client's own parser, in
both engines: the exact count of each outcome, summed over every process that serves metrics
(the embedded server; the replicas and the worker process of the distributed mode)."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from conftest import eventually, run_server, scrape, value
from deployments import ENGINES, deploy

ALPHA, BETA = "alpha-key-1234", "beta-key-5678"
TOKEN = "scrape-token-0123456789"


def total(scrapes: list[dict[tuple, float]], name: str, **labels: str) -> float:
    return sum(value(samples, name, **labels) for samples in scrapes)


def wait_for_status(client: httpx.Client, job_id: str, statuses: tuple[str, ...]) -> dict:
    deadline = time.monotonic() + 60
    while (job := client.get(f"/jobs/{job_id}").json())["status"] not in statuses:
        assert time.monotonic() < deadline, f"job {job_id} never reached {statuses}: {job}"
        time.sleep(0.05)
    return job


def submit(client: httpx.Client, seconds: float) -> str:
    answer = client.post("/jobs", json={"seconds": seconds})
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


@pytest.mark.parametrize("engine", ENGINES)
def test_outcomes_timings_and_queues_count_exactly(engine, request, tmp_path):
    postgres = request.getfixturevalue("postgres") if engine == "postgres" else None
    with deploy(engine, tmp_path, postgres, replicas=2, message_workers=1,
                message_queue_size=2, message_timeout=2) as cluster, \
            cluster.client(0) as first, cluster.client(1) as second:
        health = first.get("/health").json()
        sources = [f"{replica.url}/metrics" for replica in cluster.replicas]
        if engine == "postgres":  # each worker process serves its own, where /health says
            sources += [process["metrics"] for process in health["workerProcesses"]]
            assert len(sources) == 3

        for _ in range(2):
            assert first.post("/put", json={"seconds": 0}).status_code == 200
        blocker = submit(first, 60)
        wait_for_status(first, blocker, ("running",))
        queued = [submit(second, 0), submit(first, 0)]
        refused = second.post("/jobs", json={"seconds": 0})
        assert refused.status_code == 503

        # While the worker is busy: the queue as every replica sees it, the same on each.
        for source in sources[:len(cluster.replicas)]:
            samples = scrape(source)
            assert value(samples, "jobqueue_jobs_waiting", kind="message", scope="cluster") == 2
            assert value(samples, "jobqueue_jobs_running", kind="message", scope="cluster") == 1
            assert value(samples, "jobqueue_workers", kind="message", scope="cluster") == 1
            assert value(samples, "jobqueue_queue_capacity", kind="message",
                         scope="cluster") == 2
        if engine == "postgres":
            eventually(lambda: value(scrape(sources[-1]), "jobqueue_jobs_running",
                                     kind="message", scope="process") == 1)
            worker = scrape(sources[-1])
            assert value(worker, "jobqueue_workers", kind="message", scope="process") == 1
            assert value(scrape(sources[0]), "jobqueue_worker_processes", scope="cluster") == 1
            assert value(scrape(sources[0]), "jobqueue_dependency_up",
                         dependency="postgresql") == 1

        assert second.delete(f"/jobs/{queued[0]}").status_code == 200  # never started
        assert first.delete(f"/jobs/{blocker}").status_code == 200  # running
        wait_for_status(first, queued[1], ("succeeded",))
        timed_out = second.post("/put", json={"seconds": 30})
        assert timed_out.status_code == 504
        put_id = re.search(r"Job ([0-9a-f-]{36})", timed_out.json()["detail"]).group(1)
        wait_for_status(first, put_id, ("cancelled",))

        expected = {"succeeded": 3, "failed": 0, "cancelled": 2, "deadline": 1, "shutdown": 0,
                    "refused": 1}
        # Counted as the record is written: wait for the state, then the counts are exact.
        deadline = time.monotonic() + 30
        while True:
            scrapes = [scrape(source) for source in sources]
            counted = {outcome: total(scrapes, "jobqueue_jobs_total", kind="message",
                                      outcome=outcome) for outcome in expected}
            if counted == expected or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert counted == expected
        assert total(scrapes, "jobqueue_jobs_total", kind="pdf2image", outcome="succeeded") == 0
        # Five jobs started and ended; the one cancelled in the queue never started.
        assert total(scrapes, "jobqueue_job_run_seconds_count", kind="message") == 5
        assert total(scrapes, "jobqueue_job_queue_seconds_count", kind="message") == 5
        assert total(scrapes, "jobqueue_job_run_seconds_bucket", kind="message", le="+Inf") == 5
        assert total(scrapes, "jobqueue_http_request_duration_seconds_count", method="DELETE",
                     route="/jobs/{job_id}", status="200") == 2
        assert total(scrapes, "jobqueue_http_request_duration_seconds_count", method="POST",
                     route="/put", status="504") == 1
        assert total(scrapes, "jobqueue_http_request_duration_seconds_count", method="POST",
                     route="/jobs", status="503") == 1
        # The chart counts the jobs that ran to an end: the three that succeeded.
        minutes = second.get("/throughput").json()["kinds"]["message"]
        assert sum(minute["finished"] for minute in minutes) == 3


def test_a_job_over_job_max_seconds_counts_as_a_deadline(tmp_path):
    with run_server(tmp_path, job_max_seconds=0.5) as server, server.client() as client:
        job_id = submit(client, 30)
        assert wait_for_status(client, job_id, ("failed",))["error"].count(
            "JOBQUEUE_JOB_MAX_SECONDS") == 1
        samples = scrape(f"{server.url}/metrics")
        assert value(samples, "jobqueue_jobs_total", kind="message", outcome="deadline") == 1
        assert value(samples, "jobqueue_jobs_total", kind="message", outcome="failed") == 0


def test_without_a_token_metrics_answer_only_this_machine_directly(tmp_path):
    with run_server(tmp_path) as server, server.client() as client:
        assert client.get("/metrics").status_code == 200  # a loopback server, a local peer
        # A reverse proxy on this host would make every client look local.
        for header in ("X-Forwarded-For", "X-Real-IP", "Forwarded"):
            refused = client.get("/metrics", headers={header: "203.0.113.9"})
            assert refused.status_code == 403, header
            assert "JOBQUEUE_METRICS_TOKEN" in refused.json()["detail"]
        # Request durations by route template; Starlette's own routes by their path, a mount
        # by its prefix, and a path no route takes as "unmatched", never as itself.
        assert client.get("/docs").status_code == 200
        assert client.get("/static/uPlot.min.css").status_code == 200
        assert client.get("/no/such/path-1234").status_code == 404
        routes = {dict(labels)["route"] for (name, labels) in scrape(f"{server.url}/metrics")
                  if name == "jobqueue_http_request_duration_seconds_count"}
        assert {"/docs", "/static", "unmatched", "/metrics"} <= routes
        assert not any("1234" in route for route in routes)


def test_the_rollup_reads_run_times_to_within_six_percent():
    from jobqueue import rollup
    from jobqueue.metrics import Outcome, outcome
    for seconds in (0.00013, 0.0011, 0.0123, 0.31, 7.5, 1800.0):
        row = rollup.key("o", "message", "succeeded", 100.0, 100.0 + seconds)
        (shown,) = {f.p50_seconds for f in rollup.figures([("message", row[2], row[3], 1)])}
        assert seconds / 1.06 <= shown <= seconds * 1.06, (seconds, shown)
    tiny = rollup.key("o", "message", "succeeded", 100.0, 100.00001)
    assert rollup.figures([("message", tiny[2], tiny[3], 1)])[0].p50_seconds == 0.0001
    assert rollup.key("o", "message", "cancelled", 100.0, 101.0) is None
    # The first stop decides: a client's cancel before the run-time limit stays a cancel.
    assert outcome("failed", "timed_out", None) is Outcome.DEADLINE
    assert outcome("failed", "timed_out", "cancelled") is Outcome.CANCELLED
    assert outcome("failed", "bad_input", "cancelled") is Outcome.FAILED
    assert outcome("cancelled", None, "deadline") is Outcome.DEADLINE
    assert outcome("cancelled", None, None) is Outcome.CANCELLED


def test_the_token_guards_metrics_which_no_limit_or_key_blocks(tmp_path):
    with run_server(tmp_path, api_keys=f"{ALPHA},{BETA}", rate_limit="2/minute",
                    metrics_token=TOKEN) as server, \
            server.client(headers={"X-API-Key": ALPHA}) as alpha, \
            server.client(headers={"X-API-Key": BETA}) as beta, \
            server.client(headers={"X-API-Key": "not-a-key"}) as stranger:
        url = f"{server.url}/metrics"
        assert httpx.get(url).status_code == 401
        wrong = httpx.get(url, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "JOBQUEUE_METRICS_TOKEN" in wrong.json()["detail"]
        assert alpha.get("/metrics").status_code == 401, "an API key is no metrics token"

        answers = [alpha.post("/put", json={"seconds": 0.3}).status_code for _ in range(3)]
        assert answers == [200, 200, 429]
        # The chart's figures are per key: alpha's two jobs, none of beta's.
        mine = alpha.get("/throughput").json()
        assert sum(minute["finished"] for minute in mine["kinds"]["message"]) == 2
        # Run times are read to within 6% (rollup.py), and these jobs ran 0.3 s at least.
        assert all(minute["p95Seconds"] >= minute["p50Seconds"] >= 0.3 / 1.06
                   for minute in mine["kinds"]["message"])
        assert beta.get("/throughput").json()["kinds"]["message"] == []
        assert httpx.get(f"{server.url}/throughput").status_code == 401

        # The wrong-key lockout: 20 a minute from one address (every key's, then), then 429.
        tries = [stranger.get("/jobs").status_code for _ in range(21)]
        assert tries == [401] * 20 + [429]

        samples = scrape(url, TOKEN)  # over the rate limit and locked out: still answered
        assert value(samples, "jobqueue_rate_limited_total", limit="submit") == 1
        assert value(samples, "jobqueue_rate_limited_total", limit="wrong_key") == 1
        assert value(samples, "jobqueue_jobs_total", kind="message", outcome="succeeded") == 2
