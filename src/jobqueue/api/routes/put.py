"""`POST /put`: run a job and answer with its result, waiting at most the kind's timeout."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time

from fastapi import APIRouter, FastAPI, HTTPException, Request, Response
from fastapi.routing import APIRoute

from jobqueue.api.access import owner
from jobqueue.api.prefer import APPLIED, preferences
from jobqueue.api.ratelimit import check_submission, client_key
from jobqueue.api.routes import links
from jobqueue.api.routes.jobs import job_view
from jobqueue.api.schemas import (
    REQUEST_EXAMPLES,
    JobResult,
    PutData,
    PutResponse,
    error_responses,
)
from jobqueue.api.shutdown import shutting_down
from jobqueue.api.submission import read_submission, start_job
from jobqueue.engines import JobEngine
from jobqueue.errors import Conflict, JobFailed
from jobqueue.jobs import FINISHED, JobKind, JobStatus
from jobqueue.metrics import Outcome
from jobqueue.records import JobRecord, Origin

router = APIRouter(tags=["jobs"])

# How long a job runs before its client's leaving is watched for (then it is cancelled).
WATCH_AFTER_SECONDS = 0.1

# The served kinds' names are filled in by describe_kinds.
REQUEST_BODY = {"requestBody": {"required": False, "content": REQUEST_EXAMPLES}}


def describe_kinds(app: FastAPI, kinds: dict[str, JobKind]) -> None:
    """Name the served kinds in /put's OpenAPI request body: those taking a file in the
    multipart form, all of them in the JSON one."""
    extra = copy.deepcopy(REQUEST_BODY)
    content = extra["requestBody"]["content"]
    content["application/json"]["schema"]["properties"]["jobType"]["enum"] = list(kinds)
    content["multipart/form-data"]["schema"]["properties"]["jobType"]["enum"] = [
        name for name, kind in kinds.items() if kind.sample]
    examples = content["application/json"]["examples"]
    content["application/json"]["examples"] = {
        name: example for name, example in examples.items() if name in kinds}
    for route in app.routes:
        if isinstance(route, APIRoute) and route.endpoint is put:
            route.openapi_extra = extra


@router.post(
    "/put",
    summary="Run a job and wait for its result",
    description="JSON runs a job on the bundled sample (or a message job); multipart/form-data "
                "with a `file` field processes the upload. Waits at most the kind's timeout. "
                "With `Prefer: respond-async, wait=N`, a job not ended after N seconds is "
                "handed over: 202 with its status and Location, and it runs on as a POST /jobs "
                "job would.",
    response_model=PutResponse,
    responses={202: {"description": "Prefer: respond-async, and the job had not ended within "
                                    "its wait: the job's status (as GET /jobs/{id})"},
               **error_responses(400, 408, 409, 413, 415, 422, 429, 500, 503, 504, 507)},
    openapi_extra=REQUEST_BODY,
)
async def put(request: Request) -> Response:
    check_submission(request)
    engine: JobEngine = request.app.state.engine
    settings = request.app.state.settings
    prefer = preferences(request)
    submission = await read_submission(request, settings, callbacks=prefer.respond_async)
    record = await start_job(engine, submission, Origin.PUT, owner=owner(request),
                             fair_key=client_key(request), respond_async=prefer.respond_async)
    timeout = settings.limits(request.app.state.kinds[record.job_type]).timeout
    hand_over_after = min(prefer.wait or 0.0, timeout) if prefer.respond_async else None
    record = await wait_for_job(request, engine, record, timeout, hand_over_after)
    if record.status not in FINISHED:  # handed over: it runs on as a kept job
        view = await job_view(request, record)
        return Response(view.model_dump_json(by_alias=True, exclude_none=True), status_code=202,
                        media_type="application/json",
                        headers={"Location": links.link(request, f"/jobs/{record.id}"),
                                 APPLIED: "respond-async"})
    # Made without validation (what goes in is the server's own, of the right types) and
    # serialized here: a Response goes out as it is, where a model would be validated again.
    answer = PutResponse.model_construct(data=PutData.model_construct(
        id=record.id, result=job_result(request, record)))
    return Response(answer.model_dump_json(by_alias=True), media_type="application/json")


async def wait_for_job(request: Request, engine: JobEngine, record: JobRecord,
                       timeout: float, hand_over_after: float | None = None) -> JobRecord:
    """The job's final record; a timeout or a client that hangs up cancels the job. With
    `hand_over_after` (Prefer: respond-async), a job not ended by then is handed over
    (engine.hand_over) and its record, not ended, returned."""
    watcher: asyncio.Task | None = None

    def watch() -> None:
        nonlocal watcher
        watcher = asyncio.create_task(_cancel_on_disconnect(request, engine, record.id))

    # Most tiny jobs end before this and need no watcher task, which cost them a tenth of
    # their time on the event loop.
    start_watching = request.app.state.loop.call_later(WATCH_AFTER_SECONDS, watch)
    final = None
    try:
        if hand_over_after is not None:
            try:
                final = await engine.wait(record.id, hand_over_after)
            except TimeoutError:
                final = await engine.hand_over(record.id)
                if final is None:  # it ended just now: its end is the answer
                    final = await engine.wait(record.id, timeout)
                else:
                    return final
        else:
            final = await engine.wait(record.id, timeout)
    except TimeoutError:
        current = await engine.get(record.id) or record
        if current.status not in FINISHED:  # it may have finished just as the timeout fired
            await engine.cancel(record.id, "the /put timeout", Outcome.DEADLINE)
            raise HTTPException(504, timed_out(current, timeout)) from None
        final = current
    finally:
        start_watching.cancel()
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if final is None:  # the request ended first (the client left, the server stops)
            await asyncio.shield(engine.cancel(record.id, "the /put request ended first"))
    if final.status == JobStatus.CANCELLED.value:
        if request.app.state.draining:
            raise shutting_down(request)  # shutdown stopped it first
        if time.time() >= final.created_at + timeout:
            # The engine stopped it at its deadline before the timeout above fired (a busy
            # event loop runs its timers late): the same 504.
            raise HTTPException(504, timed_out(final, timeout))
    raise_for_failure(final)
    return final


def timed_out(record: JobRecord, timeout: float) -> str:
    """The 504's detail: where the time went, since the timeout counts the wait in the queue."""
    now = time.time()
    setting = f"JOBQUEUE_{record.job_type.upper()}_TIMEOUT"
    if record.started_at is None:
        return (f"Job {record.id} waited {now - record.created_at:.1f} s in the "
                f"{record.job_type} queue and never started: the {timeout:g} s {setting} counts "
                "the wait too. It was cancelled. Retry when the queue is shorter (GET /health), "
                "or use POST /jobs.")
    return (f"Job {record.id} waited {record.started_at - record.created_at:.1f} s in the "
            f"queue and ran {now - record.started_at:.1f} s without finishing within "
            f"{timeout:g} s ({setting}); it was stopped. Send smaller input, raise the setting, "
            "or use POST /jobs.")


async def _cancel_on_disconnect(request: Request, engine: JobEngine, job_id: str) -> None:
    # The body is already read, so the next message the server sends is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    await engine.cancel(job_id, "client disconnected")


def raise_for_failure(record: JobRecord) -> None:
    """A job that did not succeed as an error: JobFailed, answered by the category of its error
    (api/problems.py); a cancelled one as a Conflict (409)."""
    if record.status == JobStatus.CANCELLED.value:
        raise Conflict(f"Job {record.id} was cancelled before it finished.")
    if record.status == JobStatus.FAILED.value:
        raise JobFailed(record.error_kind or "internal", record.error or f"Job {record.id} failed.",
                        record.id)


def job_result(request: Request, record: JobRecord) -> JobResult:
    result = record.result or {}
    return JobResult.model_construct(
        worker_name=record.worker_name or "",
        dequeue_elapsed_ms=round((record.started_at - record.created_at) * 1000, 3),
        process_elapsed_ms=round((record.finished_at - record.started_at) * 1000, 3),
        total_elapsed_ms=round((record.finished_at - record.created_at) * 1000, 3),
        data=result.get("data") or {},
        files=[links.route(request, "job_file", job_id=record.id, name=name)
               for name in result.get("files") or []],
    )
