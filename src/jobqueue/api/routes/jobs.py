"""Asynchronous jobs: submit (202), status, list, live events, result download and cancel."""

from __future__ import annotations

import logging
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.sse import EventSourceResponse
from starlette.types import Send

from jobqueue import lifecycle, webhooks
from jobqueue.api.access import owner
from jobqueue.api.downloads import file_response
from jobqueue.api.prefer import APPLIED, preferences
from jobqueue.api.ratelimit import check_submission, client_key
from jobqueue.api.routes import links
from jobqueue.api.schemas import (
    REQUEST_EXAMPLES,
    Accepted,
    CallbackView,
    EarlierError,
    JobList,
    JobSummary,
    JobView,
    Links,
    ProgressView,
    ResultSummary,
    ResultView,
    error_responses,
)
from jobqueue.api.submission import read_submission, start_job
from jobqueue.engines import JobEngine
from jobqueue.errors import BadInput, Conflict, FilesGone, NotFound, Unavailable
from jobqueue.files import jobfiles
from jobqueue.files.store import FileStore
from jobqueue.jobs import FINISHED, JobStatus
from jobqueue.records import JobRecord, Origin

log = logging.getLogger(__name__)

router = APIRouter(tags=["async jobs"])

# How long DELETE waits for a running job to stop before it answers.
CANCEL_WAIT_SECONDS = 5


async def find_job(job_id: str, request: Request) -> JobRecord:
    """The job's record, when it exists and belongs to the caller's API key; 404 otherwise."""
    engine: JobEngine = request.app.state.engine
    record = await engine.get(job_id) if jobfiles.is_job_id(job_id) else None
    if record is None or record.owner != owner(request):
        raise NotFound(f"There is no job {job_id!r}; it may have been deleted.")
    return record


def _time(timestamp: float | None) -> str | None:
    return datetime.fromtimestamp(timestamp, UTC).isoformat() if timestamp else None


async def job_view(request: Request, record: JobRecord, with_callback: bool = True) -> JobView:
    """The whole job, its result's data included; its webhook delivery too, if it has one
    (`with_callback`)."""
    view = JobView(**await _fields(request, record))
    if record.status == JobStatus.SUCCEEDED.value and record.result:
        view.result = ResultView(data=record.result.get("data") or {},
                                 files=_file_urls(request, record))
    # Only a server with a secret has deliveries to show (webhooks.py): the others skip the
    # look, a query of its own in the distributed mode.
    if with_callback and request.app.state.settings.webhook_secret.get_secret_value():
        engine: JobEngine = request.app.state.engine
        shown = webhooks.shown(await engine.callback(record.id), record)
        view.callback = CallbackView(**shown) if shown else None
    return view


async def status_document(app: FastAPI, record: JobRecord) -> dict:
    """What a webhook delivers (webhooks.Deliverer): the job's status document as GET
    /jobs/{id} answers it, without its `callback` (the delivery it is the body of). Links as
    in any answer: paths, or absolute from JOBQUEUE_PUBLIC_URL."""
    request = Request({"type": "http", "app": app, "method": "GET", "path": "/",
                       "root_path": "", "headers": [], "query_string": b""})
    view = await job_view(request, record, with_callback=False)
    return view.model_dump(mode="json", by_alias=True, exclude_none=True)


async def job_summary(request: Request, record: JobRecord) -> JobSummary:
    """The job as lists and the event feed show it: the result's file URLs, not its data."""
    summary = JobSummary(**await _fields(request, record))
    if record.status == JobStatus.SUCCEEDED.value and record.result:
        summary.result = ResultSummary(files=_file_urls(request, record))
    return summary


async def _fields(request: Request, record: JobRecord) -> dict:
    engine: JobEngine = request.app.state.engine
    waiting = record.status == JobStatus.QUEUED.value
    kind = request.app.state.kinds.get(record.job_type)
    retries = request.app.state.settings.limits(kind).retries if kind else 0
    estimate = await engine.estimated_start(record.id) if waiting else None
    return dict(
        id=record.id,
        job_type=record.job_type,
        status=record.status,
        attempt=record.attempt,
        max_attempts=lifecycle.max_attempts(kind, retries) if kind else 1,
        priority=record.priority,
        progress=ProgressView(**{"done": 0, "total": 0, "unit": "", **record.progress}),
        queue_position=await engine.position(record.id) if waiting else None,
        estimated_start_seconds=round(estimate, 1) if estimate is not None else None,
        next_attempt_at=_time(record.next_attempt_at) if waiting else None,
        earlier_errors=[EarlierError(attempt=e["attempt"], error=e["error"],
                                     finished_at=_time(e["finishedAt"]))
                        for e in record.earlier_errors] or None,
        created_at=_time(record.created_at),
        started_at=_time(record.started_at),
        finished_at=_time(record.finished_at),
        error=record.error if record.status == JobStatus.FAILED.value else None,
    )


def _file_urls(request: Request, record: JobRecord) -> list[str]:
    return [links.route(request, "job_file", job_id=record.id, name=name)
            for name in record.result.get("files") or []]


@router.post(
    "/jobs",
    status_code=202,
    summary="Submit a job and come back for it",
    description="Same body as `POST /put`. Answers at once with the job's id and links; "
                "an upload of the wrong type is refused with 415 before it is queued. With an "
                "`Idempotency-Key` header the caller used before, it answers the job submitted "
                "then instead of queueing another. With `Prefer: wait=N`, waits up to N seconds "
                "(at most the kind's timeout) and answers 200 with the ended job's status and "
                "result if it ended by then.",
    response_model=Accepted,
    responses={200: {"model": JobView, "description": "Prefer: wait=N, and the job ended "
                     "within it: its status and result"},
               **error_responses(400, 408, 413, 415, 422, 429, 503, 507)},
    openapi_extra={"requestBody": {"required": False, "content": REQUEST_EXAMPLES}},
)
async def submit_job(request: Request, response: Response,
                     idempotency_key: str | None = Header(
                         None, max_length=200,
                         description="Any string unique to this submission: a retry with the "
                                     "same key gets the first job back")) -> Response:
    check_submission(request)
    engine: JobEngine = request.app.state.engine
    settings = request.app.state.settings
    submission = await read_submission(request, settings, idempotency_key)
    record = await start_job(engine, submission, Origin.JOBS,
                             check_input=True, owner=owner(request),
                             idempotency_key=idempotency_key, fair_key=client_key(request))
    wait = preferences(request).wait
    if wait:
        timeout = settings.limits(request.app.state.kinds[record.job_type]).timeout
        wait = min(wait, timeout)
        try:
            ended = await engine.wait(record.id, wait)
        except (TimeoutError, LookupError):  # still running (or deleted meanwhile): 202
            pass
        else:
            view = await job_view(request, ended)
            return JSONResponse(view.model_dump(mode="json", by_alias=True, exclude_none=True),
                                headers={"Location": links.link(request, f"/jobs/{record.id}"),
                                         APPLIED: f"wait={wait:g}"})
    # "queued" even if a worker picked it up meanwhile: that is what was accepted. A repeat
    # with an Idempotency-Key says where the first one is now.
    status = record.status if record.id != submission.job_id else JobStatus.QUEUED.value
    return accepted(request, response, record, status)


def accepted(request: Request, response: Response, record: JobRecord, status: str) -> Accepted:
    """The 202 of a job queued: its id, status and links, and its Location."""
    url = links.link(request, f"/jobs/{record.id}")
    response.headers["Location"] = url
    return Accepted(id=record.id, job_type=record.job_type, status=status,
                    links=Links(self_=url, events=f"{url}/events", result=f"{url}/result",
                                cancel=url))


@router.post(
    "/jobs/{job_id}/retry",
    status_code=202,
    summary="Run a failed job again",
    description="A failed job runs again as a new attempt, with its upload (the dead-letter "
                "path); its failure joins `earlierErrors`. 409 for a job that has not failed, "
                "410 once its upload is gone (a failed /put job keeps none).",
    response_model=Accepted,
    responses=error_responses(404, 409, 410, 429, 503, 507),
)
async def retry_job(request: Request, response: Response,
                    record: JobRecord = Depends(find_job)) -> Accepted:
    check_submission(request)
    engine: JobEngine = request.app.state.engine
    queued = await engine.retry(record.id)
    return accepted(request, response, queued, JobStatus.QUEUED.value)


@router.get("/jobs", summary="List jobs, newest first: summaries, without the results' data",
            response_model=JobList,
            response_model_exclude_none=True, responses=error_responses(422))
async def list_jobs(
    request: Request,
    status: JobStatus | None = Query(None, description="Only jobs with this status"),
    job_type: str | None = Query(None, alias="jobType", description="Only jobs of this kind"),
    limit: int = Query(20, ge=1, le=100),
    offset: int = Query(0, ge=0, le=2**62),
) -> JobList:
    kinds = request.app.state.kinds
    if job_type is not None and job_type not in kinds:
        raise BadInput(f"Unknown jobType {job_type!r}; valid job types: {', '.join(kinds)}.")
    engine: JobEngine = request.app.state.engine
    records = await engine.list(status.value if status else None, job_type, limit, offset,
                                owner(request))
    items = [await job_summary(request, record) for record in records]
    next_page = None
    if len(records) == limit:
        next_page = links.with_query(request, offset=offset + limit)
    return JobList(items=items, next=next_page)


@router.get("/jobs/{job_id}", summary="A job's status, progress and result",
            response_model=JobView, response_model_exclude_none=True,
            responses=error_responses(404))
async def get_job(request: Request, record: JobRecord = Depends(find_job)) -> JobView:
    return await job_view(request, record)


@router.delete(
    "/jobs/{job_id}",
    summary="Cancel a job, or delete a finished one and its files",
    description="A queued job never starts; a running one has its child processes killed and "
                "its partial output removed. A finished job is deleted with its files.",
    response_model=JobView, response_model_exclude_none=True, responses=error_responses(404),
)
async def delete_job(request: Request, record: JobRecord = Depends(find_job)) -> JobView:
    engine: JobEngine = request.app.state.engine
    if record.status not in FINISHED:
        await engine.cancel(record.id, "DELETE request")
        try:
            record = await engine.wait(record.id, CANCEL_WAIT_SECONDS)
        except TimeoutError:
            record = await engine.get(record.id) or record
        except LookupError:  # ended, then deleted by another DELETE while this one waited
            raise NotFound(f"There is no job {record.id!r}; it was cancelled and deleted "
                           "meanwhile.") from None
        return await job_view(request, record)
    await engine.delete(record.id)
    return await job_view(request, record)


async def stream_slot(request: Request) -> AsyncIterator[None]:
    """Dependency of the event-stream routes: a slot held until the stream ends, 503 when
    JOBQUEUE_MAX_STREAMS are open."""
    with request.app.state.streams.slot():
        yield


@router.get("/jobs/{job_id}/events", response_class=EventSourceResponse,
            summary="Live status and progress as Server-Sent Events",
            description="One `data:` line of JSON (the same shape as `GET /jobs/{id}`) per "
                        "change, starting with the current state and ending after the final "
                        "one. At most `JOBQUEUE_MAX_STREAMS` streams are open at once (503).",
            responses=error_responses(404, 503), dependencies=[Depends(stream_slot)])
async def job_events(request: Request, record: JobRecord = Depends(find_job)
                     ) -> AsyncIterator[dict]:
    engine: JobEngine = request.app.state.engine
    async for state in engine.watch(record.id):
        yield (await job_view(request, state)).model_dump(by_alias=True, exclude_none=True)


@router.get(
    "/jobs/{job_id}/result",
    summary="Download the result",
    description="Several output files (pdf2image pages) come as one zip, a single file "
                "(video) as itself, both as attachments; a job without files (message) "
                "answers its JSON result. 409 until the job has succeeded.",
    responses={200: {"content": {"application/zip": {}, "video/mp4": {},
                                 "application/json": {}}},
               **error_responses(404, 409, 503)},
)
async def job_result(request: Request, record: JobRecord = Depends(find_job)) -> Response:
    if record.status != JobStatus.SUCCEEDED.value or record.result is None:
        reason = f": {record.error}" if record.error else ""
        raise Conflict(f"Job {record.id} is {record.status}{reason}; the result is ready once "
                       "it has succeeded.")
    names = record.result["files"]
    if not names:
        return JSONResponse(record.result["data"])
    files: FileStore = request.app.state.engine.files
    if not await run_in_threadpool(files.complete, record):
        raise NotFound(f"The files of job {record.id} have been deleted.")
    if len(names) == 1:
        return file_response(await run_in_threadpool(
            files.download, record, names[0],
            f"{record.job_type}-{record.id}{Path(names[0]).suffix}"))
    return ZipDownload(
        zip_stream(files, record, names), media_type="application/zip",
        headers={"Content-Disposition":
                 f'attachment; filename="{record.job_type}-{record.id}.zip"'},
    )


class CutShort(Exception):
    """A job's files could not be read (it was deleted, the store failed) while its zip was
    being sent, so the rest of it cannot be."""


class ZipDownload(StreamingResponse):
    """A zip sent as it is made. Cut short, it ends without its last chunk, so the client sees
    an incomplete download (not a valid zip of fewer pages), and the log gets a line saying
    why (and uvicorn's that the answer was not completed) rather than a traceback."""

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        except CutShort as error:
            log.warning("a zip download stopped partway: %s", error)


class _Chunks:
    """A write-only file for zipfile that hands back what was written since the last take()."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


def zip_stream(files: FileStore, record: JobRecord, names: list[str]) -> Iterator[bytes]:
    """A zip of a job's output files, produced a chunk at a time as the client reads and as
    the files are read (from the disk or the object store; PNGs are compressed already:
    stored), so a download holds a chunk of memory, not a page (which can be 60 MB)."""
    chunks = _Chunks()
    stamp = time.localtime(record.finished_at or time.time())[:6]
    with zipfile.ZipFile(chunks, "w", zipfile.ZIP_STORED) as archive:
        for name in names:
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.external_attr = 0o644 << 16  # rw-r--r-- once unzipped
            with archive.open(info, "w", force_zip64=True) as entry:
                try:
                    for block in files.chunks(record, name):
                        entry.write(block)
                        yield chunks.take()
                except (FilesGone, OSError, Unavailable) as error:
                    raise CutShort(f"job {record.id}: {error}") from None
    yield chunks.take()
