"""Graceful shutdown: on SIGTERM or Ctrl-C, stop taking jobs, let running ones finish, then stop.

uvicorn closes its listening socket as soon as it is told to stop, so a client could not be told
to come back later. The drain happens first instead, while the server still answers: new jobs
get 503 with Retry-After, running jobs get JOBQUEUE_SHUTDOWN_GRACE seconds, queued ones stay in
the store for the next start. Then uvicorn stops as usual, and the engine stops whatever still
runs, to be run again after the restart. A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI, HTTPException, Request

log = logging.getLogger("jobqueue.shutdown")

POLL_SECONDS = 0.1


async def refuse_while_draining(request: Request) -> None:
    """Dependency of the routes that take new jobs: 503 once shutdown has begun."""
    if request.app.state.draining:
        raise_shutting_down(request)


def raise_shutting_down(request: Request) -> None:
    retry = max(1, math.ceil(request.app.state.settings.shutdown_grace))
    raise HTTPException(503, "The server is shutting down and takes no new jobs; retry in "
                             f"{retry} s, when it has restarted.",
                        headers={"Retry-After": str(retry)})


async def drain(app: FastAPI, grace: float) -> None:
    """Stop taking jobs, then wait up to `grace` seconds for the running ones to finish."""
    app.state.draining = True
    engine = app.state.engine
    engine.close_intake()
    log.info("shutting down: no new jobs; giving running jobs %g s to finish", grace)
    deadline = time.monotonic() + grace
    while engine.busy() and time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)
    if engine.busy():
        log.info("grace over: stopping the running jobs; they run again after a restart")


class GracefulServer(uvicorn.Server):
    """uvicorn.Server that drains the app before the usual shutdown."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace: float):
        super().__init__(config)
        self.app = app
        self.grace = grace
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as a signal handler between two bytecodes of the loop's thread: hand over to
        # the loop. The first signal drains; a second one stops at once.
        if self.loop is None or self.draining is not None or not self.started:
            super().handle_exit(sig, frame)
            return
        self.loop.call_soon_threadsafe(self._start_drain, sig, frame)

    def _start_drain(self, sig: int, frame: FrameType | None) -> None:
        if self.draining is not None:
            super().handle_exit(sig, frame)
            return

        async def drain_then_exit() -> None:
            try:
                await drain(self.app, self.grace)
            finally:
                super(GracefulServer, self).handle_exit(sig, frame)

        self.draining = self.loop.create_task(drain_then_exit())
