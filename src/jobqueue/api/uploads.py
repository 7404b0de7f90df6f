"""Reading a multipart/form-data body as it arrives: text fields into a dict, the `file` part
straight into the job's `input/` folder — never whole in memory, never copied twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from fastapi import Request
from python_multipart.multipart import (
    MAX_BOUNDARY_LENGTH,
    MultipartParser,
    MultipartState,
    parse_options_header,
)
from starlette.requests import ClientDisconnect

from jobqueue.api.connections import BODY_RECEIVED
from jobqueue.errors import (
    ANSWERED,
    BadInput,
    MalformedRequest,
    TooLarge,
    UploadDiskFull,
    UploadTooSlow,
    is_disk_full,
)
from jobqueue.files import jobfiles

MAX_FIELDS = 20
# JOBQUEUE_MIN_UPLOAD_KBPS is held over windows this long.
SPEED_WINDOW_SECONDS = 30.0
# What a multipart body may hold besides its file and fields: part headers and boundaries.
BODY_OVERHEAD_BYTES = 1024 * 1024
MAX_FIELD_BYTES = 64 * 1024
# After the cap is hit, read (and drop) at most this much more so the client sees the 413.
DRAIN_BYTES = 64 * 1024 * 1024


class UploadTooLarge(Exception):
    pass


class _Form:
    """multipart callbacks that route each part to a file or to the fields.

    The file is opened only once `open_file` is called, after the caller's (async) look at the
    fields before it; what of it came meanwhile (the rest of one chunk) waits in memory."""

    def __init__(self, folder: Path, max_bytes: int,
                 refuse_file: Callable[[dict[str, str]], str | None]):
        self.folder = folder
        self.max_bytes = max_bytes
        self.refuse_file = refuse_file
        self.fields: dict[str, str] = {}
        self.file_name: str | None = None  # set at the file part's headers
        self.file_path: Path | None = None  # set when it is opened
        self._file = None
        self._in_file = False  # between the file part's headers and its end
        self._held: bytearray | None = None  # the file's bytes until it is opened
        self._held_ended = False
        self._headers: dict[bytes, bytes] = {}
        self._header_name = b""
        self._header_value = b""
        self._name = ""
        self._value = bytearray()
        self._written = 0

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": lambda data, start, end: self._add_header_name(data[start:end]),
            "on_header_value": lambda data, start, end: self._add_header_value(data[start:end]),
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": lambda data, start, end: self.part_data(data[start:end]),
            "on_part_end": self.part_end,
        }

    def part_begin(self) -> None:
        self._headers = {}
        self._value = bytearray()

    def _add_header_name(self, data: bytes) -> None:
        self._header_name += data

    def _add_header_value(self, data: bytes) -> None:
        self._header_value += data

    def header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name = self._header_value = b""

    def headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = params.get(b"name", b"").decode(errors="replace")
        filename = params.get(b"filename")
        if self._name in self.fields or (self._name == "file" and self.file_name):
            raise BadInput(f"The form field {self._name!r} is given twice; send it once.")
        if self._name == "file":
            if reason := self.refuse_file(self.fields):  # before a byte of it is stored
                raise BadInput(reason)
            self.file_name = jobfiles.safe_name((filename or b"upload").decode(errors="replace"))
            self._in_file = True
            self._held = bytearray()
        elif filename is not None:
            raise BadInput(f"The form field {self._name!r} must be text; only `file` may be a "
                           "file.")
        elif len(self.fields) >= MAX_FIELDS:
            raise BadInput(f"Too many form fields; at most {MAX_FIELDS}.")

    @property
    def file_waiting(self) -> bool:
        """Whether the file part has begun and waits for `open_file`."""
        return self._held is not None

    def open_file(self) -> None:
        jobfiles.make_job_dir(self.folder.parent)
        self.folder.mkdir(exist_ok=True)
        self.file_path = self.folder / self.file_name
        self._file = self.file_path.open("wb")
        self._file.write(self._held)
        self._held = None
        if self._held_ended:
            self._file.close()
            self._file = None

    def part_data(self, data: bytes) -> None:
        if self._in_file:
            self._written += len(data)
            if self._written > self.max_bytes:
                raise UploadTooLarge
            if self._file is not None:
                self._file.write(data)
            else:
                self._held += data
        else:
            self._value += data
            if len(self._value) > MAX_FIELD_BYTES:
                raise BadInput(f"The form field {self._name!r} is longer than "
                               f"{MAX_FIELD_BYTES // 1024} KB.")

    def part_end(self) -> None:
        if self._in_file:
            self._in_file = False
            if self._file is not None:
                self._file.close()
                self._file = None
            else:  # parts after it in the same chunk are fields, not more of the file
                self._held_ended = True
        elif self._name != "file":
            self.fields[self._name] = self._value.decode(errors="replace")

    def close(self) -> None:
        """Close a file left open by a failure (part_end closes a complete one): it is
        deleted next, so a flush that fails again (a full disk) does not matter."""
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:
                pass


def too_large(max_bytes: int) -> TooLarge:
    return TooLarge(f"The upload is larger than the {max_bytes / 2**20:g} MB limit "
                    "(JOBQUEUE_MAX_UPLOAD_MB).")


def too_slow(min_bytes_per_second: float) -> UploadTooSlow:
    return UploadTooSlow(f"The body came in slower than {min_bytes_per_second / 1024:g} KB/s "
                         f"over {SPEED_WINDOW_SECONDS:g} s (JOBQUEUE_MIN_UPLOAD_KBPS); it was "
                         "cut off. Send it again over a faster connection.")


async def _discard(form: _Form, stream: AsyncIterator[bytes] | None) -> None:
    """Remove the partial upload, then read (and drop) a bounded rest of the body, so the
    client gets to read the error answer instead of a reset connection."""
    form.close()  # before the unlink
    if form.file_path:
        form.file_path.unlink(missing_ok=True)
    if stream is None:
        return
    drained = 0
    try:
        async for chunk in stream:
            drained += len(chunk)
            if drained > DRAIN_BYTES:
                break
    except TooSlow:
        pass


class TooSlow(Exception):
    pass


def declared_length(request: Request) -> int | None:
    """The body's Content-Length, if it has one. A body over a cap by its Content-Length is
    refused before any of it is read, and so before uvicorn answers an `Expect: 100-continue`
    (it does at the first read): the client never sends it."""
    try:
        return int(request.headers["content-length"])
    except (KeyError, ValueError):  # chunked; httptools refuses a malformed one itself
        return None


async def body(request: Request, min_bytes_per_second: float,
               window: float = SPEED_WINDOW_SECONDS) -> AsyncIterator[bytes]:
    """The request body as it arrives; TooSlow when less than `min_bytes_per_second` came in
    over any `window` seconds, a body that stalls altogether included.

    It reads the ASGI messages itself: waiting for the next one can be given up at the end of a
    window and taken up again, which would end Starlette's `request.stream()` for good."""
    if request.scope.get(BODY_RECEIVED):
        # All of it came in with the head (a small JSON body does): it is there to be read,
        # with no deadline to keep (each asked of asyncio costs system calls).
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        if message.get("body"):
            yield message["body"]
        if not message.get("more_body", False):
            return
    loop = asyncio.get_running_loop()
    window_started, received = loop.time(), 0
    while True:
        message = None
        try:
            async with asyncio.timeout_at(window_started + window):
                message = await request.receive()
        except TimeoutError:
            pass  # the window is over with nothing more: judge it below
        if message is not None:
            if message["type"] == "http.disconnect":
                raise ClientDisconnect
            chunk = message.get("body", b"")
            received += len(chunk)
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return
        if loop.time() >= window_started + window:
            if received < min_bytes_per_second * window:
                raise TooSlow
            window_started, received = loop.time(), 0


async def read_multipart(request: Request, folder: Path, max_bytes: int,
                         min_bytes_per_second: float,
                         refuse_file: Callable[[dict[str, str]], str | None],
                         room_for_file: Callable[[dict[str, str]],
                                                 Awaitable[Exception | None]]
                         ) -> tuple[dict[str, str], Path | None]:
    """Stream the body; the `file` part goes to `folder`. TooLarge (413) over `max_bytes`,
    UploadTooSlow (408) slower than `min_bytes_per_second` (the partial file removed either
    way). Given the fields before the file part, `refuse_file` says why it is not wanted
    (BadInput, 422), and `room_for_file` may refuse it for now (it returns the error to raise:
    a full queue's 503), both before any of it is stored."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadInput("The multipart body has no boundary in its Content-Type.")
    if len(boundary) > MAX_BOUNDARY_LENGTH:  # python-multipart's own limit (RFC 2046 says 70)
        raise MalformedRequest(f"The multipart boundary is {len(boundary)} characters long; "
                               f"at most {MAX_BOUNDARY_LENGTH} are allowed (RFC 2046 asks for "
                               "at most 70).")
    # The file, the fields, and room for part headers and boundaries: nothing more is read.
    max_body = max_bytes + MAX_FIELDS * MAX_FIELD_BYTES + BODY_OVERHEAD_BYTES
    if (declared_length(request) or 0) > max_body:
        raise too_large(max_bytes)
    form = _Form(folder, max_bytes, refuse_file)
    parser = MultipartParser(boundary, form.callbacks())
    stream = body(request, min_bytes_per_second)
    received = 0
    try:
        async for chunk in stream:
            received += len(chunk)
            if received > max_body:
                raise UploadTooLarge
            parser.write(chunk)
            if form.file_waiting:
                if refusal := await room_for_file(form.fields):
                    raise refusal
                form.open_file()
            if parser.state == MultipartState.END:
                break  # an epilogue after the closing boundary is not read: it means nothing
        parser.finalize()
        if parser.state != MultipartState.END:
            raise MalformedRequest("The multipart body ends before its closing boundary; the "
                                   "upload was cut off.")
    except UploadTooLarge:
        await _discard(form, stream)
        raise too_large(max_bytes) from None
    except TooSlow:
        await _discard(form, None)
        raise too_slow(min_bytes_per_second) from None
    except ANSWERED:
        await _discard(form, stream)  # a refused part: the client still gets to read why
        raise
    except ClientDisconnect:
        raise
    except OSError as error:  # writing the upload failed: the disk, not the body
        await _discard(form, stream)
        if is_disk_full(error):
            raise UploadDiskFull from None
        raise
    except Exception as error:  # python-multipart's errors for a malformed body
        raise MalformedRequest(f"The multipart body is malformed ({error}).") from None
    finally:
        form.close()
    return form.fields, form.file_path
