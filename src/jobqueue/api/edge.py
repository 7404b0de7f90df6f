"""The one middleware around the whole app: each request is timed for the metrics, gets the
security headers and may leave an access-log line; and, inside Starlette's error middleware,
GoneClients: a client that left mid-stream is not a server error.

They were four middlewares, each wrapping `send` in a closure of its own; on a tiny request
(`GET /health`, a no-op `/put`) those layers and uvicorn's access line were a third of the
server's time. Here one `send` wrapper does all of it, outside Starlette's error middleware so
an error's answer (500, or 507 for a full disk) is timed and logged with the status the client
got. GoneClients wraps no `send`: it reads in the scope whether Edge has sent an answer's head.

The access log (`JOBQUEUE_ACCESS_LOG`):
- `jobs` (the default): a line for each request that submits, changes or deletes a job (any
  method but GET, HEAD and OPTIONS) and for every answer of 400 or more. Polls, downloads,
  event streams, /health and /metrics leave none: one line a job, not one a poll.
- `all`: a line for every request, as uvicorn's own access log wrote.
- `off`: none.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Literal

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobqueue import logs
from jobqueue.api.headers import DOCS_PATHS, add_security_headers, send_docs_page
from jobqueue.metrics import METHODS, Metrics

access_log = logging.getLogger(logs.ACCESS_LOGGER)
log = logging.getLogger(__name__)

AccessLog = Literal["jobs", "all", "off"]
READS = frozenset({"GET", "HEAD", "OPTIONS"})
# The scope key Edge sets once an answer's head is sent (its status), for GoneClients.
ANSWERED = "jobqueue.answered"


class Edge:
    """Pure ASGI middleware (no buffering, so streams stay streams)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, access: AccessLog = "jobs"):
        self.app = app
        self.metrics = metrics
        self.access = access
        # One histogram child per (method, route, status), looked up once: prometheus_client's
        # labels() takes a lock and checks its arguments on every call.
        self._timers: dict[tuple[str, str, int], object] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0  # the answer's status, once its head is sent

        async def edge_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start" and not status:
                scope[ANSWERED] = status = message["status"]
                add_security_headers(message)
                self._observe(scope, status, started)
            await send(message)

        try:
            if scope["path"] in DOCS_PATHS:
                await send_docs_page(self.app, scope, receive, edge_send)
            else:
                await self.app(scope, receive, edge_send)
        except asyncio.CancelledError:
            if not status:  # stopped before any answer (a shutdown): nginx's "client closed
                status = 499  # request", no error of the server's
                self._observe(scope, status, started)
            raise
        finally:
            if not status:  # ended with no answer at all: the server answers 500
                status = 500
                self._observe(scope, status, started)

    def _observe(self, scope: Scope, status: int, started: float) -> None:
        seconds = time.perf_counter() - started
        method = scope["method"]
        # FastAPI's routes note themselves in the scope; a mount (/static) its prefix;
        # Starlette's own routes (/docs, /openapi.json) only their endpoint, and they take no
        # parameters, so their path is their template. Never the path itself: one series per
        # route, not per job.
        route = scope.get("route")
        name = (getattr(route, "path", None) or scope.get("root_path")
                or (scope["path"] if "endpoint" in scope else "unmatched"))
        key = (method, name, status)
        timer = self._timers.get(key)
        if timer is None:
            timer = self.metrics.http_seconds.labels(
                method if method in METHODS else "other", name, str(status))
            if len(self._timers) < 10_000:  # unmatched paths share one name; still, a bound
                self._timers[key] = timer
        timer.observe(seconds)
        if self.access == "all" or (self.access == "jobs"
                                    and (status >= 400 or method not in READS)):
            if access_log.isEnabledFor(logging.INFO):
                # Without the query string: the dashboard's image links carry an access token.
                # Made here rather than by .info(), which looks for its caller up the stack
                # first (a line a job): every access line comes from this one place anyway.
                access_log.handle(access_log.makeRecord(
                    access_log.name, logging.INFO, __file__, 0,
                    '%s:%s - "%s %s HTTP/%s" %d %.1f ms',
                    (*(scope.get("client") or ("-", "-")), method, scope["path"],
                     scope.get("http_version", "1.1"), status, seconds * 1000), None,
                    "access"))


class GoneClients:
    """A client that leaves in the middle of a stream is not a server error.

    FastAPI's Server-Sent Events keep-alive task can still be sending when the client's stream
    is closed, and then raises anyio.BrokenResourceError out of the request (fastapi
    discussion #15725). Once the answer has started there is nobody left to answer, so it ends
    here. Inside Starlette's error middleware (app.add_middleware), so the app's 500 handler
    never sees it: outside, it would log it as an unhandled error, traceback and all, before
    it got here. Under Edge, which notes the answer's start in the scope; without Edge every
    such error goes on to the error middleware, as with no GoneClients at all."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except* (anyio.BrokenResourceError, anyio.ClosedResourceError):
            if not scope.get(ANSWERED):
                raise
            log.debug("client left %s while it streamed", scope.get("path"))
