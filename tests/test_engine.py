"""The embedded engine on its own, through its facade (by job id), with job kinds made for the
test (no HTTP server)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import sqlite3
import threading
import time
import uuid
import weakref
from pathlib import Path

import pytest
from pydantic import BaseModel

from jobqueue.engines import NewJob
from jobqueue.engines.embedded.engine import EmbeddedEngine
from jobqueue.errors import QueueFull
from jobqueue.files import jobfiles, retention
from jobqueue.files.jobfiles import job_dir, make_job_dir, new_job_id
from jobqueue.jobs import JobContext, JobKind, JobStatus, Output
from jobqueue.records import QUERIES, JobRecord, Origin, SqliteJobStore, list_query
from jobqueue.settings import Settings


class NoOptions(BaseModel):
    pass


def fail(job: JobContext) -> Output:
    raise RuntimeError("handler bug")


def record_thread(job: JobContext) -> Output:
    return Output(data={"thread": threading.current_thread().name})


def block_until_cancelled(job: JobContext) -> Output:
    job.cancel_requested.wait(10)
    job.raise_if_cancelled()
    return Output(data={})


def hang(job: JobContext) -> Output:
    """A handler that ignores cancels (a stuck C call, an endless loop)."""
    time.sleep(3)
    return Output(data={})


def write_to_full_disk(job: JobContext) -> Output:
    raise OSError(errno.ENOSPC, "No space left on device")


KINDS = {
    "fail": JobKind("fail", "always raises", NoOptions, fail),
    "hang": JobKind("hang", "ignores cancels", NoOptions, hang),
    "full": JobKind("full", "writes to a full disk", NoOptions, write_to_full_disk),
    "ok": JobKind("ok", "names its thread", NoOptions, record_thread),
    "block": JobKind("block", "runs until cancelled", NoOptions, block_until_cancelled),
}


async def submit(engine: EmbeddedEngine, kind: str) -> str:
    record = await engine.submit(NewJob(id=new_job_id(), kind=KINDS[kind], options=NoOptions(),
                                        input_path=None, origin=Origin.JOBS), durable=False)
    return record.id


async def run_to_end(engine: EmbeddedEngine, kind: str) -> JobRecord:
    """Submit a job of `kind` and wait (5 s at most) until it has finished."""
    return await engine.wait(await submit(engine, kind), 5)


async def until(condition, seconds: float = 5) -> None:
    """Wait for a state, never for a time: poll `condition` (async) until it holds."""
    deadline = time.monotonic() + seconds
    while not await condition():
        assert time.monotonic() < deadline, "the state never came"
        await asyncio.sleep(0.01)


async def status_is(engine: EmbeddedEngine, job_id: str, status: JobStatus) -> bool:
    return (await engine.get(job_id)).status == status.value


def uploaded(out_dir: Path) -> Path:
    """An upload as read_submission leaves it: out/<new job id>/input/<name>."""
    folder = job_dir(out_dir, new_job_id())
    make_job_dir(folder)
    (folder / "input").mkdir()
    (folder / "input" / "scan.pdf").write_bytes(b"%PDF-1.4")
    return folder / "input" / "scan.pdf"


def run_engine(tmp_path, scenario, **settings) -> EmbeddedEngine:
    engine = EmbeddedEngine(Settings(out_dir=tmp_path, **settings), KINDS)

    async def main() -> None:
        await engine.start()
        try:
            await scenario(engine)
        finally:
            await engine.stop()

    asyncio.run(main())
    return engine


def test_a_raising_handler_never_kills_its_worker(tmp_path):
    async def scenario(engine: EmbeddedEngine) -> None:
        for _ in range(1000):
            record = await run_to_end(engine, "fail")
            assert record.status == JobStatus.FAILED.value and record.error_kind == "internal"
            assert "internal error" in record.error, "a bug's inside is not shown"
        assert all(thread.is_alive() for thread in engine.pools["fail"].threads)

    run_engine(tmp_path, scenario)


def test_results_come_from_the_worker_thread_through_the_loop(tmp_path):
    async def scenario(engine: EmbeddedEngine) -> None:
        record = await run_to_end(engine, "ok")
        assert record.status == JobStatus.SUCCEEDED.value
        assert record.result["data"] == {"thread": "ok-worker-1"}
        assert record.started_at >= record.created_at
        assert record.finished_at >= record.started_at

    run_engine(tmp_path, scenario)


def test_a_cancelled_queued_job_never_starts_and_frees_its_slot(tmp_path):
    async def scenario(engine: EmbeddedEngine) -> None:
        running = await submit(engine, "block")
        waiting = await submit(engine, "block")
        await until(lambda: status_is(engine, running, JobStatus.RUNNING))  # the worker took it
        assert (await engine.stats())["block"]["queued"] == 1
        assert await engine.position(waiting) == 1
        await engine.cancel(waiting, "test")
        record = await engine.wait(waiting, 5)
        assert record.status == JobStatus.CANCELLED.value and record.started_at is None
        assert (await engine.stats())["block"]["queued"] == 0
        assert not job_dir(tmp_path, waiting).exists()
        await engine.cancel(running, "test")
        record = await engine.wait(running, 5)
        assert record.status == JobStatus.CANCELLED.value and record.started_at is not None

    run_engine(tmp_path, scenario)


def test_check_room_refuses_exactly_when_the_queue_is_full(tmp_path):
    async def scenario(engine: EmbeddedEngine) -> None:
        running = await submit(engine, "block")
        await until(lambda: status_is(engine, running, JobStatus.RUNNING))
        waiting = [await submit(engine, "block") for _ in range(9)]
        await engine.check_room("block")  # nine of ten slots taken: room for one
        kept = uploaded(tmp_path)
        keyed = await engine.submit(NewJob(id=kept.parent.parent.name, kind=KINDS["block"],
                                           options=NoOptions(), input_path=kept,
                                           origin=Origin.JOBS, idempotency_key="k"), False)
        waiting.append(keyed.id)
        with pytest.raises(QueueFull, match="block queue is full"):
            await engine.check_room("block")
        with pytest.raises(QueueFull):
            await engine.check_room("block", "", "another key")
        await engine.check_room("block", "", "k")  # a retry gets its job back: never refused
        # An upload that becomes no job (refused, or a retry) leaves no folder behind.
        for key in (None, "k"):
            upload = uploaded(tmp_path)
            new = NewJob(id=upload.parent.parent.name, kind=KINDS["block"], options=NoOptions(),
                         input_path=upload, origin=Origin.JOBS, idempotency_key=key)
            if key is None:
                with pytest.raises(QueueFull):
                    await engine.submit(new, False)
            else:
                assert (await engine.submit(new, False)).id == keyed.id
            assert not upload.parent.parent.exists() and kept.exists()
        await engine.cancel(waiting[0], "test")  # its slot is free at once
        await engine.check_room("block")
        for job_id in [running, *waiting]:
            await engine.cancel(job_id, "test")

    run_engine(tmp_path, scenario)


def test_stop_leaves_queued_and_running_jobs_to_run_again_and_joins_threads(tmp_path):
    jobs: list[str] = []

    async def scenario(engine: EmbeddedEngine) -> None:
        for _ in range(3):
            jobs.append(await submit(engine, "block"))
        await until(lambda: status_is(engine, jobs[0], JobStatus.RUNNING))

    engine = run_engine(tmp_path, scenario)
    store = SqliteJobStore(tmp_path / "jobs.db")
    assert [r.id for r in store.unfinished()] == jobs, "all three run again after a restart"
    store.close()
    # Folders are made when a job starts: the stopped one keeps its folder for the next run.
    assert job_dir(tmp_path, jobs[0]).exists(), "kept for the run after a restart"
    assert not any(thread.is_alive() for thread in engine.pools["block"].threads)


def test_a_hanging_handler_is_cut_and_its_thread_replaced(tmp_path):
    async def scenario(engine: EmbeddedEngine) -> None:
        engine.pools["hang"].abandon_after = 0.5
        stuck = await run_to_end(engine, "hang")
        assert stuck.status == JobStatus.FAILED.value
        assert "ran longer than 0.3 s (JOBQUEUE_JOB_MAX_SECONDS)" in stuck.error
        assert stuck.finished_at - stuck.started_at < 2.5, "not left to run out"
        pool = engine.pools["hang"]
        assert len(pool.threads) == 1 and pool.threads[0].name == "hang-worker-1+"
        assert pool.stats()["busy"] == 0
        # The new thread serves the queue while the old one is still stuck.
        after = await submit(engine, "hang")
        await until(lambda: status_is(engine, after, JobStatus.RUNNING))
        assert (await engine.get(after)).worker_name == "hang-worker-1+"
        await engine.cancel(after, "test")

    run_engine(tmp_path, scenario, job_max_seconds=0.3)


def test_a_job_that_notices_the_cancel_fails_with_the_timeout(tmp_path):
    async def scenario(engine: EmbeddedEngine) -> None:
        record = await run_to_end(engine, "block")
        assert record.status == JobStatus.FAILED.value
        assert "JOBQUEUE_JOB_MAX_SECONDS" in record.error
        assert engine.pools["block"].threads[0].name == "block-worker-1", "not replaced"

    run_engine(tmp_path, scenario, job_max_seconds=0.3)


def test_a_full_disk_fails_the_job_with_a_clear_error(tmp_path):
    """Where a test may not mount a small tmpfs (test_faults.py), this is the full disk."""
    async def scenario(engine: EmbeddedEngine) -> None:
        record = await run_to_end(engine, "full")
        assert record.status == JobStatus.FAILED.value and record.error_kind == "disk_full"
        assert "disk is full" in record.error
        assert all(thread.is_alive() for thread in engine.pools["full"].threads)

    run_engine(tmp_path, scenario)


def test_the_sweep_passes_over_uploads_still_on_their_way(tmp_path):
    """The retention sweep removes an old job folder with no record, but not the folder of a
    job the engine is still storing (the distributed engine's upload on its way to the object
    store, `engine.storing`) or of an upload being received, however old they look."""
    def old_folder() -> Path:
        folder = job_dir(tmp_path, new_job_id())
        make_job_dir(folder)  # with the mark the server puts in each folder it makes
        an_hour_ago = time.time() - 3600
        for path in (*folder.rglob("*"), folder):
            os.utime(path, (an_hour_ago, an_hour_ago))
        return folder

    async def scenario(engine: EmbeddedEngine) -> None:
        orphan, storing, receiving = old_folder(), old_folder(), old_folder()
        engine.storing = frozenset({storing.name})
        sweeper = asyncio.create_task(
            retention.sweep_forever(engine, engine.settings, {receiving.name}))
        try:
            await until(lambda: asyncio.sleep(0, not orphan.exists()), 60)
            # One more orphan, gone only in a later sweep: the one above has looked at all.
            later = old_folder()
            await until(lambda: asyncio.sleep(0, not later.exists()), 60)
        finally:
            sweeper.cancel()
        assert storing.exists() and receiving.exists()

    run_engine(tmp_path, scenario, result_ttl=5)  # a sweep every 0.5 s


@pytest.mark.parametrize("status, job_type", [(None, None), (None, "message")])
def test_a_page_of_jobs_stops_at_its_end_rather_than_sorting_them_all(tmp_path, status,
                                                                      job_type):
    """GET /jobs' query walks an index in the order of the page and stops at its end: no sort
    of all of an owner's jobs first, which took 40 ms a page with 2,500 jobs of large results."""
    SqliteJobStore(tmp_path / "jobs.db").close()  # the schema, as the server makes it
    sql, params = list_query(QUERIES, status, job_type, 20, 0, "")
    with contextlib.closing(sqlite3.connect(tmp_path / "jobs.db")) as db:
        plan = " / ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params))
    assert "TEMP B-TREE" not in plan, plan


def test_a_job_deleted_while_its_end_is_being_recorded_stays_deleted(tmp_path):
    """GET shows a job's final status a moment before its worker thread has stored its end;
    a DELETE in that moment waits for the store, or the record would come back."""
    recording = threading.Event()
    release = threading.Event()

    async def scenario(engine: EmbeddedEngine) -> None:
        save = engine.store.save

        def slow_save(record: JobRecord, ended: bool = False) -> None:
            if ended:
                recording.set()
                release.wait(30)
            save(record, ended)

        engine.store.save = slow_save
        job_id = await submit(engine, "ok")
        await until(lambda: asyncio.sleep(0, recording.is_set()))
        assert (await engine.get(job_id)).status == JobStatus.SUCCEEDED.value
        deleting = asyncio.create_task(engine.delete(job_id))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not deleting.done(), "it waits for the end to be stored"
        release.set()
        await deleting
        engine.store.flush()
        assert engine.store.get(job_id) is None

    run_engine(tmp_path, scenario)


def test_a_forked_child_draws_job_ids_of_its_own_even_with_the_pool_locked_at_the_fork():
    """new_job_id pools the random source behind a lock: a child forked while another thread
    held it gets a lock of its own (the held one would never be let go there), and an empty
    pool, so its ids are not the parent's next ones."""
    new_job_id()  # the pool is full now
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with jobfiles._random_lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    reader, writer = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # the child: one id through the pipe, and out
            try:
                os.write(writer, new_job_id().encode())
            finally:
                os._exit(0)
    finally:
        release.set()
        holder.join(5)
        os.close(writer)
    deadline = time.monotonic() + 10
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the child waits for the lock its parent's thread held")
        time.sleep(0.01)
    with os.fdopen(reader) as pipe:
        child_id = pipe.read()
    assert jobfiles.is_job_id(child_id) and child_id != new_job_id()


def test_job_ids_are_canonical_uuid4s_and_only_those_pass_as_ids():
    for _ in range(2000):
        job_id = new_job_id()
        parsed = uuid.UUID(job_id)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert str(parsed) == job_id and jobfiles.is_job_id(job_id)
    some = str(uuid.uuid4())
    for text in (some.upper(), "{" + some + "}", some.replace("-", ""), some + "\n",
                 "urn:uuid:" + some, "../" + some[3:], "", None):
        assert not jobfiles.is_job_id(text), text


def test_an_ended_job_is_freed_as_its_last_reference_goes_not_by_the_collector(tmp_path):
    """A job (its context, its lock, its future) that was a reference cycle waited for the
    garbage collector: every tiny job cost it time. Now dropping the last reference frees it."""
    async def scenario(engine: EmbeddedEngine) -> None:
        job_id = await submit(engine, "ok")
        job = engine._active[job_id]
        job.context.set_progress(1, 2, "steps")  # the context's hook reaches the job
        await engine.wait(job_id, 5)
        pool = engine.pools["ok"]
        await until(lambda: asyncio.sleep(0, job_id not in engine._active
                                          and job_id not in {j.id for j in pool.running}))
        gone = weakref.ref(job)
        context = weakref.ref(job.context)
        del job
        gc.disable()
        try:
            assert gone() is None and context() is None, gc.get_referrers(gone())[:3]
        finally:
            gc.enable()

    run_engine(tmp_path, scenario)
