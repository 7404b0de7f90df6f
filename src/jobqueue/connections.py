"""The HTTP protocol uvicorn runs here: uvicorn's own (httptools), with a deadline for a
request's headers.

uvicorn has no such deadline: its keep-alive timer starts again on every byte (uvicorn issue
#157), so a client sending a byte a second holds its connection forever. Here a connection must
complete a request's headers within JOBQUEUE_HEADER_TIMEOUT seconds of opening, and of every
response it gets (a blank line, or the rest of a body the server did not read, does not count
as a request). Bodies being read are held to JOBQUEUE_MIN_UPLOAD_KBPS by the routes that read
them (uploads.body).
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("jobqueue.connections")


def with_header_timeout(seconds: float) -> type[HttpToolsProtocol]:
    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._start_header_timer()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:  # a pipelined request: its time starts now
                self._start_header_timer()

        def on_headers_complete(self) -> None:
            self._stop_header_timer()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Idle again: uvicorn's keep-alive timer would stop at the next byte, whatever it is.
            if not self.transport.is_closing() and not self.pipeline:
                self._start_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def _start_header_timer(self) -> None:
            self._stop_header_timer()
            self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                log.info("closed a connection from %s: its request headers took longer than "
                         "%g s (JOBQUEUE_HEADER_TIMEOUT)", self.client, seconds)
                self.transport.close()

    return HeaderTimeoutProtocol
