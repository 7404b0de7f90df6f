"""The application factory: settings, the queue engine's lifespan, error handlers and routes."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from jobqueue import errors
from jobqueue.api import access, ratelimit
from jobqueue.api.disconnects import GoneClients
from jobqueue.api.headers import SecurityHeaders
from jobqueue.api.routes import (
    dashboard,
    events,
    files,
    health,
    jobs,
    metrics,
    preview,
    put,
    throughput,
)
from jobqueue.api.schemas import error_responses
from jobqueue.api.shutdown import shutting_down
from jobqueue.api.slots import ConnectionSlots
from jobqueue.engines import make_engine
from jobqueue.files import retention
from jobqueue.kinds import KINDS
from jobqueue.metrics import Metrics, RequestTimer
from jobqueue.settings import Settings

log = logging.getLogger(__name__)


class JobQueueApp(FastAPI):
    """FastAPI, with the request timer outside Starlette's error middleware: an error's
    answer (500, or 507 for a full disk) is timed with the status the client got."""

    def build_middleware_stack(self):  # noqa: ANN201 - Starlette's ASGIApp
        return RequestTimer(super().build_middleware_stack(), self.state.metrics)


def create_app(settings: Settings | None = None, with_workers: bool = True) -> FastAPI:
    """The app. `with_workers`: in distributed mode (JOBQUEUE_DATABASE_URL), whether this
    process also runs workers (`--with-workers`); the embedded engine always does."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The engine opens its store and starts its threads here, never at import time.
        try:
            engine = make_engine(settings, KINDS, app.state.metrics, with_workers)
            app.state.engine = engine
            await engine.start()
        except errors.CannotStart as error:
            log.critical("cannot start: %s", error)  # what to do, before uvicorn's traceback
            raise
        try:
            await asyncio.to_thread(retention.sweep_orphans, engine.store, settings.out_dir,
                                    at_start=True)
        except errors.CannotStart:
            raise
        except Exception as error:  # the database may be down: the periodic sweep tries again
            log.warning("the sweep of leftover job folders failed at start: %s", error)
        sweeper = asyncio.create_task(retention.sweep_forever(engine, settings,
                                                              app.state.uploads.holders))
        yield
        sweeper.cancel()
        await engine.stop()
        log.info("workers stopped")

    app = JobQueueApp(
        title="jobqueue",
        summary="Slow work behind HTTP: bounded queues per job kind, served by worker threads.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics(KINDS)
    app.state.draining = False  # set on SIGTERM / Ctrl-C: see api/shutdown.py
    app.state.preview_slots = preview.PreviewSlots(settings.preview_streams)
    app.state.uploads = ConnectionSlots(settings.max_uploads, "uploads", "JOBQUEUE_MAX_UPLOADS")
    app.state.streams = ConnectionSlots(settings.max_streams, "event streams",
                                        "JOBQUEUE_MAX_STREAMS")
    ratelimit.configure(app, settings.rate_limit,
                        settings.rate_limit_storage.get_secret_value())
    app.add_exception_handler(RequestValidationError, invalid_request)
    for error_class, _ in errors.KINDS:  # one handler, one table: errors.HTTP_STATUS
        app.add_exception_handler(error_class, answer_error)
    app.add_exception_handler(Exception, internal_error)
    app.include_router(health.router)
    app.include_router(metrics.router)  # its own token, never an API key or a rate limit
    app.include_router(dashboard.router)  # the page asks for a key itself
    # 401 without a valid key when keys are set; without keys every caller is the same owner,
    # and the routes skip the dependency altogether.
    keyed = [Depends(access.require_key)] if settings.api_key_list else []
    for router in (put.router, jobs.router, files.router, preview.router, events.router,
                   throughput.router, access.router):
        app.include_router(router, dependencies=keyed, responses=error_responses(401, 429)
                           if settings.api_key_list else None)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(GoneClients)
    if settings.cors_origin_list:  # off unless JOBQUEUE_CORS_ORIGINS names the origins
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=[access.HEADER, "Content-Type"],
            expose_headers=["Location", "Retry-After", "X-RateLimit-Limit",
                            "X-RateLimit-Remaining", "X-RateLimit-Reset"])
    app.mount("/static", StaticFiles(directory=dashboard.STATIC_DIR), name="static")
    return app


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, except that an input JSON cannot carry (inf, a lone surrogate) is shown
    as its repr instead of turning the answer into a 500."""
    errors = []
    for error in exc.errors():
        shown = {key: error[key] for key in ("type", "loc", "msg", "input") if key in error}
        try:
            json.dumps(jsonable_encoder(shown), allow_nan=False).encode()
        except (ValueError, TypeError):  # UnicodeEncodeError is a ValueError
            shown["input"] = repr(error.get("input"))[:200]
        errors.append(jsonable_encoder(shown))
    return JSONResponse({"detail": errors}, status_code=422)


async def answer_error(request: Request, exc: Exception) -> JSONResponse:
    """Any of the server's own errors, answered as errors.HTTP_STATUS says."""
    if isinstance(exc, errors.ShuttingDown):
        refusal = shutting_down(request)
        return JSONResponse({"detail": refusal.detail}, status_code=refusal.status_code,
                            headers=refusal.headers)
    if isinstance(exc, errors.QueueFull):
        request.app.state.metrics.refused(exc.kind)
    headers = ({"Retry-After": str(exc.retry_after)} if hasattr(exc, "retry_after") else None)
    status = errors.HTTP_STATUS[errors.kind_of(exc)]
    return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)


# Starlette raises the error again once this answer is sent, and uvicorn then closes the
# connection: the answer says so, so a client sends its next request on a new one.
CLOSE = {"Connection": "close"}


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    disk_full = isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)
    if errors.is_disk_full(exc) or disk_full:
        log.error("disk full on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": "The server's disk is full; try again once space has "
                                       "been freed."}, status_code=507, headers=CLOSE)
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "Internal server error; the server log has the details."},
                        status_code=500, headers=CLOSE)
