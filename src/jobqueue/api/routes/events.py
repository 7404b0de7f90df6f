"""`GET /events`: one Server-Sent Events stream of queue sizes and job changes (the dashboard's)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Query, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent

from jobqueue.api.access import owner
from jobqueue.api.routes import links
from jobqueue.api.routes.jobs import job_summary, stream_slot
from jobqueue.api.schemas import error_responses
from jobqueue.engines import JobEngine
from jobqueue.jobs import JobStatus
from jobqueue.records import JobRecord

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
_workers: tuple[float, str | None] = (0.0, None)


async def _job_json(request: Request, record: JobRecord) -> str:
    engine: JobEngine = request.app.state.engine
    position = (await engine.position(record.id)
                if record.status == JobStatus.QUEUED.value else None)
    # The links' base too: the summary's file URLs start with it.
    key = (links.base(request), record.id, record.status, record.attempt,
           json.dumps(record.progress), record.finished_at, position)
    text = _summaries.get(key)
    if text is None:
        if len(_summaries) >= MAX_CACHED:
            _summaries.clear()
        text = _summaries[key] = (await job_summary(request, record)).model_dump_json(
            by_alias=True, exclude_none=True)
    return text


async def _stats_json(engine: JobEngine) -> str:
    global _stats
    now = time.monotonic()
    if now - _stats[0] > STATS_SECONDS:
        _stats = (now, json.dumps(await engine.stats()))
    return _stats[1]


async def _workers_json(engine: JobEngine) -> str | None:
    """The live worker processes (distributed mode), cached like the queue sizes."""
    global _workers
    now = time.monotonic()
    if now - _workers[0] > STATS_SECONDS:
        processes = await engine.worker_processes()
        _workers = (now, None if processes is None else json.dumps(processes))
    return _workers[1]


async def _queue_events(engine: JobEngine) -> AsyncIterator[ServerSentEvent]:
    yield ServerSentEvent(event="queues", raw_data=await _stats_json(engine))
    if (processes := await _workers_json(engine)) is not None:
        yield ServerSentEvent(event="workers", raw_data=processes)


@router.get(
    "/events",
    response_class=EventSourceResponse,
    summary="Live queue sizes and job changes as Server-Sent Events",
    description="Starts with `event: queues` (as in `/health`) and `event: jobs` (the newest "
                "`limit` jobs, as in `GET /jobs`), then sends `event: job` with a job's new "
                "state (a summary, as in `GET /jobs`), `event: removed` with `{\"id\"}` when a "
                "job is deleted, and `event: queues` after every batch of changes (in the "
                "distributed mode followed by `event: workers`, the live worker processes as "
                "in `/health`). Runs until "
                "the client leaves. At most `JOBQUEUE_MAX_STREAMS` streams are open at once "
                "(503).",
    responses=error_responses(503),
    dependencies=[Depends(stream_slot)],
)
async def events(request: Request,
                 limit: int = Query(20, ge=1, le=100, description="Jobs in the first event")
                 ) -> AsyncIterator[ServerSentEvent]:
    engine: JobEngine = request.app.state.engine
    # Listening starts before the snapshot, so no change falls between the two.
    async with engine.feed(owner(request)) as listener:
        async for event in _queue_events(engine):
            yield event
        records = await engine.list(None, None, limit, 0, owner(request))
        yield ServerSentEvent(event="jobs", raw_data="[" + ",".join(
            [await _job_json(request, record) for record in records]) + "]")
        while True:
            changed, removed = await listener.next_batch()
            for record in changed:
                yield ServerSentEvent(event="job", raw_data=await _job_json(request, record))
            for job_id in removed:
                yield ServerSentEvent(event="removed", data={"id": job_id})
            async for event in _queue_events(engine):
                yield event
            await asyncio.sleep(BATCH_SECONDS)
