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

from . import access, ratelimit, retention
from .disconnects import GoneClients
from .engine import Engine, QueueFull, ShuttingDown
from .headers import SecurityHeaders
from .jobs import is_disk_full
from .kinds import KINDS
from .routes import dashboard, events, files, health, jobs, preview, put
from .schemas import error_responses
from .settings import Settings
from .shutdown import shutting_down
from .slots import Slots
from .store import JobStore

log = logging.getLogger("jobqueue.app")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The store opens and threads start here, never at import time.
        store = JobStore(settings.job_db)
        engine = Engine(settings, KINDS, store)
        app.state.store = store
        app.state.engine = engine
        engine.start()
        await asyncio.to_thread(retention.sweep_orphans, store, settings.out_dir)
        log.info("workers started: %s",
                 {name: pool.limits.workers for name, pool in engine.pools.items()})
        sweeper = asyncio.create_task(retention.sweep_forever(store, settings, engine.feed,
                                                              app.state.uploads.holders))
        yield
        sweeper.cancel()
        await asyncio.to_thread(engine.stop)
        store.close()
        log.info("workers stopped")

    app = FastAPI(
        title="jobqueue",
        summary="Slow work behind HTTP: bounded queues per job kind, served by worker threads.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.draining = False  # set on SIGTERM / Ctrl-C: see shutdown.py
    app.state.preview_slots = preview.PreviewSlots(settings.preview_streams)
    app.state.uploads = Slots(settings.max_uploads, "uploads", "JOBQUEUE_MAX_UPLOADS")
    app.state.streams = Slots(settings.max_streams, "event streams", "JOBQUEUE_MAX_STREAMS")
    ratelimit.configure(app, settings.rate_limit)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(QueueFull, queue_full)
    app.add_exception_handler(ShuttingDown, refuse_new_job)
    app.add_exception_handler(Exception, internal_error)
    app.include_router(health.router)
    app.include_router(dashboard.router)  # the page asks for a key itself
    # 401 without a valid key when keys are set; without keys every caller is the same owner,
    # and the routes skip the dependency altogether.
    keyed = [Depends(access.require_key)] if settings.api_key_list else []
    for router in (put.router, jobs.router, files.router, preview.router, events.router,
                   access.router):
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


async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=503,
                        headers={"Retry-After": str(exc.retry_after)})


async def refuse_new_job(request: Request, exc: ShuttingDown) -> JSONResponse:
    refusal = shutting_down(request)
    return JSONResponse({"detail": refusal.detail}, status_code=refusal.status_code,
                        headers=refusal.headers)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    if is_disk_full(exc) or isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
        log.error("disk full on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": "The server's disk is full; try again once space has "
                                       "been freed."}, status_code=507)
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "Internal server error; the server log has the details."},
                        status_code=500)
