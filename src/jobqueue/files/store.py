"""Where a job's files live: `out/<id>/` on a disk (LocalFiles, the default) or a prefix of an
S3-compatible bucket (ObjectFiles, JOBQUEUE_STORAGE_URL=s3://bucket/prefix).

Handlers always work in a local folder, `out/<id>/`: with object storage that folder is
scratch space on the machine that runs the job. The engine fetches the input into it before
the handler runs and publishes the outputs after it succeeds; routes read the published files
through this interface, never from a path of their own making.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from fastapi import HTTPException
from fastapi.responses import FileResponse, Response

from jobqueue.files import jobfiles
from jobqueue.records import JobRecord

# Output files never change once written.
CACHE = {"Cache-Control": "private, max-age=3600"}
CHUNK_BYTES = 256 * 1024
# Uploads going to object storage at once per process (each holds two 8 MB parts in memory):
# the distributed engine runs keep_input on this many threads.
STORE_UPLOADS_AT_ONCE = 4


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

    def download(self, record: JobRecord, name: str, filename: str | None = None) -> Response:
        """The answer that sends an output file (as an attachment named `filename`)."""

    def chunks(self, record: JobRecord, name: str) -> Iterator[bytes]:
        """An output file's bytes, a chunk at a time (for the zip of all pages)."""

    def link(self, record: JobRecord, name: str) -> str | None:
        """A URL a client or ffmpeg can read an output file from; None on a local disk."""

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

    def download(self, record: JobRecord, name: str, filename: str | None = None) -> Response:
        path = jobfiles.output_file(self.out_dir, record.id, name)
        if path is None:
            raise gone(record.id, name)
        return FileResponse(path, filename=filename, headers=CACHE)

    def chunks(self, record: JobRecord, name: str) -> Iterator[bytes]:
        path = jobfiles.output_file(self.out_dir, record.id, name)
        if path is None:
            raise gone(record.id, name)
        with path.open("rb") as source:
            while block := source.read(CHUNK_BYTES):
                yield block

    def link(self, record: JobRecord, name: str) -> str | None:
        return None

    def input_source(self, record: JobRecord) -> str | None:
        if not record.input_path:
            return None
        path = Path(record.input_path)
        # The bundled sample is not this job's own file.
        inside = jobfiles.job_dir(self.out_dir, record.id) in path.parents
        return str(path) if inside and path.is_file() else None

    def output_path(self, record: JobRecord, name: str) -> Path | None:
        return jobfiles.output_file(self.out_dir, record.id, name)

    def remove(self, job_id: str) -> None:
        jobfiles.remove_job_dir(self.out_dir, job_id)

    def health(self) -> str:
        return "ok"

    def job_ids(self) -> set[str]:
        return set()  # retention.sweep_orphans looks after out/

    def newest(self, job_id: str) -> float | None:
        return None


def gone(job_id: str, name: str) -> HTTPException:
    return HTTPException(404, f"Job {job_id!r} has no output file {name!r} (deleted?).")


def media_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"
