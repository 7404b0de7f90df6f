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
from jobqueue.records import JobStore
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


def sweep_orphans(store: JobStore, out_dir: Path, receiving: Set[str] = frozenset(),
                  at_start: bool = False) -> list[str]:
    """Remove job folders under `out_dir` (named by a job id, and marked as one by a server of
    this very store) that no record owns, that this server is not `receiving` an upload for,
    and that nothing has written to for ORPHAN_SECONDS; nothing else under `out_dir` is
    touched. A folder another store's server made (or one made before folders were tied to
    their store) is left alone: this store not knowing its job proves nothing. Returns the
    ids removed. `at_start`: warn of the folders left alone that way."""
    removed: list[str] = []
    if not out_dir.is_dir():
        return removed
    store_id = store.store_id
    jobfiles.claim_out_dir(out_dir, store_id)  # the folders made from now on are this store's
    cutoff = time.time() - ORPHAN_SECONDS
    strangers = 0
    for entry in list(os.scandir(out_dir)):
        if not (jobfiles.is_job_id(entry.name) and entry.is_dir(follow_symlinks=False)) \
                or entry.name in receiving:
            continue
        maker = jobfiles.folder_store(Path(entry.path))
        if maker is None or store.get(entry.name) is not None:
            continue
        if maker != store_id:
            strangers += 1
            continue
        if _last_written(Path(entry.path)) > cutoff:
            continue
        jobfiles.remove_job_dir(out_dir, entry.name)
        log.info("job %s: its folder had no record (a leftover of a server killed mid-upload); "
                 "removed", entry.name)
        removed.append(entry.name)
    if strangers and at_start:
        log.warning("%d job folders in %s have no record in %s and were not made with it (a "
                    "new or emptied job store, or another one's folders): left alone, never "
                    "deleted. Start with the store they were made with to serve them again, or "
                    "remove them yourself", strangers, out_dir, store.location)
    return removed


class StoredOrphans:
    """With object storage: the objects of jobs that no record owns (a replica killed between
    storing an upload and writing its record, a delete while the store was down).

    A job whose objects have no record is only a suspect at first: its record may be on its
    way (the upload is stored before the record is written). It is removed once a later sweep,
    ORPHAN_SECONDS after the first that found it, still finds no record, or at once when its
    newest object is STALE_OBJECT_SECONDS old (a leftover from long ago: the first sweep, at
    start, removes those). Each sweep reads one listing of job "folders" and asks for their
    records in one query per thousand."""

    def __init__(self) -> None:
        self.suspects: dict[str, float] = {}  # job id -> when it was first found orphaned
        # Jobs whose newest object is older than the job store: another store's (a new or
        # emptied database), never removed.
        self.strangers: set[str] = set()

    def sweep(self, store: JobStore, files: FileStore) -> list[str]:
        """Remove the confirmed orphans; returns their ids."""
        if not files.remote:
            return []
        now = time.time()
        ids = sorted(files.job_ids())
        known: set[str] = set()
        for start in range(0, len(ids), 1000):
            known |= store.known(ids[start:start + 1000])
        self.suspects = {job_id: self.suspects.get(job_id, now) for job_id in ids
                         if job_id not in known and job_id not in self.strangers}
        removed = []
        strangers = len(self.strangers)
        for job_id, since in list(self.suspects.items()):
            newest = files.newest(job_id) if since == now else None  # found just now
            if newest is not None and newest < store.created_at - STORE_CLOCK_MARGIN:
                self.strangers.add(job_id)
                del self.suspects[job_id]
                continue
            if since < now - ORPHAN_SECONDS or (newest or now) < now - STALE_OBJECT_SECONDS:
                files.remove(job_id)
                del self.suspects[job_id]
                log.info("job %s: its objects had no record (a replica stopped between "
                         "storing its upload and writing its record?); removed", job_id)
                removed.append(job_id)
        if len(self.strangers) > strangers:
            log.warning("%d jobs in the object store have no record in %s and are older than "
                        "it (a new or emptied database, or another one's jobs): left alone, "
                        "never deleted", len(self.strangers), store.location)
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
                await asyncio.to_thread(stored.sweep, engine.store, engine.files)
            except Unavailable as error:
                log.warning("sweep of stored files skipped: %s", error)
            except Exception:
                log.exception("sweep of stored files failed")
        await asyncio.sleep(interval)
        try:
            expired = await asyncio.to_thread(engine.store.finished_before,
                                              time.time() - settings.result_ttl)
            for record in expired:
                await engine.delete(record.id)  # open dashboards drop it too
                log.info("job %s: deleted after the %g s retention", record.id,
                         settings.result_ttl)
            await asyncio.to_thread(sweep_orphans, engine.store, settings.out_dir,
                                    {*receiving, *engine.storing})
            await asyncio.to_thread(engine.store.forget_minutes_before,
                                    time.time() - rollup.KEPT_SECONDS)
        except Unavailable as error:
            log.warning("retention sweep skipped: %s", error)
        except Exception:
            log.exception("retention sweep failed; trying again in %g s", interval)
