"""A worker process of the distributed engine: jobqueue worker [--kinds pdf2image,video]

It runs the jobs of the kinds it is given (default: JOBQUEUE_KINDS, all those the replicas
serve), as many of each at once as JOBQUEUE_<KIND>_WORKERS
says, taking them from PostgreSQL (JOBQUEUE_DATABASE_URL) through procrastinate; API replicas
(`python src/main.py` with the same database) take the requests. SIGTERM or Ctrl-C: running
jobs get JOBQUEUE_SHUTDOWN_GRACE, then are stopped and queued again; a second signal stops at
once. Its child processes die with it, `kill -9` included.

Its metrics (the jobs it ran, their times, its slots) are on a port of its own,
JOBQUEUE_WORKER_METRICS_PORT (0: a free one, logged and shown in the replicas' /health), for
Prometheus to scrape each worker: the counters of the jobs it ran live in this process only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from jobqueue import heap, logs, tracing
from jobqueue.engines.postgres import timeouts
from jobqueue.engines.postgres.runner import Runner, connections
from jobqueue.errors import CannotStart
from jobqueue.jobs import JobKind
from jobqueue.kinds import kind_names, load_kinds
from jobqueue.metrics import Metrics, serve_worker_metrics
from jobqueue.settings import Settings, unknown_variables

log = logging.getLogger(__name__)

POOL_TIMEOUT_SECONDS = 10.0


async def serve(settings: Settings, kinds: dict[str, JobKind]) -> None:
    metrics = Metrics(kinds)
    try:  # first: a port in use stops the worker before it opens anything else
        metrics_url, stop_metrics = serve_worker_metrics(
            metrics, settings.worker_metrics_port, settings.metrics_token.get_secret_value())
    except OSError as error:
        raise SystemExit(f"cannot serve the worker's metrics on port "
                         f"{settings.worker_metrics_port} (JOBQUEUE_WORKER_METRICS_PORT): "
                         f"{error.strerror or error}. Free the port, or set 0 for a free one.")
    log.info("worker metrics on %s", metrics_url)
    # Bounded connects and checks, keepalives, a reconnect back-off of at most 1 s
    # (timeouts.py); a wait for a free connection of POOL_TIMEOUT_SECONDS, then the caller
    # retries (a held job end keeps trying).
    pool = timeouts.Pool(settings.database_url.get_secret_value(), min_size=1,
                         max_size=connections(settings, kinds), open=False,
                         timeout=POOL_TIMEOUT_SECONDS)
    await pool.open(wait=False)
    runner = Runner(settings, kinds, pool, metrics)
    runner.metrics_url = metrics_url
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("stopping: running jobs get %g s (JOBQUEUE_SHUTDOWN_GRACE)",
                     settings.shutdown_grace)
            stopping.set()
        else:  # a second signal: stop at once
            runner.kill_children()
            raise SystemExit(1)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await runner.start()
        heap.settle()  # started: what lives as long as the process is out of the GC's way
        await stopping.wait()
        await runner.stop()
    finally:
        runner.kill_children()
        stop_metrics()
        await pool.close()


def main(argv: list[str] | None = None) -> None:
    settings = Settings()
    parser = argparse.ArgumentParser(description="Run jobs of the distributed engine.")
    parser.add_argument("--kinds", default=settings.kinds,
                        help="comma-separated job kinds to run: built-in names, entry points "
                             "or package.module:ATTRIBUTE (default: JOBQUEUE_KINDS, "
                             "%(default)s)")
    args = parser.parse_args(argv)
    if not settings.database_url.get_secret_value():
        parser.error("JOBQUEUE_DATABASE_URL is not set: a worker takes its jobs from PostgreSQL")
    logs.configure(settings.log_format)
    # Its spans continue the traces of the requests that submitted its jobs (tracing.py).
    tracing.setup("jobqueue-worker")
    try:
        kinds = load_kinds(args.kinds)
        for kind in kinds.values():
            settings.limits(kind)  # a wrong JOBQUEUE_<NAME>_* stops the start, named
    except (CannotStart, ValueError) as error:
        raise SystemExit(f"cannot start: {error}") from None
    # The replicas' kinds count as known: a worker may run fewer of them.
    for warning in unknown_variables([*kinds, *kind_names(settings.kinds)]):
        log.warning("%s", warning)
    asyncio.run(serve(settings, kinds))


if __name__ == "__main__":
    main()
