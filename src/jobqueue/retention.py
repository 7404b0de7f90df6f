"""Deleting finished jobs and their files once they are older than JOBQUEUE_RESULT_TTL, and job
folders (or objects, with object storage) that no record owns (what an upload cut off by
`kill -9` leaves behind)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Set
from pathlib import Path

from . import jobfiles, rollup
from .engines import JobEngine
from .errors import Unavailable
from .filestore import FileStore
from .settings import Settings
from .records import JobStore

log = logging.getLogger("jobqueue.retention")

# A job folder with no record and nothing written in it for this long is a leftover. An upload
# still going on writes at least every 30 s (JOBQUEUE_MIN_UPLOAD_KBPS cuts off one that
# stalls), and its record is written within the 30 s its content check may take once it is in.
ORPHAN_SECONDS = 600.0


def sweep_orphans(store: JobStore, out_dir: Path, receiving: Set[str] = frozenset()
                  ) -> list[str]:
    """Remove job folders under `out_dir` (named by a job id, and marked as one) that no
    record owns, that this server is not `receiving` an upload for, and that nothing has
    written to for ORPHAN_SECONDS; nothing else under `out_dir` is touched. Returns their ids."""
    removed = []
    cutoff = time.time() - ORPHAN_SECONDS
    try:
        entries = list(os.scandir(out_dir))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not (jobfiles.is_job_id(entry.name) and entry.is_dir(follow_symlinks=False)
                and Path(entry.path, jobfiles.JOB_MARK).is_file()) or entry.name in receiving:
            continue
        if store.get(entry.name) is not None or _last_written(Path(entry.path)) > cutoff:
            continue
        jobfiles.remove_job_dir(out_dir, entry.name)
        log.info("job %s: its folder had no record (a leftover of a server killed mid-upload); "
                 "removed", entry.name)
        removed.append(entry.name)
    return removed


def sweep_stored_orphans(store: JobStore, files: FileStore) -> list[str]:
    """With object storage: remove the objects of jobs that no record owns (a replica killed
    between storing an upload and writing its record; a delete while the store was down),
    once their newest object is ORPHAN_SECONDS old. Returns their ids."""
    if not files.remote:
        return []
    cutoff = time.time() - ORPHAN_SECONDS
    removed = []
    for job_id, newest in files.job_ids().items():
        if newest > cutoff or store.get(job_id) is not None:
            continue
        files.remove(job_id)
        log.info("job %s: its objects had no record; removed", job_id)
        removed.append(job_id)
    return removed


def _last_written(folder: Path) -> float:
    """The newest modification time in a job folder: its own, its files' and its input's."""
    newest = folder.lstat().st_mtime
    for path in folder.rglob("*"):
        try:
            newest = max(newest, path.lstat().st_mtime)
        except FileNotFoundError:
            pass
    return newest


async def sweep_forever(engine: JobEngine, settings: Settings,
                       receiving: Set[str] = frozenset()) -> None:
    """Every JOBQUEUE_RESULT_TTL / 10 seconds (a minute at most): delete the finished jobs
    older than the TTL with their files, and the job folders no record owns."""
    interval = min(60.0, max(0.5, settings.result_ttl / 10))
    while True:
        await asyncio.sleep(interval)
        try:
            expired = await asyncio.to_thread(engine.store.finished_before,
                                              time.time() - settings.result_ttl)
            for record in expired:
                await engine.delete(record.id)  # open dashboards drop it too
                log.info("job %s: deleted after the %g s retention", record.id,
                         settings.result_ttl)
            await asyncio.to_thread(sweep_orphans, engine.store, settings.out_dir,
                                    set(receiving))
            await asyncio.to_thread(sweep_stored_orphans, engine.store, engine.files)
            await asyncio.to_thread(engine.store.forget_minutes_before,
                                    time.time() - rollup.KEPT_SECONDS)
        except Unavailable as error:
            log.warning("retention sweep skipped: %s", error)
        except Exception:
            log.exception("retention sweep failed; trying again in %g s", interval)
