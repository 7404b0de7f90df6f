"""The HTTP protocol uvicorn runs here: uvicorn's own (httptools), with a deadline and a size cap
for a request's head, and a lingering close.

- A deadline for the head. uvicorn has none: its keep-alive timer starts again on every byte
  (uvicorn issue #157), so a client sending a byte a second holds its connection forever. Here a
  connection must complete a request's headers within JOBQUEUE_HEADER_TIMEOUT seconds of
  opening, and of every response it gets (a blank line, or the rest of a body the server did not
  read, does not count as a request). Bodies being read are held to JOBQUEUE_MIN_UPLOAD_KBPS by
  the routes that read them (uploads.body).
- A cap on the head. httptools has none that can be set (llhttp's is off in it; uvicorn's
  `h11_max_incomplete_event_size` is for its h11 protocol only), and it keeps a header whole in
  memory until it ends: a 150 MB header line took 150 MB and more. Here the request line and
  headers together may take MAX_HEAD_BYTES; past that the answer is 431 and the rest is not kept.
- A lingering close, as nginx does it. A connection closed while the client is still sending
  (an answer given before the body was read, such as a 413, or the 431 above) is reset by the
  kernel, and the client often loses the answer with it: Python's http.client sends its whole
  body before it reads, so about half of the 413s for a JSON body over 1 MB ended in
  "connection reset". Here such a connection is half-closed once the answer is out, what the
  client still sends is read and dropped (at most LINGER_BYTES, for at most LINGER_SECONDS),
  and then it is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger(__name__)

# The request line and header fields of one request, together.
MAX_HEAD_BYTES = 64 * 1024
# Set in a request's scope once its whole body is in (uploads.body then waits for nothing).
BODY_RECEIVED = "jobqueue.body_received"
# A write at most this large waits for the next one of the same moment (_Transport).
HOLD_BYTES = 16 * 1024
# A lingering close reads and drops at most this much, for at most this long.
LINGER_BYTES = 64 * 1024 * 1024
LINGER_SECONDS = 10.0

HEAD_TOO_LARGE = json.dumps({
    "detail": f"The request's head (its request line and headers together) is larger than "
              f"{MAX_HEAD_BYTES // 1024} KB, the limit; send fewer or shorter headers."}).encode()


class _Transport:
    """The connection's transport as uvicorn sees it: closing it may linger first (see
    `LimitedProtocol.close`), and it counts as closing while it lingers.

    A small write is held back until the next one or the end of the event loop's current
    round, whichever comes first: uvicorn writes an answer's head and its body apart, and each
    write was a system call of its own (a fifth of a `GET /health`'s time); now one answer is
    one."""

    def __init__(self, transport: asyncio.Transport, protocol: LimitedProtocol):
        self._transport = transport
        self._protocol = protocol
        self._held = b""
        self._flush_scheduled = False
        # Bound once rather than looked up through __getattr__ on every answer.
        self.get_extra_info = transport.get_extra_info

    def write(self, data: bytes) -> None:
        if self._held:
            data, self._held = self._held + data, b""
        if len(data) > HOLD_BYTES:
            self._transport.write(data)
            return
        self._held = bytes(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._protocol.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what is held back now (before the connection is closed or written to
        directly)."""
        self._flush_scheduled = False
        if self._held:
            data, self._held = self._held, b""
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._protocol.close()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()

    def __getattr__(self, name: str) -> object:  # whatever the transport has
        return getattr(self._transport, name)


class LimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with `header_timeout`, MAX_HEAD_BYTES and a lingering
    close (see the module's doc)."""

    header_timeout = 10.0
    _header_timer: asyncio.TimerHandle | None = None
    _linger_timer: asyncio.TimerHandle | None = None
    lingering = False
    _lingered = 0
    # Between a request's first byte (or the end of the one before) and the end of its head.
    _in_head = True
    _head_bytes = 0
    # Between a request's first byte and the end of its body, as the parser reads it.
    _in_message = False
    # Set when a request ends within the bytes being parsed: they are not all the next head's.
    _ended_in_piece = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        super().connection_made(_Transport(transport, self))  # type: ignore[arg-type]
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES:
                self.close_now()
            return
        # A head is fed at most what is left of its cap at a time, so it is caught at the cap.
        while data:
            counting = self._in_head
            size = MAX_HEAD_BYTES - self._head_bytes if counting else len(data)
            piece, data = data[:size], data[size:]
            self._ended_in_piece = False
            super().data_received(piece)
            if self.transport.is_closing():  # a 400 for a malformed request, say
                return
            if self._in_head and counting and not self._ended_in_piece:
                self._head_bytes += len(piece)
                if self._head_bytes >= MAX_HEAD_BYTES:
                    self._head_too_large()
                    return

    def eof_received(self) -> None:
        if self.lingering:
            self.close_now()  # the client has sent all it will

    def on_message_begin(self) -> None:
        self._in_message = True
        super().on_message_begin()
        if self._header_timer is None:  # a pipelined request: its time starts now
            self._start_header_timer()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._stop_header_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_message = False
        self._in_head, self._head_bytes, self._ended_in_piece = True, 0, True
        super().on_message_complete()
        if self.cycle is not None and not self.cycle.more_body:
            self.cycle.scope[BODY_RECEIVED] = True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Idle again: uvicorn's keep-alive timer would stop at the next byte, whatever it is.
        if not self.transport.is_closing() and not self.pipeline:
            self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self.lingering or self.cycle is None or self.cycle.response_complete:
            self.close_now()  # nobody waits for an answer on it
        else:
            super().shutdown()

    # Closing

    def close(self) -> None:
        """What uvicorn's `transport.close()` does here: closes at once a connection between
        requests; lingers on one whose request has not all come in yet."""
        if self.lingering or self._raw.is_closing():
            return
        self.transport.flush()
        if not (self._in_message or self._head_bytes) or not self._raw.can_write_eof():
            self._raw.close()
            return
        self.lingering = True
        self._stop_header_timer()
        self._raw.write_eof()  # once the answer is out: the client reads it, then its end
        self._raw.resume_reading()  # uvicorn may have paused it, its buffer full
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, self.close_now)

    def close_now(self) -> None:
        if not self._raw.is_closing():
            self.transport.flush()
            self._raw.close()

    def _head_too_large(self) -> None:
        self._stop_header_timer()
        log.info("refused a request from %s: its head is over %d KB", self.client,
                 MAX_HEAD_BYTES // 1024)
        if self.cycle is not None and not self.cycle.response_complete:
            # The answer to a request before it is still being sent: no room for a 431.
            self.close_now()
            return
        head = [STATUS_LINE[431]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\n",
                 b"content-length: %d\r\n" % len(HEAD_TOO_LARGE), b"connection: close\r\n\r\n"]
        self.transport.flush()  # whatever an answer before it left held back goes first
        self._raw.write(b"".join(head) + HEAD_TOO_LARGE)
        self._in_message = True  # what follows is the rest of the head: linger over it
        self.close()

    # The header deadline

    def _start_header_timer(self) -> None:
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            log.info("closed a connection from %s: its request headers took longer than "
                     "%g s (JOBQUEUE_HEADER_TIMEOUT)", self.client, self.header_timeout)
            self.close_now()


def http_protocol(header_timeout: float) -> type[LimitedProtocol]:
    """The protocol class for uvicorn's `http=`, with JOBQUEUE_HEADER_TIMEOUT."""
    return type("HttpProtocol", (LimitedProtocol,), {"header_timeout": header_timeout})
