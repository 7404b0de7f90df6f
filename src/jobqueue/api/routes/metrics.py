"""`GET /metrics`: the server's metrics in the Prometheus text format.

Server-wide, so not for tenants: with JOBQUEUE_METRICS_TOKEN set it takes that token as a
Bearer token; without one it answers only on a server that listens on loopback. It needs no API
key and no rate limit counts it, so a scraper is never locked out.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from jobqueue.engines import JobEngine
from jobqueue.errors import Unavailable
from jobqueue.metrics import Metrics, loopback, token_matches

router = APIRouter(tags=["server"])


@router.get("/metrics", summary="Metrics for Prometheus: queues, jobs by outcome, timings",
            response_class=Response,
            responses={200: {"content": {"text/plain": {}}},
                       401: {"description": "JOBQUEUE_METRICS_TOKEN is set and the request "
                                            "does not carry it as a Bearer token"},
                       403: {"description": "No JOBQUEUE_METRICS_TOKEN, and the server listens "
                                            "beyond loopback"}})
async def scrape(request: Request) -> Response:
    settings = request.app.state.settings
    token = settings.metrics_token.get_secret_value()
    if token:
        if not token_matches(request.headers.get("Authorization"), token):
            raise HTTPException(401, "Send JOBQUEUE_METRICS_TOKEN as a Bearer token "
                                     "(Authorization: Bearer <token>).",
                                headers={"WWW-Authenticate": "Bearer"})
    elif not from_this_machine(request):
        raise HTTPException(403, "Without JOBQUEUE_METRICS_TOKEN, /metrics answers only a "
                                 "server that listens on loopback, asked from this machine "
                                 "and not through a proxy: set JOBQUEUE_METRICS_TOKEN and send "
                                 "it as a Bearer token.")
    metrics: Metrics = request.app.state.metrics
    await refresh_queues(request.app.state.engine, metrics)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def from_this_machine(request: Request) -> bool:
    """Whether a request surely comes from this machine: the server listens on loopback, the
    peer is loopback, and no proxy forwarded it (a reverse proxy on the same host would make
    every client of the internet look local)."""
    client = request.client.host if request.client else ""
    forwarded = any(name in request.headers for name in ("forwarded", "x-forwarded-for",
                                                         "x-real-ip"))
    return loopback(request.app.state.settings.host) and loopback(client) and not forwarded


async def refresh_queues(engine: JobEngine, metrics: Metrics) -> None:
    """Set the gauges from the engine as it is now. While its database is down the counters
    still answer; the cluster's gauges it cannot read are left out rather than shown stale
    (a replica --with-workers keeps its own slots, scope="process")."""
    health = await engine.health()
    for dependency, state in health.items():
        metrics.dependency_up.labels(dependency).set(1 if state == "ok" else 0)
    # While a dependency is down, no wait for the pool again: scrapes have a timeout.
    stats = processes = None
    if health.get("postgresql", "ok") == "ok":  # the queues are in the database
        try:
            stats, processes = await engine.stats(), await engine.worker_processes()
        except Unavailable:
            pass
    if stats is None:
        metrics.forget_cluster_queues()
        return
    metrics.set_queues(stats, "cluster")
    if processes is not None:  # the distributed mode's worker processes
        metrics.worker_processes.labels("cluster").set(len(processes))
