"""Deleting finished jobs and their files once they are older than JOBQUEUE_RESULT_TTL."""

from __future__ import annotations

import asyncio
import logging
import time

from . import storage
from .events import Feed
from .settings import Settings
from .store import JobStore

log = logging.getLogger("jobqueue.retention")


def sweep(store: JobStore, settings: Settings) -> list[tuple[str, str]]:
    """Delete expired jobs now; returns their ids and owners."""
    expired = store.finished_before(time.time() - settings.result_ttl)
    for record in expired:
        store.delete(record.id)  # first, so nobody is sent to missing files
        storage.remove_job_dir(settings.out_dir, record.id)
        log.info("job %s: deleted after the %g s retention", record.id, settings.result_ttl)
    return [(record.id, record.owner) for record in expired]


async def sweep_forever(store: JobStore, settings: Settings, feed: Feed) -> None:
    # A tenth of the TTL keeps expired jobs from lingering long; a minute at most.
    interval = min(60.0, max(0.5, settings.result_ttl / 10))
    while True:
        await asyncio.sleep(interval)
        try:
            for job_id, owner in await asyncio.to_thread(sweep, store, settings):
                feed.job_removed(job_id, owner)  # open dashboards drop it
        except Exception:
            log.exception("retention sweep failed; trying again in %g s", interval)
