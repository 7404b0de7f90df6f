"""`POST /put`: run a job and answer with its result, waiting at most the kind's timeout."""

from __future__ import annotations

import asyncio
import contextlib
import time

from fastapi import APIRouter, Depends, HTTPException, Request, Response

from ..access import owner
from ..engine import Engine
from ..jobs import BadInput, DiskFull, Job, JobStatus, TooLarge, UnsupportedInput
from ..kinds import KINDS
from ..ratelimit import limiter, submit_limit
from ..schemas import JobResult, PutData, PutResponse, error_responses
from ..shutdown import refuse_while_draining, shutting_down
from ..submission import read_submission, start_job

router = APIRouter(tags=["jobs"])

REQUEST_EXAMPLES = {
    "application/json": {
        "schema": {
            "type": "object",
            "properties": {
                "jobType": {"type": "string", "enum": list(KINDS),
                            "default": "message"},
                "data": {"type": "string"},
                "seconds": {"type": "number", "default": 3},
                "dpi": {"type": "integer", "default": 200},
                "width": {"type": "integer"},
                "height": {"type": "integer"},
            },
        },
        "examples": {
            "message": {"value": {"data": "hello xdata team"}},
            "pdf2image": {"summary": "Convert the bundled sample PDF",
                          "value": {"data": "sample", "jobType": "pdf2image", "dpi": 100}},
            "video": {"summary": "Resize the bundled sample video",
                      "value": {"jobType": "video", "width": 320}},
        },
    },
    "multipart/form-data": {
        "schema": {
            "type": "object",
            "properties": {
                "file": {"type": "string", "format": "binary"},
                "jobType": {"type": "string",
                            "enum": [name for name, kind in KINDS.items() if kind.sample]},
                "dpi": {"type": "integer"},
                "width": {"type": "integer"},
                "height": {"type": "integer"},
            },
            "required": ["file", "jobType"],
        },
    },
}


@router.post(
    "/put",
    summary="Run a job and wait for its result",
    description="JSON runs a job on the bundled sample (or a message job); multipart/form-data "
                "with a `file` field processes the upload. Waits at most the kind's timeout.",
    response_model=PutResponse,
    responses=error_responses(400, 408, 409, 413, 415, 422, 429, 500, 503, 504, 507),
    openapi_extra={"requestBody": {"required": False, "content": REQUEST_EXAMPLES}},
    dependencies=[Depends(refuse_while_draining)],
)
@limiter.limit(submit_limit)
async def put(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    settings = request.app.state.settings
    submission = await read_submission(request, settings)
    job = await start_job(engine, submission, origin="put", owner=owner(request))
    timeout = settings.limits(job.kind.name).timeout
    await wait_for_job(request, engine, job, timeout)
    answer = PutResponse(data=PutData(id=job.id, result=job_result(request, job)))
    # Serialized here: a Response goes out as it is, where a model would be validated again.
    return Response(answer.model_dump_json(by_alias=True), media_type="application/json")


async def wait_for_job(request: Request, engine: Engine, job: Job, timeout: float) -> None:
    """Wait until the job finishes; a timeout or a client that hangs up cancels it."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, engine, job))
    try:
        async with asyncio.timeout(timeout):
            # shield: the timeout must not cancel `done`, which other waiters may share.
            await asyncio.shield(job.done)
    except TimeoutError:
        if not job.status.finished:  # it may have finished just as the timeout fired
            raise HTTPException(504, timed_out(job, timeout)) from None
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if not job.status.finished:
            engine.cancel(job, "the /put request ended first")
    if job.status is JobStatus.CANCELLED and request.app.state.draining:
        raise shutting_down(request)  # shutdown stopped it first
    raise_for_failure(job)


def timed_out(job: Job, timeout: float) -> str:
    """The 504's detail: where the time went, since the timeout counts the wait in the queue."""
    now = time.time()
    setting = f"JOBQUEUE_{job.kind.name.upper()}_TIMEOUT"
    if job.started_at is None:
        return (f"Job {job.id} waited {now - job.created_at:.1f} s in the {job.kind.name} queue "
                f"and never started: the {timeout:g} s {setting} counts the wait too. It was "
                "cancelled. Retry when the queue is shorter (GET /health), or use POST /jobs.")
    return (f"Job {job.id} waited {job.started_at - job.created_at:.1f} s in the queue and ran "
            f"{now - job.started_at:.1f} s without finishing within {timeout:g} s ({setting}); "
            "it was stopped. Send smaller input, raise the setting, or use POST /jobs.")


async def _cancel_on_disconnect(request: Request, engine: Engine, job: Job) -> None:
    # The body is already read, so the next message the server sends is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    engine.cancel(job, "client disconnected")


def raise_for_failure(job: Job) -> None:
    if job.status is JobStatus.CANCELLED:
        raise HTTPException(409, f"Job {job.id} was cancelled before it finished.")
    if job.status is JobStatus.FAILED:
        if isinstance(job.error, BadInput):
            status = (413 if isinstance(job.error, TooLarge) else
                      415 if isinstance(job.error, UnsupportedInput) else 422)
            raise HTTPException(status, str(job.error))
        if isinstance(job.error, DiskFull):
            raise HTTPException(507, str(job.error))
        raise HTTPException(500, f"Job {job.id} failed with an internal error; "
                                 "the server log has the details.")


def job_result(request: Request, job: Job) -> JobResult:
    return JobResult(
        worker_name=job.worker_name,
        dequeue_elapsed_ms=round((job.started_at - job.created_at) * 1000, 3),
        process_elapsed_ms=round((job.finished_at - job.started_at) * 1000, 3),
        total_elapsed_ms=round((job.finished_at - job.created_at) * 1000, 3),
        data=job.output.data,
        files=[str(request.url_for("job_file", job_id=job.id, name=path.name))
               for path in job.output.files],
    )
