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

from jobqueue import rollup
from jobqueue.engines import JobEngine
from jobqueue.errors import Unavailable
from jobqueue.files import jobfiles
from jobqueue.files.store import FileStore
from jobqueue.settings import Settings

log = logging.getLogger(__name__)

# A job folder with no record and nothing written in it for this long is a leftover. An upload
# still going on writes at least every 30 s (JOBQUEUE_MIN_UPLOAD_KBPS cuts off one that
# stalls), and its record is written within the 30 s its content check may take once it is in.
ORPHAN_SECONDS = 600.0
# Listing the object store costs a request per thousand jobs: not every minute.
STORED_SWEEP_SECONDS = 300.0
# An object with no record written this long ago is no upload on its way to its record (the
# replica stores an upload in seconds, then writes the record).
STALE_OBJECT_SECONDS = 3600.0
# The object store's clock (and its whole seconds) against the database's: an object this much
# older than the job store is surely not its own.
STORE_CLOCK_MARGIN = 60.0
# The sweeps ask for the records of this many jobs in one query.
KNOWN_AT_ONCE = 1000


async def sweep_orphans(engine: JobEngine, out_dir: Path, receiving: Set[str] = frozenset(),
                        at_start: bool = False) -> list[str]:
    """Remove job folders under `out_dir` (named by a job id, and marked as one by a server of
    this very store) that no record owns, that this server is not `receiving` an upload for,
    and that nothing has written to for ORPHAN_SECONDS; nothing else under `out_dir` is
    touched. A folder another store's server made (or one made before folders were tied to
    their store) is left alone: this store not knowing its job proves nothing. Returns the
    ids removed. `at_start`: warn of the folders left alone that way."""
    if not await asyncio.to_thread(out_dir.is_dir):
        return []
    store_id = await engine.store_id()
    folders = await asyncio.to_thread(_marked_folders, out_dir, store_id, receiving)
    known = await _known(engine, sorted(folders))
    removed, strangers = await asyncio.to_thread(
        _remove_orphans, out_dir, store_id,
        {job_id: maker for job_id, maker in folders.items() if job_id not in known})
    if strangers and at_start:
        log.warning("%d job folders in %s have no record in %s and were not made with it (a "
                    "new or emptied job store, or another one's folders): left alone, never "
                    "deleted. Start with the store they were made with to serve them again, or "
                    "remove them yourself", strangers, out_dir, engine.records_location)
    return removed


def _marked_folders(out_dir: Path, store_id: str, receiving: Set[str]) -> dict[str, str]:
    """The job folders under `out_dir` with a server's mark, by job id: which store's server
    made each. The folders made from now on are this store's."""
    jobfiles.claim_out_dir(out_dir, store_id)
    folders = {}
    for entry in list(os.scandir(out_dir)):
        if not (jobfiles.is_job_id(entry.name) and entry.is_dir(follow_symlinks=False)) \
                or entry.name in receiving:
            continue
        maker = jobfiles.folder_store(Path(entry.path))
        if maker is not None:
            folders[entry.name] = maker
    return folders


def _remove_orphans(out_dir: Path, store_id: str, unknown: dict[str, str]
                    ) -> tuple[list[str], int]:
    """Of the folders no record owns (`unknown`: job id -> maker), remove this store's that
    nothing wrote to for ORPHAN_SECONDS; the ids removed, and how many were another's."""
    cutoff = time.time() - ORPHAN_SECONDS
    removed: list[str] = []
    strangers = 0
    for job_id, maker in unknown.items():
        if maker != store_id:
            strangers += 1
            continue
        if _last_written(out_dir / job_id) > cutoff:
            continue
        jobfiles.remove_job_dir(out_dir, job_id)
        log.info("job %s: its folder had no record (a leftover of a server killed mid-upload); "
                 "removed", job_id)
        removed.append(job_id)
    return removed, strangers


async def _known(engine: JobEngine, job_ids: list[str]) -> set[str]:
    """Which of these jobs have a record, asked KNOWN_AT_ONCE at a time."""
    known: set[str] = set()
    for start in range(0, len(job_ids), KNOWN_AT_ONCE):
        known |= await engine.known(job_ids[start:start + KNOWN_AT_ONCE])
    return known


class StoredOrphans:
    """With object storage: the objects of jobs that no record owns (a replica killed between
    storing an upload and writing its record, a delete while the store was down).

    A job whose objects have no record is only a suspect at first: its record may be on its
    way (the upload is stored before the record is written). It is removed once a later sweep,
    ORPHAN_SECONDS after the first that found it, still finds no record, or at once when its
    newest object is STALE_OBJECT_SECONDS old (a leftover from long ago: the first sweep, at
    start, removes those). Each sweep reads one listing of job "folders" and asks for their
    records in one query per KNOWN_AT_ONCE."""

    def __init__(self) -> None:
        self.suspects: dict[str, float] = {}  # job id -> when it was first found orphaned
        # Jobs whose newest object is older than the job store: another store's (a new or
        # emptied database), never removed.
        self.strangers: set[str] = set()

    async def sweep(self, engine: JobEngine, files: FileStore) -> list[str]:
        """Remove the confirmed orphans; returns their ids."""
        if not files.remote:
            return []
        now = time.time()
        ids = sorted(await asyncio.to_thread(files.job_ids))
        known = await _known(engine, ids)
        self.suspects = {job_id: self.suspects.get(job_id, now) for job_id in ids
                         if job_id not in known and job_id not in self.strangers}
        removed = []
        strangers = len(self.strangers)
        for job_id, since in list(self.suspects.items()):
            newest = (await asyncio.to_thread(files.newest, job_id)
                      if since == now else None)  # found just now
            if newest is not None and \
                    newest < await engine.store_created_at() - STORE_CLOCK_MARGIN:
                self.strangers.add(job_id)
                del self.suspects[job_id]
                continue
            if since < now - ORPHAN_SECONDS or (newest or now) < now - STALE_OBJECT_SECONDS:
                await asyncio.to_thread(files.remove, job_id)
                del self.suspects[job_id]
                log.info("job %s: its objects had no record (a replica stopped between "
                         "storing its upload and writing its record?); removed", job_id)
                removed.append(job_id)
        if len(self.strangers) > strangers:
            log.warning("%d jobs in the object store have no record in %s and are older than "
                        "it (a new or emptied database, or another one's jobs): left alone, "
                        "never deleted", len(self.strangers), engine.records_location)
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
    older than the TTL with their files, and the job folders no record owns (but not those
    of uploads being received or on their way to the object store)."""
    interval = min(60.0, max(0.5, settings.result_ttl / 10))
    stored = StoredOrphans()
    stored_next = 0.0  # the store's listing: at start, then every STORED_SWEEP_SECONDS
    while True:
        if time.monotonic() >= stored_next:
            stored_next = time.monotonic() + STORED_SWEEP_SECONDS
            try:
                await stored.sweep(engine, engine.files)
            except Unavailable as error:
                log.warning("sweep of stored files skipped: %s", error)
            except Exception:
                log.exception("sweep of stored files failed")
        await asyncio.sleep(interval)
        try:
            expired = await engine.expired(time.time() - settings.result_ttl)
            for job_id in expired:
                await engine.delete(job_id)  # open dashboards drop it too
                log.info("job %s: deleted after the %g s retention", job_id,
                         settings.result_ttl)
            await sweep_orphans(engine, settings.out_dir, {*receiving, *engine.storing})
            await engine.forget_minutes_before(time.time() - rollup.KEPT_SECONDS)
        except Unavailable as error:
            log.warning("retention sweep skipped: %s", error)
        except Exception:
            log.exception("retention sweep failed; trying again in %g s", interval)
