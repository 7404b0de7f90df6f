"""The queue engine on its own, with job kinds made for the test (no HTTP server)."""

from __future__ import annotations

import asyncio
import errno
import threading
import time

from pydantic import BaseModel

from jobqueue.engine import Engine
from jobqueue.jobs import Job, JobKind, JobStatus, Output
from jobqueue.settings import Settings
from jobqueue.store import JobStore


class NoOptions(BaseModel):
    pass


def fail(job: Job) -> Output:
    raise RuntimeError("handler bug")


def record_thread(job: Job) -> Output:
    return Output(data={"thread": threading.current_thread().name})


def block_until_cancelled(job: Job) -> Output:
    job.cancel_requested.wait(10)
    job.raise_if_cancelled()
    return Output(data={})


def hang(job: Job) -> Output:
    """A handler that ignores cancels (a stuck C call, an endless loop)."""
    time.sleep(3)
    return Output(data={})


def write_to_full_disk(job: Job) -> Output:
    raise OSError(errno.ENOSPC, "No space left on device")


KINDS = {
    "fail": JobKind("fail", "always raises", NoOptions, fail),
    "hang": JobKind("hang", "ignores cancels", NoOptions, hang),
    "full": JobKind("full", "writes to a full disk", NoOptions, write_to_full_disk),
    "ok": JobKind("ok", "names its thread", NoOptions, record_thread),
    "block": JobKind("block", "runs until cancelled", NoOptions, block_until_cancelled),
}


def submit(engine: Engine, kind: str) -> Job:
    job = engine.new_job(KINDS[kind], NoOptions())
    engine.submit(job)
    return job


async def run_to_end(engine: Engine, kind: str) -> Job:
    """Submit a job of `kind` and wait (5 s at most) until it has finished."""
    job = submit(engine, kind)
    await asyncio.wait_for(job.done, 5)
    return job


async def until(condition, seconds: float = 5) -> None:
    """Wait for a state, never for a time: poll `condition` until it holds."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the state never came"
        await asyncio.sleep(0.01)


def run_engine(tmp_path, scenario, **settings) -> Engine:
    engine = Engine(Settings(out_dir=tmp_path, **settings), KINDS, JobStore(tmp_path / "jobs.db"))

    async def main() -> None:
        engine.start()
        try:
            await scenario(engine)
        finally:
            await asyncio.to_thread(engine.stop)

    asyncio.run(main())
    return engine


def test_a_raising_handler_never_kills_its_worker(tmp_path):
    async def scenario(engine: Engine) -> None:
        for _ in range(1000):
            job = await run_to_end(engine, "fail")
            assert job.status is JobStatus.FAILED
            assert str(job.error) == "handler bug"
        assert all(thread.is_alive() for thread in engine.pools["fail"].threads)

    run_engine(tmp_path, scenario)


def test_results_come_from_the_worker_thread_through_the_loop(tmp_path):
    async def scenario(engine: Engine) -> None:
        job = await run_to_end(engine, "ok")
        assert job.status is JobStatus.SUCCEEDED
        assert job.output.data == {"thread": "ok-worker-1"}
        assert job.started_at >= job.created_at and job.finished_at >= job.started_at

    run_engine(tmp_path, scenario)


def test_a_cancelled_queued_job_never_starts_and_frees_its_slot(tmp_path):
    async def scenario(engine: Engine) -> None:
        running = submit(engine, "block")
        waiting = submit(engine, "block")
        await until(lambda: running.status is JobStatus.RUNNING)  # the worker took it
        assert engine.stats()["block"]["queued"] == 1
        engine.cancel(waiting, "test")
        await asyncio.wait_for(waiting.done, 5)
        assert waiting.status is JobStatus.CANCELLED and waiting.started_at is None
        assert engine.stats()["block"]["queued"] == 0
        assert not waiting.out_dir.exists()
        engine.cancel(running, "test")
        await asyncio.wait_for(running.done, 5)
        assert running.status is JobStatus.CANCELLED and running.started_at is not None

    run_engine(tmp_path, scenario)


def test_stop_leaves_queued_and_running_jobs_to_run_again_and_joins_threads(tmp_path):
    jobs: list[Job] = []

    async def scenario(engine: Engine) -> None:
        for _ in range(3):
            job = submit(engine, "block")
            jobs.append(job)
        await asyncio.sleep(0.1)

    engine = run_engine(tmp_path, scenario)
    assert jobs[0].status is JobStatus.CANCELLED, "the running job was told to stop"
    assert [r.id for r in engine.store.unfinished()] == [job.id for job in jobs]
    # Folders are made when a job starts: the stopped one keeps its folder for the next run.
    assert jobs[0].out_dir.exists(), "kept for the run after a restart"
    assert not any(thread.is_alive() for thread in engine.pools["block"].threads)


def test_a_hanging_handler_is_cut_and_its_thread_replaced(tmp_path):
    async def scenario(engine: Engine) -> None:
        engine.pools["hang"].abandon_after = 0.5
        stuck = await run_to_end(engine, "hang")
        assert stuck.status is JobStatus.FAILED
        assert "ran longer than 0.3 s (JOBQUEUE_JOB_MAX_SECONDS)" in str(stuck.error)
        assert stuck.finished_at - stuck.started_at < 2.5, "not left to run out"
        pool = engine.pools["hang"]
        assert len(pool.threads) == 1 and pool.threads[0].name == "hang-worker-1+"
        assert pool.stats()["busy"] == 0
        # The new thread serves the queue while the old one is still stuck.
        after = submit(engine, "hang")
        await asyncio.sleep(0.1)
        assert after.status is JobStatus.RUNNING and after.worker_name == "hang-worker-1+"
        engine.cancel(after, "test")

    run_engine(tmp_path, scenario, job_max_seconds=0.3)


def test_a_job_that_notices_the_cancel_fails_with_the_timeout(tmp_path):
    async def scenario(engine: Engine) -> None:
        job = await run_to_end(engine, "block")
        assert job.status is JobStatus.FAILED and "JOBQUEUE_JOB_MAX_SECONDS" in str(job.error)
        assert engine.pools["block"].threads[0].name == "block-worker-1", "not replaced"

    run_engine(tmp_path, scenario, job_max_seconds=0.3)


def test_a_full_disk_fails_the_job_with_a_clear_error(tmp_path):
    """Where a test may not mount a small tmpfs (test_faults.py), this is the full disk."""
    async def scenario(engine: Engine) -> None:
        job = await run_to_end(engine, "full")
        assert job.status is JobStatus.FAILED
        assert "disk is full" in job.record().error
        assert all(thread.is_alive() for thread in engine.pools["full"].threads)

    run_engine(tmp_path, scenario)
