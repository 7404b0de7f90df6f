"""`GET /throughput`: jobs finished per minute and their run times, for the dashboard's chart.

From the rollup written with each job's end beside the records (rollup.py), not the metrics'
counters: those start at zero with each process, the rollup outlives restarts and is shared by
every replica. Only the caller's own jobs.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Query, Request

from jobqueue.api.access import owner
from jobqueue.api.schemas import MinuteView, Throughput

router = APIRouter(tags=["server"])


@router.get("/throughput", response_model=Throughput,
            summary="Jobs finished per minute, with p50 and p95 run times, per kind")
async def throughput(request: Request, minutes: int = Query(60, ge=1, le=1440)) -> Throughput:
    # Whole minutes: this one and the `minutes - 1` before it.
    since = (int(time.time()) // 60 - (minutes - 1)) * 60
    figures = await request.app.state.engine.throughput(owner(request), since)
    kinds: dict[str, list[MinuteView]] = {name: [] for name in request.app.state.kinds}
    for row in figures:
        kinds.setdefault(row.job_type, []).append(MinuteView(
            minute=row.minute, finished=row.finished, p50_seconds=row.p50_seconds,
            p95_seconds=row.p95_seconds))
    return Throughput(since=since, minutes=minutes, kinds=kinds)
