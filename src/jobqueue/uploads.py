"""Reading a multipart/form-data body as it arrives: text fields into a dict, the `file` part
straight into the job's `input/` folder — never whole in memory, never copied twice."""

from __future__ import annotations

from pathlib import Path

from fastapi import HTTPException, Request
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from . import storage
from .jobs import is_disk_full

MAX_FIELDS = 20
MAX_FIELD_BYTES = 64 * 1024
# After the cap is hit, read (and drop) at most this much more so the client sees the 413.
DRAIN_BYTES = 64 * 1024 * 1024


class UploadTooLarge(Exception):
    pass


class _Form:
    """multipart callbacks that route each part to a file or to the fields."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        self.fields: dict[str, str] = {}
        self.file_path: Path | None = None
        self._file = None
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
        if self._name in self.fields or (self._name == "file" and self.file_path):
            raise HTTPException(422, f"The form field {self._name!r} is given twice; send it once.")
        if self._name == "file":
            self.folder.mkdir(parents=True, exist_ok=True)
            self.file_path = self.folder / storage.safe_name(
                (filename or b"upload").decode(errors="replace"))
            self._file = self.file_path.open("wb")
        elif filename is not None:
            raise HTTPException(422, f"The form field {self._name!r} must be text; only `file` "
                                     "may be a file.")
        elif len(self.fields) >= MAX_FIELDS:
            raise HTTPException(422, f"Too many form fields; at most {MAX_FIELDS}.")

    def part_data(self, data: bytes) -> None:
        if self._file is not None:
            self._written += len(data)
            if self._written > self.max_bytes:
                raise UploadTooLarge
            self._file.write(data)
        else:
            self._value += data
            if len(self._value) > MAX_FIELD_BYTES:
                raise HTTPException(422, f"The form field {self._name!r} is longer than "
                                         f"{MAX_FIELD_BYTES // 1024} KB.")

    def part_end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        elif self._name != "file":
            self.fields[self._name] = self._value.decode(errors="replace")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


async def _discard(form: _Form, stream) -> None:
    """Remove the partial upload, then read (and drop) a bounded rest of the body, so the
    client gets to read the error answer instead of a reset connection."""
    form.close()  # before the unlink
    if form.file_path:
        form.file_path.unlink(missing_ok=True)
    drained = 0
    async for chunk in stream:
        drained += len(chunk)
        if drained > DRAIN_BYTES:
            break


async def read_multipart(request: Request, folder: Path,
                         max_bytes: int) -> tuple[dict[str, str], Path | None]:
    """Stream the body; the `file` part goes to `folder`. 413 over `max_bytes` (file removed)."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPException(422, "The multipart body has no boundary in its Content-Type.")
    form = _Form(folder, max_bytes)
    parser = MultipartParser(boundary, form.callbacks())
    stream = request.stream()
    try:
        async for chunk in stream:
            parser.write(chunk)
        parser.finalize()
        if parser.state != MultipartState.END:
            raise HTTPException(400, "The multipart body ends before its closing boundary; "
                                     "the upload was cut off.")
    except UploadTooLarge:
        await _discard(form, stream)
        raise HTTPException(413, f"The upload is larger than the {max_bytes / 2**20:g} MB "
                                 "limit (JOBQUEUE_MAX_UPLOAD_MB).") from None
    except HTTPException:
        raise
    except OSError as error:  # writing the upload failed: the disk, not the body
        await _discard(form, stream)
        if is_disk_full(error):
            raise HTTPException(507, "The server's disk is full; the upload could not be "
                                     "stored. Try again once space has been freed.") from None
        raise
    except Exception as error:  # python-multipart's errors for a malformed body
        raise HTTPException(400, f"The multipart body is malformed ({error}).") from None
    finally:
        form.close()
    return form.fields, form.file_path
