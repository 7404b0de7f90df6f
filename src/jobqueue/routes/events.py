"""`GET /events`: one Server-Sent Events stream of queue sizes and job changes (the dashboard's)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Query, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent

from ..access import owner
from ..engine import Engine
from ..schemas import JobView
from .jobs import current_view, job_view

router = APIRouter(tags=["server"])

# Changes are sent in batches at most this often, so a busy server cannot flood a browser.
BATCH_SECONDS = 0.2


def _data(view: JobView) -> dict:
    return view.model_dump(by_alias=True, exclude_none=True)


@router.get(
    "/events",
    response_class=EventSourceResponse,
    summary="Live queue sizes and job changes as Server-Sent Events",
    description="Starts with `event: queues` (as in `/health`) and `event: jobs` (the newest "
                "`limit` jobs, as in `GET /jobs`), then sends `event: job` with a job's new "
                "state, `event: removed` with `{\"id\"}` when a job is deleted, and "
                "`event: queues` after every batch of changes. Runs until the client leaves.",
)
async def events(request: Request,
                 limit: int = Query(20, ge=1, le=100, description="Jobs in the first event")
                 ) -> AsyncIterator[ServerSentEvent]:
    engine: Engine = request.app.state.engine
    # Listening starts before the snapshot, so no change falls between the two.
    listener = engine.feed.listen(owner(request))
    try:
        yield ServerSentEvent(event="queues", data=engine.stats())
        records = request.app.state.store.list(None, None, limit, 0, owner(request))
        yield ServerSentEvent(event="jobs",
                              data=[_data(current_view(request, r)) for r in records])
        while True:
            changed, removed = await listener.next_batch()
            for job in changed:
                yield ServerSentEvent(event="job", data=_data(job_view(request, job.record(), job)))
            for job_id in removed:
                yield ServerSentEvent(event="removed", data={"id": job_id})
            yield ServerSentEvent(event="queues", data=engine.stats())
            await asyncio.sleep(BATCH_SECONDS)
    finally:
        engine.feed.unlisten(listener)
