"""Where a job's files live: `out/<id>/` on a disk (LocalFiles, the default) or a prefix of an
S3-compatible bucket (ObjectFiles, JOBQUEUE_STORAGE_URL=s3://bucket/prefix).

Handlers always work in a local folder, `out/<id>/`: with object storage that folder is
scratch space on the machine that runs the job. The engine fetches the input into it before
the handler runs and publishes the outputs after it succeeds; routes read the published files
through this interface, never from a path of their own making. It speaks data, not HTTP:
`download` says what to send (a `Download`) and the routes make the answer of it; a file that
is gone is errors.FilesGone.
"""

from __future__ import annotations

import mimetypes
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from jobqueue.errors import FilesGone
from jobqueue.files import jobfiles
from jobqueue.records import JobRecord

CHUNK_BYTES = 256 * 1024
# Uploads going to object storage at once per process (each holds two 8 MB parts in memory):
# the distributed engine runs keep_input on this many threads.
STORE_UPLOADS_AT_ONCE = 4
# Thumbnails are kept beside the job's outputs (on a local disk: beside the image).
THUMBNAIL_DIR = "thumbnails"


@dataclass(frozen=True)
class Download:
    """What to send of an output file: a file on this machine's disk (`path`), or its bytes
    as they come (`chunks`, from the object store: their errors cut the body short)."""

    size: int  # bytes
    media_type: str
    filename: str | None = None  # send it as an attachment of this name
    path: Path | None = None
    chunks: Iterator[bytes] | None = None


class FileStore(Protocol):
    out_dir: Path  # the local folder jobs run in (with object storage: scratch space)
    remote: bool  # whether files live elsewhere than out_dir

    def keep_input(self, job_id: str, upload: Path) -> str:
        """Keep a checked upload for its job; returns what the record's input_path holds."""

    def fetch_input(self, job_id: str, input_path: str,
                    check: Callable[[], None] = lambda: None) -> Path:
        """The upload as a local file for the handler (downloaded into out/<id>/input/).
        `check` is called between chunks: it raises to stop (a cancel)."""

    def publish(self, record: JobRecord, files: list[Path],
                check: Callable[[], None] = lambda: None) -> None:
        """Keep the outputs of a run (record.attempt) that is about to record its success.
        `check` is called before each file: it raises to stop (a cancel)."""

    def finished(self, record: JobRecord) -> None:
        """The record says record.attempt succeeded: drop what other runs left."""

    def exists(self, record: JobRecord, name: str) -> bool:
        """Whether a succeeded job's output file `name` is there."""

    def complete(self, record: JobRecord) -> bool:
        """Whether every output file of a succeeded job is there (not deleted meanwhile)."""

    def download(self, record: JobRecord, name: str, filename: str | None = None) -> Download:
        """What to send of an output file (as an attachment named `filename`); FilesGone when
        it is not there, before any byte."""

    def chunks(self, record: JobRecord, name: str) -> Iterator[bytes]:
        """An output file's bytes, a chunk at a time (for the zip of all pages)."""

    def link(self, record: JobRecord, name: str) -> str | None:
        """A URL a client or ffmpeg can read an output file from; None on a local disk."""

    def output_source(self, record: JobRecord, name: str) -> str | None:
        """Where ffmpeg can read a succeeded job's output file (a path or a URL)."""

    def local_copy(self, record: JobRecord, name: str, scratch: Path) -> Path:
        """An output file as a file on this machine: itself on a local disk, else a copy made
        in the folder `scratch`. FileNotFoundError or FilesGone when it is not there."""

    def kept_thumbnail(self, record: JobRecord, name: str, width: int) -> bytes | None:
        """The JPEG made of an output image at `width` earlier, if it was kept."""

    def keep_thumbnail(self, record: JobRecord, name: str, width: int, jpeg: bytes) -> None:
        """Keep a thumbnail for the next request (FileNotFoundError: the job is gone)."""

    def has_input(self, record: JobRecord) -> bool:
        """Whether the job's upload is still there, for a retry (the kind's sample, no
        input_path, always is)."""

    def input_source(self, record: JobRecord) -> str | None:
        """Where ffmpeg can read a queued or running job's upload (a path or a URL)."""

    def remove(self, job_id: str) -> None:
        """Remove every file of a job, wherever it is."""

    def health(self) -> str:
        """"ok", or why the files cannot be reached (object storage only)."""

    def job_ids(self) -> set[str]:
        """Object storage: every job that has objects."""

    def newest(self, job_id: str) -> float | None:
        """Object storage: when the newest object of a job was written; None: it has none."""


class LocalFiles:
    """Files in `out/<id>/` on this machine's disk (or a folder all machines share)."""

    remote = False

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    def keep_input(self, job_id: str, upload: Path) -> str:
        return str(upload)

    def fetch_input(self, job_id: str, input_path: str,
                    check: Callable[[], None] = lambda: None) -> Path:
        return Path(input_path)

    def publish(self, record: JobRecord, files: list[Path],
                check: Callable[[], None] = lambda: None) -> None:
        pass  # written in place

    def finished(self, record: JobRecord) -> None:
        pass  # a rerun cleared the folder before it ran

    def exists(self, record: JobRecord, name: str) -> bool:
        return jobfiles.output_file(self.out_dir, record.id, name) is not None

    def complete(self, record: JobRecord) -> bool:
        return all(self.exists(record, name) for name in record.result["files"])

    def download(self, record: JobRecord, name: str, filename: str | None = None) -> Download:
        path = self._output(record, name)
        try:
            size = path.stat().st_size
        except FileNotFoundError:  # deleted just now
            raise FilesGone(record.id, name) from None
        # The type by the name, as Starlette's FileResponse has always guessed it here.
        guessed = mimetypes.guess_type(filename or path.name)[0] or "text/plain"
        return Download(size, guessed, filename, path=path)

    def chunks(self, record: JobRecord, name: str) -> Iterator[bytes]:
        path = self._output(record, name)
        with path.open("rb") as source:
            while block := source.read(CHUNK_BYTES):
                yield block

    def _output(self, record: JobRecord, name: str) -> Path:
        path = jobfiles.output_file(self.out_dir, record.id, name)
        if path is None:
            raise FilesGone(record.id, name)
        return path

    def link(self, record: JobRecord, name: str) -> str | None:
        return None

    def output_source(self, record: JobRecord, name: str) -> str | None:
        path = jobfiles.output_file(self.out_dir, record.id, name)
        return str(path) if path is not None else None

    def local_copy(self, record: JobRecord, name: str, scratch: Path) -> Path:
        return self._image(record, name)

    def _image(self, record: JobRecord, name: str) -> Path:
        path = jobfiles.output_file(self.out_dir, record.id, name)
        if path is None:
            raise FileNotFoundError(name)
        return path

    def _thumbnail(self, record: JobRecord, name: str, width: int) -> Path:
        image = self._image(record, name)
        return image.parent / THUMBNAIL_DIR / f"{width}-{image.stem}.jpg"

    def kept_thumbnail(self, record: JobRecord, name: str, width: int) -> bytes | None:
        cached = self._thumbnail(record, name, width)
        return cached.read_bytes() if cached.is_file() else None

    def keep_thumbnail(self, record: JobRecord, name: str, width: int, jpeg: bytes) -> None:
        cached = self._thumbnail(record, name, width)
        cached.parent.mkdir(exist_ok=True)
        partial = cached.with_suffix(f".{threading.get_ident()}.tmp")
        try:
            partial.write_bytes(jpeg)
            os.replace(partial, cached)  # whole or not at all, for a request reading it
        finally:
            partial.unlink(missing_ok=True)

    def has_input(self, record: JobRecord) -> bool:
        return not record.input_path or Path(record.input_path).is_file()

    def input_source(self, record: JobRecord) -> str | None:
        if not record.input_path:
            return None
        path = Path(record.input_path)
        # The bundled sample is not this job's own file.
        inside = jobfiles.job_dir(self.out_dir, record.id) in path.parents
        return str(path) if inside and path.is_file() else None

    def remove(self, job_id: str) -> None:
        jobfiles.remove_job_dir(self.out_dir, job_id)

    def health(self) -> str:
        return "ok"

    def job_ids(self) -> set[str]:
        return set()  # retention.sweep_orphans looks after out/

    def newest(self, job_id: str) -> float | None:
        return None


def media_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"
