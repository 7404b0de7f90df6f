"""Job files on S3-compatible object storage: JOBQUEUE_STORAGE_URL=s3://bucket/prefix, with
JOBQUEUE_S3_ENDPOINT for anything but AWS and credentials from the usual AWS_* variables.

Under the prefix, each job has
    jobs/<id>/input/<name>              the upload, stored once it passed its checks
    jobs/<id>/attempt-<n>/<name>        the outputs of run n
    jobs/<id>/manifest.json             {"attempt": n, "files": [...]}: the run that succeeded
    jobs/<id>/thumbnails/<w>-<stem>.jpg thumbnails, made on the first request for them
A run writes only under its own attempt-<n>/, so a rerun after a crash never mixes its pages
with a dead run's; the record names the attempt that succeeded, and the manifest says it too
for whoever reads the bucket without the database.

Client: obstore (Rust's object_store): multipart uploads from a file without reading it into
memory, streamed downloads, presigned URLs, and several times boto3's throughput on the same
server (bench/storage_clients.py; the README has the figures).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import obstore
from fastapi.responses import Response, StreamingResponse
from obstore.store import S3Store

from . import jobfiles
from .errors import Unavailable
from .filestore import CACHE, CHUNK_BYTES, gone, media_type
from .records import JobRecord
from .settings import Settings

log = logging.getLogger("jobqueue.objectstore")

MANIFEST = "manifest.json"
THUMBNAILS = "thumbnails"
LINK_SECONDS = 3600  # how long a presigned URL (?redirect=1, a preview's source) stays valid
PART_BYTES = 8 * 2**20  # multipart upload part size: a few parts in memory at once, no more
PARTS_AT_ONCE = 4
FILES_AT_ONCE = 6


class StoreUnavailable(Unavailable):
    """The object store cannot be reached, or refused a request."""


def unavailable(error: Exception) -> StoreUnavailable:
    text = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
    return StoreUnavailable(f"The object store (JOBQUEUE_STORAGE_URL) cannot be reached: "
                            f"{text}. Retry in a few seconds.")


class ObjectFiles:
    """FileStore on an S3 bucket: out/<id>/ is only where a job runs, on the machine that
    runs it."""

    remote = True

    def __init__(self, settings: Settings):
        self.out_dir = settings.out_dir
        self.url = settings.storage_url.strip()
        if not self.url.startswith("s3://"):
            raise ValueError(f"JOBQUEUE_STORAGE_URL must look like s3://bucket/prefix, not "
                             f"{self.url!r}")
        endpoint = settings.s3_endpoint.strip() or None
        options = {"connect_timeout": "5s", "timeout": "60s"}
        if endpoint and endpoint.startswith("http://"):
            options["allow_http"] = True
        # A few quick retries: a store that is down must turn into a 503 within seconds, not
        # hold a request for object_store's default three minutes.
        retry = {"max_retries": 2, "retry_timeout": timedelta(seconds=10),
                 "backoff": {"init_backoff": timedelta(milliseconds=100),
                             "max_backoff": timedelta(seconds=2), "base": 2}}
        config = {"endpoint": endpoint, "virtual_hosted_style_request": False} if endpoint \
            else {}
        self.store = S3Store.from_url(self.url, config=config or None, client_options=options,
                                      retry_config=retry)

    # ---- keys ----

    @staticmethod
    def _job(job_id: str) -> str:
        if not jobfiles.is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return f"jobs/{job_id}/"

    def _output(self, record: JobRecord, name: str) -> str | None:
        if name != jobfiles.safe_name(name, default="") or not record.result \
                or name not in record.result.get("files", ()):
            return None
        return f"{self._job(record.id)}attempt-{record.attempt}/{name}"

    # ---- the engine's side ----

    def keep_input(self, job_id: str, upload: Path) -> str:
        key = f"{self._job(job_id)}input/{upload.name}"
        try:
            with upload.open("rb") as source:  # multipart: read a part at a time
                obstore.put(self.store, key, source, chunk_size=PART_BYTES,
                            max_concurrency=PARTS_AT_ONCE)
        except Exception as error:
            raise unavailable(error) from None
        finally:
            jobfiles.remove_job_dir(self.out_dir, job_id)  # the local copy was for the checks
        return key

    def fetch_input(self, job_id: str, input_path: str) -> Path:
        if not input_path.startswith(self._job(job_id) + "input/"):
            return Path(input_path)  # the kind's bundled sample
        folder = jobfiles.job_dir(self.out_dir, job_id) / jobfiles.INPUT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / jobfiles.safe_name(input_path.rsplit("/", 1)[-1])
        partial = target.with_suffix(target.suffix + ".part")
        try:
            with partial.open("wb") as sink:
                for chunk in obstore.get(self.store, input_path):
                    sink.write(chunk)
        except FileNotFoundError:  # obstore's "no such object"
            partial.unlink(missing_ok=True)
            raise FileNotFoundError(f"job {job_id}: its upload is gone from the store") from None
        except Exception as error:
            partial.unlink(missing_ok=True)
            if isinstance(error, OSError) and error.errno is not None:
                raise  # this machine's disk (full?), not the store
            raise unavailable(error) from None
        partial.replace(target)
        return target

    def publish(self, record: JobRecord, files: list[Path]) -> None:
        prefix = f"{self._job(record.id)}attempt-{record.attempt}/"

        def put(path: Path) -> None:
            with path.open("rb") as source:
                obstore.put(self.store, prefix + path.name, source, chunk_size=PART_BYTES,
                            max_concurrency=PARTS_AT_ONCE)

        try:
            # Pages several at once: one at a time, the round trips add up (17 pages, 0.18 s).
            with ThreadPoolExecutor(FILES_AT_ONCE, thread_name_prefix="publish") as pool:
                list(pool.map(put, files))
            manifest = {"attempt": record.attempt, "files": [path.name for path in files],
                        "publishedAt": time.time()}
            obstore.put(self.store, self._job(record.id) + MANIFEST,
                        json.dumps(manifest).encode())
        except Exception as error:
            raise unavailable(error) from None
        shutil.rmtree(jobfiles.job_dir(self.out_dir, record.id), ignore_errors=True)

    def remove(self, job_id: str) -> None:
        jobfiles.remove_job_dir(self.out_dir, job_id)
        prefix = self._job(job_id)
        try:
            keys = [meta["path"] for batch in obstore.list(self.store, prefix=prefix)
                    for meta in batch]
            if keys:
                obstore.delete(self.store, keys)
        except Exception as error:
            raise unavailable(error) from None

    def job_ids(self) -> dict[str, float]:
        """Every job that has objects, with the time of its newest one."""
        newest: dict[str, float] = {}
        try:
            for batch in obstore.list(self.store, prefix="jobs/"):
                for meta in batch:
                    parts = meta["path"].split("/")
                    if len(parts) > 2 and jobfiles.is_job_id(parts[1]):
                        at = meta["last_modified"].timestamp()
                        newest[parts[1]] = max(newest.get(parts[1], 0.0), at)
        except Exception as error:
            raise unavailable(error) from None
        return newest

    def health(self) -> str:
        """"ok" when the store answers (a missing object is an answer), else why not."""
        try:
            obstore.head(self.store, "jobs/health-check")
        except FileNotFoundError:  # obstore's "no such object": reached, and allowed to ask
            return "ok"
        except Exception as error:
            return str(unavailable(error))
        return "ok"

    # ---- the routes' side ----

    def exists(self, record: JobRecord, name: str) -> bool:
        key = self._output(record, name)
        if key is None:
            return False
        try:
            obstore.head(self.store, key)
        except FileNotFoundError:  # obstore's "no such object"
            return False
        except Exception as error:
            raise unavailable(error) from None
        return True

    def complete(self, record: JobRecord) -> bool:
        """One read, not one per page: the manifest is written after every file, and names
        the attempt the record says succeeded."""
        manifest = self.read_small(self._job(record.id) + MANIFEST)
        try:
            return manifest is not None and json.loads(manifest)["attempt"] == record.attempt
        except (ValueError, KeyError, TypeError):
            return False

    def download(self, record: JobRecord, name: str, filename: str | None = None) -> Response:
        key = self._output(record, name)
        if key is None:
            raise gone(record.id, name)
        try:
            found = obstore.get(self.store, key, options={"head": False})
        except FileNotFoundError:  # obstore's "no such object"
            raise gone(record.id, name) from None
        except Exception as error:
            raise unavailable(error) from None
        headers = {**CACHE, "Content-Length": str(found.meta["size"])}
        if filename:
            headers["Content-Disposition"] = f'attachment; filename="{filename}"'
        return StreamingResponse(_stream(found), media_type=media_type(name), headers=headers)

    def chunks(self, record: JobRecord, name: str) -> Iterator[bytes]:
        key = self._output(record, name)
        if key is None:
            raise gone(record.id, name)
        try:
            yield from _stream(obstore.get(self.store, key))
        except FileNotFoundError:  # obstore's "no such object"
            raise gone(record.id, name) from None

    def link(self, record: JobRecord, name: str) -> str | None:
        key = self._output(record, name)
        return self._sign(key) if key else None

    def input_source(self, record: JobRecord) -> str | None:
        path = record.input_path or ""
        return self._sign(path) if path.startswith(self._job(record.id) + "input/") else None

    def _sign(self, key: str) -> str:
        try:
            return obstore.sign(self.store, "GET", key, timedelta(seconds=LINK_SECONDS))
        except Exception as error:
            raise unavailable(error) from None

    def thumbnail_key(self, record: JobRecord, name: str, width: int) -> str:
        return f"{self._job(record.id)}{THUMBNAILS}/{width}-{Path(name).stem}.jpg"

    def read_small(self, key: str) -> bytes | None:
        try:
            return bytes(obstore.get(self.store, key).bytes())
        except FileNotFoundError:  # obstore's "no such object"
            return None
        except Exception as error:
            raise unavailable(error) from None

    def write_small(self, key: str, data: bytes) -> None:
        try:
            obstore.put(self.store, key, data)
        except Exception as error:
            raise unavailable(error) from None

    def copy_to(self, record: JobRecord, name: str, target: Path) -> None:
        """An output file into a local file (a thumbnail is made from it)."""
        with target.open("wb") as sink:
            for chunk in self.chunks(record, name):
                sink.write(chunk)


def _stream(found: obstore.GetResult) -> Iterator[bytes]:
    for chunk in found.stream(min_chunk_size=CHUNK_BYTES):
        yield bytes(chunk)
