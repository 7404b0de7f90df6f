"""Prometheus metrics: what `GET /metrics` serves, and a worker process's own port.

Counters and histograms count what happened in this process since it started: the jobs it
ran to their end (the embedded server, a worker process, a replica `--with-workers`), the
submissions it refused, its 429s and its HTTP requests. They add up across processes (`sum`).
Queue gauges are read from the engine when scraped: `scope="cluster"` for the whole queue,
which every API replica of the distributed mode reports alike (take `max` over replicas, not
`sum`); `scope="process"` for a worker process's own slots and running jobs (`sum` them).
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from enum import Enum
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics import MetricWrapperBase

from jobqueue.errors import TimedOut, category_of
from jobqueue.jobs import JobKind, JobStatus

if TYPE_CHECKING:  # a worker process never loads Starlette
    pass

# No `_created` series beside each counter and histogram: they double the scrape for a
# timestamp Prometheus does not use.
disable_created_metrics()

# Jobs take from milliseconds (a message) to an hour (JOBQUEUE_JOB_MAX_SECONDS).
JOB_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# A method outside these is labelled "other": a client's made-up methods must not each make
# a series of their own (the label sets are all kept in memory).
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
# Jobs per call of a batched kind's handler (jobs.Batch.max_size is 32 by default).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TIMED_OUT = category_of(TimedOut())


class Outcome(str, Enum):
    """How a job ended, as `jobqueue_jobs_total` counts it."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"  # by its client: DELETE, or a /put client that hung up
    DEADLINE = "deadline"  # stopped at a deadline: a /put timeout (504), JOBQUEUE_JOB_MAX_SECONDS
    SHUTDOWN = "shutdown"  # a /put job the server's shutdown ended (its client got 503)
    REFUSED = "refused"  # never accepted: 503, the kind's queue was full
    RETRIED = "retried"  # an attempt failed and the job waits for its next one (not an end)


def outcome(status: str, error_kind: str | None, cancelled_as: str | None) -> Outcome:
    """The outcome of a job that ended with `status`; `cancelled_as` is what its cancel said."""
    if status == JobStatus.SUCCEEDED.value:
        return Outcome.SUCCEEDED
    if status == JobStatus.FAILED.value and error_kind != TIMED_OUT:
        return Outcome.FAILED
    # Cancelled, or stopped at its run-time limit (TimedOut): the first stop decides, so a
    # client's cancel that came before the deadline stays a cancel.
    if cancelled_as:
        return Outcome(cancelled_as)
    return Outcome.DEADLINE if status == JobStatus.FAILED.value else Outcome.CANCELLED


class Metrics:
    """One process's metrics, in a registry of its own (never the global one)."""

    def __init__(self, kinds: Iterable[str] | Mapping[str, JobKind]):
        self.kinds = list(kinds)
        self._children: dict[tuple, MetricWrapperBase] = {}  # _child's
        self.registry = registry = CollectorRegistry()
        self.jobs = Counter("jobqueue_jobs", "Jobs that ended in this process, by outcome",
                            ["kind", "outcome"], registry=registry)
        self.queue_seconds = Histogram(
            "jobqueue_job_queue_seconds", "Seconds a job waited in its queue before it started",
            ["kind"], buckets=JOB_BUCKETS, registry=registry)
        self.run_seconds = Histogram(
            "jobqueue_job_run_seconds", "Seconds a job ran, from its start to its end",
            ["kind"], buckets=JOB_BUCKETS, registry=registry)
        self.batch_size = Histogram(
            "jobqueue_batch_size", "Jobs in each call of a batched kind's handler",
            ["kind"], buckets=BATCH_BUCKETS, registry=registry)
        self.rate_limited = Counter(
            "jobqueue_rate_limited", "Requests answered 429: over JOBQUEUE_RATE_LIMIT "
            "(limit=submit), or locked out after wrong API keys (limit=wrong_key)", ["limit"],
            registry=registry)
        self.http_seconds = Histogram(
            "jobqueue_http_request_duration_seconds", "Seconds from a request's arrival to the "
            "start of its answer (streams and downloads: to their head)",
            ["method", "route", "status"], buckets=HTTP_BUCKETS, registry=registry)
        self.webhook_deliveries = Counter(
            "jobqueue_webhook_deliveries", "Webhook delivery attempts this process made, by "
            "outcome: delivered (a 2xx), retried (failed, tried again later), failed (failed, "
            "and given up: JOBQUEUE_WEBHOOK_RETRY_HOURS)", ["outcome"], registry=registry)
        queue_labels = ["kind", "scope"]
        self.waiting = Gauge("jobqueue_jobs_waiting", "Jobs queued, not started",
                             queue_labels, registry=registry)
        self.running = Gauge("jobqueue_jobs_running", "Jobs running", queue_labels,
                             registry=registry)
        self.workers = Gauge("jobqueue_workers", "Jobs that can run at once (worker threads, "
                             "or the slots of live worker processes)", queue_labels,
                             registry=registry)
        self.capacity = Gauge("jobqueue_queue_capacity", "Jobs that may wait (the kind's "
                              "JOBQUEUE_<KIND>_QUEUE_SIZE); past it, 503", queue_labels,
                              registry=registry)
        self.kind_ready = Gauge("jobqueue_kind_ready", "1 when the kind's resource (its setup) "
                                "is ready, 0 while it loads or after it failed", queue_labels,
                                registry=registry)
        self.worker_processes = Gauge(
            "jobqueue_worker_processes", "Live worker processes of the distributed mode (from "
            "their heartbeats)", ["scope"], registry=registry)
        self.dependency_up = Gauge("jobqueue_dependency_up", "1 when a dependency the server "
                                   "needs (postgresql, objectStorage) answers, else 0",
                                   ["dependency"], registry=registry)
        for kind in self.kinds:  # every series from the start, at 0: rates need a first sample
            for ending in Outcome:
                self.jobs.labels(kind, ending.value)
            self.queue_seconds.labels(kind)
            self.run_seconds.labels(kind)
        if isinstance(kinds, Mapping):  # the batched kinds' series too, when they are known
            for name, kind in kinds.items():
                if kind.batch is not None:
                    self.batch_size.labels(name)
        for limit in ("submit", "wrong_key"):
            self.rate_limited.labels(limit)
        for delivery in ("delivered", "retried", "failed"):
            self.webhook_deliveries.labels(delivery)

    def _child(self, metric: MetricWrapperBase, *labels: str) -> MetricWrapperBase:
        """`metric.labels(*labels)`, looked up once: labels() takes a lock and checks its
        arguments on every call, and each job's start and end ask."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def job_started(self, kind: str, created_at: float, started_at: float) -> None:
        self._child(self.queue_seconds, kind).observe(max(0.0, started_at - created_at))

    def job_ended(self, kind: str, ending: Outcome, started_at: float | None,
                  finished_at: float | None) -> None:
        self._child(self.jobs, kind, ending.value).inc()
        if started_at is not None and finished_at is not None:
            self._child(self.run_seconds, kind).observe(max(0.0, finished_at - started_at))

    def batch_called(self, kind: str, size: int) -> None:
        """A batched kind's handler was called for `size` jobs."""
        self.batch_size.labels(kind).observe(size)

    def webhook_attempted(self, outcome: str) -> None:
        """A webhook delivery attempt ended: delivered, retried or failed (webhooks.py)."""
        self.webhook_deliveries.labels(outcome).inc()

    def refused(self, kind: str) -> None:
        self.jobs.labels(kind, Outcome.REFUSED.value).inc()

    def set_queues(self, stats: dict[str, dict[str, int]], scope: str) -> None:
        """The queue gauges from an engine's (or a worker's) figures per kind."""
        for kind, figures in stats.items():
            self.waiting.labels(kind, scope).set(figures.get("queued", 0))
            self.running.labels(kind, scope).set(figures.get("busy", 0))
            self.workers.labels(kind, scope).set(figures.get("workers", 0))
            if "capacity" in figures:
                self.capacity.labels(kind, scope).set(figures["capacity"])
            if "state" in figures:
                self.kind_ready.labels(kind, scope).set(int(figures["state"] == "ready"))

    def forget_cluster_queues(self) -> None:
        """Drop the scope="cluster" series (the engine cannot be read); scope="process" ones
        are a worker's own and stay."""
        for gauge in (self.waiting, self.running, self.workers, self.capacity, self.kind_ready):
            for kind in self.kinds:
                gauge.remove(kind, "cluster")
        self.worker_processes.remove("cluster")


def loopback(host: str) -> bool:
    """Whether a listening address takes connections from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_matches(authorization: str | None, token: str) -> bool:
    """Whether an Authorization header carries `token` as a Bearer token."""
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                               token.encode())


class _QuietHandler(WSGIRequestHandler):
    # A connection that sends nothing is closed after this long, not held by a thread forever.
    timeout = 10

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - wsgiref's signature
        pass  # one line per scrape would drown the worker's log


def serve_worker_metrics(metrics: Metrics, port: int, token: str
                         ) -> tuple[str, Callable[[], None]]:
    """A worker process's /metrics on `port` (0: a free one), on a thread: on every address
    with a token (JOBQUEUE_METRICS_TOKEN, as a Bearer token), on loopback only without one.
    Returns its URL and a function that stops it."""
    host = "0.0.0.0" if token else "127.0.0.1"
    exposition = make_wsgi_app(metrics.registry)

    def app(environ, start_response):
        if token and not token_matches(environ.get("HTTP_AUTHORIZATION"), token):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                ("WWW-Authenticate", "Bearer")])
            return [b"Send JOBQUEUE_METRICS_TOKEN as a Bearer token.\n"]
        return exposition(environ, start_response)

    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    shown = socket.gethostname() if token else host
    return f"http://{shown}:{server.server_port}/metrics", server.shutdown
