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
from fastapi import FastAPI, Request

from jobqueue.errors import ShuttingDown

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1


def refuse_while_draining(request: Request) -> None:
    """503 once shutdown has begun: the first thing `read_submission` does, for both routes
    that take jobs (a plain call, not a FastAPI dependency, which cost a tiny job 4 %)."""
    if request.app.state.draining:
        raise shutting_down(request)


def shutting_down(request: Request) -> ShuttingDown:
    """What a client is told while the server stops (a 503), with when to come back."""
    retry = max(1, math.ceil(request.app.state.settings.shutdown_grace))
    refusal = ShuttingDown("The server is shutting down and takes no new jobs; retry in "
                           f"{retry} s, when it has restarted.")
    refusal.retry_after = retry
    return refusal


async def drain(app: FastAPI, grace: float) -> None:
    """Stop taking jobs, then wait up to `grace` seconds for the running ones to finish."""
    app.state.draining = True
    engine = app.state.engine
    await engine.close_intake()
    log.info("shutting down: no new jobs; giving running jobs %g s to finish", grace)
    deadline = time.monotonic() + grace
    while await engine.busy() and time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)
    if await engine.busy():
        log.info("grace over: stopping the running jobs; they run again after a restart")
        # A /put client is answered 503 now rather than cut off when the server closes.
        await engine.end_put_jobs()
        await asyncio.sleep(POLL_SECONDS)  # time for those answers to go out


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
        if self.draining is not None:  # a second signal: stop waiting
            self.draining.cancel()
            if not self.should_exit:
                super().handle_exit(sig, frame)
            return

        async def drain_then_exit() -> None:
            try:
                await drain(self.app, self.grace)
            finally:
                # Once only: uvicorn takes a further signal as "force", which would skip the
                # lifespan shutdown that stops the engine and its child processes.
                if not self.should_exit:
                    super(GracefulServer, self).handle_exit(sig, frame)

        self.draining = self.loop.create_task(drain_then_exit())


def stop_leftovers(app: FastAPI) -> None:
    """After uvicorn has returned: stop the engine if a forced exit skipped the lifespan's
    shutdown, so no pdftoppm or ffmpeg outlives the server."""
    engine = getattr(app.state, "engine", None)
    if engine is not None:
        engine.stop_now()
