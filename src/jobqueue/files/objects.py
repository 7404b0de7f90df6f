"""Job files on S3-compatible object storage: JOBQUEUE_STORAGE_URL=s3://bucket/prefix, with
JOBQUEUE_S3_ENDPOINT for anything but AWS and credentials from the usual AWS_* variables.

Under the prefix, each job has
    jobs/<id>/input/<name>                 the upload, stored once it passed its checks
    jobs/<id>/attempt-<n>/<name>           the outputs of run n
    jobs/<id>/attempt-<n>/manifest.json    written last by run n: its outputs are all there
    jobs/<id>/manifest.json                {"attempt": n, "files": [...]}: the run that
                                           succeeded, written once the record says so
    jobs/<id>/thumbnails/<w>-<stem>.jpg    thumbnails, made on the first request for them
A run writes only under its own attempt-<n>/, so a rerun after a crash never mixes its pages
with a dead run's, and a run that was given up on (its worker stopped beating) but still
finishes cannot touch what the run that owns the job wrote: the record names the attempt that
succeeded, and the other attempts' objects are removed then.

Client: obstore (Rust's object_store): multipart uploads from a file without reading it into
memory, streamed downloads, presigned URLs, and several times boto3's throughput for
page-sized files on the same server (bench/objectstore.py; docs/performance.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import obstore
from obstore.exceptions import BaseError as StoreError
from obstore.store import S3Store

from jobqueue.errors import FilesGone, Unavailable
from jobqueue.files import jobfiles
from jobqueue.files.store import CHUNK_BYTES, THUMBNAIL_DIR, Download, media_type
from jobqueue.records import JobRecord
from jobqueue.settings import Settings

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LINK_SECONDS = 3600  # how long a presigned URL (?redirect=1, a preview's source) stays valid
# Multipart uploads: parts of 8 MB, two in flight; the engine runs at most
# STORE_UPLOADS_AT_ONCE (4) uploads at once per process, so uploads to the store hold about
# 100 MB of memory at most, however many clients send.
PART_BYTES = 8 * 2**20
PARTS_AT_ONCE = 2
FILES_AT_ONCE = 6  # a job's outputs published at once: one at a time, round trips add up


class StoreUnavailable(Unavailable):
    """The object store cannot be reached, or refused a request."""


def unavailable(error: Exception) -> StoreUnavailable:
    # obstore's FileNotFoundError on a write, S3's NoSuchBucket code on a listing
    if isinstance(error, FileNotFoundError) or "NoSuchBucket" in str(error):
        text = "its bucket was not found"
    else:
        text = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
    return StoreUnavailable(f"The object store (JOBQUEUE_STORAGE_URL) cannot be reached: "
                            f"{text}. Retry in a few seconds.")


@contextlib.contextmanager
def outages() -> Iterator[None]:
    """Around a write or a listing: the store's errors as StoreUnavailable (503), this
    machine's as they are. The store's are obstore's own, and the built-in FileNotFoundError it
    raises for any 404, which has no errno (this machine's missing files have one); on a write
    or a listing, a 404 means the bucket is missing."""
    try:
        yield
    except (StoreError, FileNotFoundError) as error:
        if isinstance(error, FileNotFoundError) and error.errno is not None:
            raise
        raise unavailable(error) from None


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
        config = ({"endpoint": endpoint, "virtual_hosted_style_request": False}
                  if endpoint else None)
        plain = {"allow_http": True} if endpoint and endpoint.startswith("http://") else {}
        # A few quick retries: a store that is down must turn into a 503 within seconds, not
        # hold a request for object_store's default three minutes.
        retry = {"max_retries": 2, "retry_timeout": timedelta(seconds=10),
                 "backoff": {"init_backoff": timedelta(milliseconds=100),
                             "max_backoff": timedelta(seconds=2), "base": 2}}
        # Two clients: object_store's `timeout` bounds a whole request, body included. Small
        # requests get a short one; file contents (a 1 GB video to a slow client) a long one,
        # with a read timeout to notice a stalled connection instead. On an upload that read
        # timeout runs from the request's start to the answer, sending the part included, so
        # it is long enough for an 8 MB part at about 28 KB/s; and a part that took a while is
        # still retried (object_store retries nothing older than `retry_timeout`).
        self.store = S3Store.from_url(
            self.url, config=config, retry_config=retry,
            client_options={**plain, "connect_timeout": "5s", "timeout": "20s"})
        self.transfers = S3Store.from_url(
            self.url, config=config,
            retry_config={**retry, "retry_timeout": timedelta(minutes=10)},
            client_options={**plain, "connect_timeout": "5s", "timeout": "6h",
                            "read_timeout": "300s"})

    # ---- keys ----

    @staticmethod
    def _job(job_id: str) -> str:
        if not jobfiles.is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return f"jobs/{job_id}/"

    def _attempt(self, record: JobRecord) -> str:
        return f"{self._job(record.id)}attempt-{record.attempt}/"

    def _output(self, record: JobRecord, name: str) -> str | None:
        if name != jobfiles.safe_name(name, default="") or not record.result \
                or name not in record.result.get("files", ()):
            return None
        return self._attempt(record) + name

    # ---- the engine's side ----

    def keep_input(self, job_id: str, upload: Path) -> str:
        key = f"{self._job(job_id)}input/{upload.name}"
        try:
            with outages(), upload.open("rb") as source:  # a part at a time
                obstore.put(self.transfers, key, source, chunk_size=PART_BYTES,
                            max_concurrency=PARTS_AT_ONCE)
        finally:
            jobfiles.remove_job_dir(self.out_dir, job_id)  # the local copy was for the checks
        return key

    def fetch_input(self, job_id: str, input_path: str,
                    check: Callable[[], None] = lambda: None) -> Path:
        if not input_path.startswith(self._job(job_id) + "input/"):
            return Path(input_path)  # the kind's bundled sample
        folder = jobfiles.job_dir(self.out_dir, job_id)
        jobfiles.make_job_dir(folder)
        (folder / jobfiles.INPUT_DIR).mkdir(exist_ok=True)
        target = folder / jobfiles.INPUT_DIR / jobfiles.safe_name(input_path.rsplit("/", 1)[-1])
        partial = target.with_suffix(target.suffix + ".part")
        try:
            with partial.open("wb") as sink:
                for chunk in obstore.get(self.transfers, input_path):
                    check()
                    sink.write(chunk)
        except FileNotFoundError as error:
            partial.unlink(missing_ok=True)
            if error.errno is not None:
                raise  # this machine's folder went, not the object
            raise FileNotFoundError(f"job {job_id}: its upload is gone from the store") from None
        except StoreError as error:
            partial.unlink(missing_ok=True)
            raise unavailable(error) from None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(target)
        return target

    def publish(self, record: JobRecord, files: list[Path],
                check: Callable[[], None] = lambda: None) -> None:
        prefix = self._attempt(record)

        def put(path: Path) -> None:
            check()  # a cancel waits for the files on their way, not for all of them
            with path.open("rb") as source:
                obstore.put(self.transfers, prefix + path.name, source,
                            chunk_size=PART_BYTES, max_concurrency=PARTS_AT_ONCE)

        with outages():
            with ThreadPoolExecutor(FILES_AT_ONCE, thread_name_prefix="publish") as pool:
                list(pool.map(put, files))
            # Last: the attempt's outputs are all there once this is.
            obstore.put(self.store, prefix + MANIFEST, self._manifest(record, files))

    def finished(self, record: JobRecord) -> None:
        """The record says `record.attempt` succeeded: name it in the job's manifest, drop
        the other attempts' objects and this machine's scratch copy."""
        jobfiles.remove_job_dir(self.out_dir, record.id)
        job = self._job(record.id)
        try:
            with outages():
                obstore.put(self.store, job + MANIFEST, self._manifest(record, None))
                mine = self._attempt(record)
                others = [meta["path"]
                          for batch in obstore.list(self.store, prefix=job + "attempt-")
                          for meta in batch if not meta["path"].startswith(mine)]
                if others:
                    obstore.delete(self.store, others)
        except StoreUnavailable as error:
            # The other attempts' objects go with the job; the manifest is for people.
            log.warning("job %s: its manifest could not be written: %s", record.id, error)

    @staticmethod
    def _manifest(record: JobRecord, files: list[Path] | None) -> bytes:
        names = [path.name for path in files] if files is not None else \
            (record.result or {}).get("files", [])
        return json.dumps({"attempt": record.attempt, "files": names,
                           "at": time.time()}).encode()

    def remove(self, job_id: str) -> None:
        jobfiles.remove_job_dir(self.out_dir, job_id)
        with outages():
            keys = [meta["path"] for batch in obstore.list(self.store, prefix=self._job(job_id))
                    for meta in batch]
            if keys:
                obstore.delete(self.store, keys)

    def job_ids(self) -> set[str]:
        """Every job that has objects: one name per job from the store (its "folders"), not
        every object."""
        try:
            listing = obstore.list_with_delimiter(self.store, prefix="jobs/")
        except FileNotFoundError:  # obstore's "no such object": nothing under jobs/ yet
            return set()
        except StoreError as error:
            raise unavailable(error) from None
        names = (prefix.rstrip("/").rsplit("/", 1)[-1] for prefix in listing["common_prefixes"])
        return {name for name in names if jobfiles.is_job_id(name)}

    def newest(self, job_id: str) -> float | None:
        """When the newest object of a job was written (epoch seconds); None: it has none."""
        with outages():
            times = [meta["last_modified"].timestamp()
                     for batch in obstore.list(self.store, prefix=self._job(job_id))
                     for meta in batch]
        return max(times, default=None)

    def health(self) -> str:
        """"ok" when the bucket answers a listing, else why not (a missing bucket too)."""
        try:
            next(iter(obstore.list(self.store, prefix="jobs/", chunk_size=1)), None)
        except FileNotFoundError:  # obstore's "no such bucket"
            return f"the bucket of JOBQUEUE_STORAGE_URL ({self.url}) does not exist"
        except StoreError as error:
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
        except StoreError as error:
            raise unavailable(error) from None
        return True

    def complete(self, record: JobRecord) -> bool:
        """One read, not one per page: the attempt's manifest is written after its files."""
        return self.read_small(self._attempt(record) + MANIFEST) is not None

    def download(self, record: JobRecord, name: str, filename: str | None = None) -> Download:
        found = self._open(record, name)
        return Download(found.meta["size"], media_type(name), filename,
                        chunks=_stream(found, record.id))

    def chunks(self, record: JobRecord, name: str) -> Iterator[bytes]:
        yield from _stream(self._open(record, name), record.id)

    def _open(self, record: JobRecord, name: str) -> obstore.GetResult:
        """The GET of an output file, its body not read yet: FilesGone or StoreUnavailable
        before any byte."""
        key = self._output(record, name)
        if key is None:
            raise FilesGone(record.id, name)
        try:
            return obstore.get(self.transfers, key)
        except FileNotFoundError:  # obstore's "no such object"
            raise FilesGone(record.id, name) from None
        except StoreError as error:
            raise unavailable(error) from None

    def link(self, record: JobRecord, name: str) -> str | None:
        key = self._output(record, name)
        return self._sign(key) if key else None

    def output_source(self, record: JobRecord, name: str) -> str | None:
        return self.link(record, name)  # ffmpeg reads it over HTTP

    def has_input(self, record: JobRecord) -> bool:
        key = record.input_path or ""
        if not key.startswith(self._job(record.id) + "input/"):
            return True  # no upload: the kind's bundled sample
        try:
            obstore.head(self.store, key)
        except FileNotFoundError:  # obstore's "no such object"
            return False
        except StoreError as error:
            raise unavailable(error) from None
        return True

    def input_source(self, record: JobRecord) -> str | None:
        path = record.input_path or ""
        return self._sign(path) if path.startswith(self._job(record.id) + "input/") else None

    def _sign(self, key: str) -> str:
        try:
            return obstore.sign(self.store, "GET", key, timedelta(seconds=LINK_SECONDS))
        except StoreError as error:
            raise unavailable(error) from None

    def thumbnail_key(self, record: JobRecord, name: str, width: int) -> str:
        return f"{self._job(record.id)}{THUMBNAIL_DIR}/{width}-{Path(name).stem}.jpg"

    def kept_thumbnail(self, record: JobRecord, name: str, width: int) -> bytes | None:
        return self.read_small(self.thumbnail_key(record, name, width))

    def keep_thumbnail(self, record: JobRecord, name: str, width: int, jpeg: bytes) -> None:
        self.write_small(self.thumbnail_key(record, name, width), jpeg)

    def read_small(self, key: str) -> bytes | None:
        try:
            return bytes(obstore.get(self.store, key).bytes())
        except FileNotFoundError:  # obstore's "no such object"
            return None
        except StoreError as error:
            raise unavailable(error) from None

    def write_small(self, key: str, data: bytes) -> None:
        with outages():
            obstore.put(self.store, key, data)

    def local_copy(self, record: JobRecord, name: str, scratch: Path) -> Path:
        """An output file copied into the folder `scratch` (a thumbnail is made from it)."""
        target = scratch / jobfiles.safe_name(name)
        with target.open("wb") as sink:
            for chunk in self.chunks(record, name):
                sink.write(chunk)
        return target


def _stream(found: obstore.GetResult, job_id: str) -> Iterator[bytes]:
    """A GET's body. Once the answer's head is out, an error can only cut it short: it is
    logged as what it is (the store), and the client sees a short body, never a 500."""
    try:
        for chunk in found.stream(min_chunk_size=CHUNK_BYTES):
            yield bytes(chunk)
    except StoreError as error:
        log.warning("job %s: a download from the object store broke off: %s", job_id, error)
        raise unavailable(error) from None
