"""A client that leaves in the middle of a stream is not a server error.

FastAPI's Server-Sent Events keep-alive task can still be sending when the client's stream is
closed, and then raises anyio.BrokenResourceError out of the request (fastapi discussion
#15725), which would be logged as an unhandled exception with a traceback on every unlucky
disconnect. Once the response has started there is nobody left to answer, so it ends here.
"""

from __future__ import annotations

import logging

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class GoneClients:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def note_start(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, note_start)
        except* (anyio.BrokenResourceError, anyio.ClosedResourceError):
            if not started:
                raise
            log.debug("client left %s while it streamed", scope.get("path"))
