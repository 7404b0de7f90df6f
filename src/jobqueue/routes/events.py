"""`GET /events`: one Server-Sent Events stream of queue sizes and job changes (the dashboard's)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.sse import EventSourceResponse, ServerSentEvent

from ..access import owner
from ..engine import Engine
from ..jobs import Job
from ..schemas import JobSummary, error_responses
from .jobs import current_summary, job_summary, stream_slot

router = APIRouter(tags=["server"])

# Changes are sent in batches at most this often, so a busy server cannot flood a browser.
BATCH_SECONDS = 0.2


# A job's summary as JSON, made once per state and shared by every stream that sends it; and
# the queue sizes, made at most once per STATS_SECONDS. With JOBQUEUE_MAX_STREAMS open, each
# change would otherwise be turned into JSON once per stream.
MAX_CACHED = 2000
STATS_SECONDS = 0.05
_summaries: dict[tuple, str] = {}
_stats: tuple[float, str] = (0.0, "")


def _data(view: JobSummary) -> dict:
    return view.model_dump(by_alias=True, exclude_none=True)


def _job_json(request: Request, job: Job) -> str:
    engine: Engine = request.app.state.engine
    # The base URL too: the summary's file URLs are made from the request's Host.
    key = (str(request.base_url), job.id, job.status, job.progress, job.finished_at,
           engine.queue_position(job))
    text = _summaries.get(key)
    if text is None:
        if len(_summaries) >= MAX_CACHED:
            _summaries.clear()
        text = _summaries[key] = job_summary(request, job.record(), job).model_dump_json(
            by_alias=True, exclude_none=True)
    return text


def _stats_json(engine: Engine) -> str:
    global _stats
    now = time.monotonic()
    if now - _stats[0] > STATS_SECONDS:
        _stats = (now, json.dumps(engine.stats()))
    return _stats[1]


@router.get(
    "/events",
    response_class=EventSourceResponse,
    summary="Live queue sizes and job changes as Server-Sent Events",
    description="Starts with `event: queues` (as in `/health`) and `event: jobs` (the newest "
                "`limit` jobs, as in `GET /jobs`), then sends `event: job` with a job's new "
                "state, `event: removed` with `{\"id\"}` when a job is deleted, and "
                "`event: queues` after every batch of changes. Runs until the client leaves. "
                "At most `JOBQUEUE_MAX_STREAMS` streams are open at once (503).",
    responses=error_responses(503),
    dependencies=[Depends(stream_slot)],
)
async def events(request: Request,
                 limit: int = Query(20, ge=1, le=100, description="Jobs in the first event")
                 ) -> AsyncIterator[ServerSentEvent]:
    engine: Engine = request.app.state.engine
    # Listening starts before the snapshot, so no change falls between the two.
    listener = engine.feed.listen(owner(request))
    try:
        yield ServerSentEvent(event="queues", data=engine.stats())
        records = await run_in_threadpool(request.app.state.store.list, None, None, limit, 0,
                                          owner(request))
        yield ServerSentEvent(event="jobs",
                              data=[_data(current_summary(request, r)) for r in records])
        while True:
            changed, removed = await listener.next_batch()
            for job in changed:
                yield ServerSentEvent(event="job", raw_data=_job_json(request, job))
            for job_id in removed:
                yield ServerSentEvent(event="removed", data={"id": job_id})
            yield ServerSentEvent(event="queues", raw_data=_stats_json(engine))
            await asyncio.sleep(BATCH_SECONDS)
    finally:
        engine.feed.unlisten(listener)
