"""Property tests of a job's lifecycle, against both engines through the by-id facade (issue 25).

hypothesis's stateful testing drives random interleavings of submit (as POST /jobs and as /put,
with an upload or the kind's sample), a worker taking a job, progress, cancel, delete, the end
of a run (success, BadInput, a crash of its handler), a worker that dies (kill -9: no clean
stop), a clean restart and, for PostgreSQL, an outage. After every step it waits, with a
bounded deadline, for the state the step leads to (never for a time), then checks:

- every accepted job reaches exactly one end: an end, once seen, never changes, and the
  engines' `jobqueue_jobs` counter counts as many ends as there are ended jobs;
- an ended job never runs again: its handler is never entered after its end;
- a deleted job never comes back (get() is None, also after a restart or a crash), and an
  accepted job not deleted always has its record;
- stats()' queue count equals the number of queued records;
- no job folder is left for a job without a record, and a succeeded job has its folder with
  the file it wrote.

The job kind is the test's own: its handler waits for what the test tells it (per job: report
progress, succeed writing a file, fail with BadInput, raise), and stops at a cancel. A worker
that dies is a "generation" of handlers told never to go on (as a killed process's threads
would not), with nothing more of its engine or runner writing anything.

The batched variants run the same machine on a batched kind (JobKind.batch): its handler runs
each job of its batch as the single handler would, on a thread of the job's own, and answers
what each did in its place (an Output, or the exception it raised). A job's end comes when its
batch returns, so an end is asked of every job of a running batch at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from pydantic import BaseModel

from jobqueue.engines import NewJob
from jobqueue.engines.embedded.engine import EmbeddedEngine
from jobqueue.errors import BadInput, QueueFull, Unavailable
from jobqueue.files import jobfiles
from jobqueue.jobs import FINISHED, Batch, JobContext, JobKind, Output
from jobqueue.metrics import Metrics, Outcome
from jobqueue.records import JobRecord, Origin
from jobqueue.settings import Settings

KIND = "step"
WORKERS = 2
QUEUE_SIZE = 3
RESULT = "result.txt"
# Bounds of the waits for a state: long enough for a rescue after a worker died (PostgreSQL).
SETTLE_SECONDS = 45.0
CALL_SECONDS = 60.0
POLL_SECONDS = 0.02
# Crashes and restarts (and outages) per example: each costs a start, or a rescue.
MAX_STOPS = 3
# The batched variants' batches: up to all the jobs that may be running and waiting at once.
BATCH_SIZE = 3
BATCH_WAIT_SECONDS = 0.05


class StepOptions(BaseModel):
    label: str = ""


class Control:
    """What the test tells the handlers (by job id), and what they did; shared with their
    threads. A handler of a dead generation (its worker was killed) never goes on."""

    def __init__(self, batched: bool = False) -> None:
        self.batched = batched
        # One worker for batches: more jobs wait behind a running batch, to form the next.
        self.workers = 1 if batched else WORKERS
        self.cond = threading.Condition()
        self.fates: dict[str, str] = {}  # job id -> "succeed" / "fail" / "crash"
        self.progress: dict[str, int] = {}  # job id -> steps its handler is to report
        self.reported: dict[str, int] = {}  # job id -> steps its latest run reported
        self.entries: dict[str, int] = {}  # job id -> times its handler was entered
        self.runs: dict[str, list[int]] = {}  # job id -> generations of its runs in a handler
        self.batch_of: dict[str, tuple[str, ...]] = {}  # job id -> its latest batch's jobs
        self.dead: set[int] = set()
        self.over = False

    def kind(self, generation: int) -> JobKind:
        # A /put job's deadline (timeout) is never reached here.
        if self.batched:
            return JobKind(KIND, "runs batches as the lifecycle test says", StepOptions,
                           lambda jobs: self._run_batch(generation, jobs), workers=1,
                           queue_size=QUEUE_SIZE, timeout=600.0,
                           batch=Batch(max_size=BATCH_SIZE, max_wait=BATCH_WAIT_SECONDS))
        return JobKind(KIND, "runs as the lifecycle test says", StepOptions,
                       lambda job: self._run(generation, job), workers=WORKERS,
                       queue_size=QUEUE_SIZE, timeout=600.0)

    def _run_batch(self, generation: int, jobs: list[JobContext]) -> list:
        """Each job of the batch as `_run` runs one, at once; what each did, in its place."""
        answers: list = [None] * len(jobs)
        batch = tuple(job.id for job in jobs)
        with self.cond:
            for job_id in batch:
                self.batch_of[job_id] = batch

        def run(index: int, job: JobContext) -> None:
            try:
                answers[index] = self._run(generation, job)
            except BaseException as error:
                answers[index] = error

        threads = [threading.Thread(target=run, args=(index, job), daemon=True)
                   for index, job in enumerate(jobs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return answers

    def mates(self, job_id: str) -> list[str]:
        """The jobs of the batch `job_id` runs in now (itself alone when not batched)."""
        with self.cond:
            batch = self.batch_of.get(job_id, (job_id,))
            return [other for other in batch if self.batch_of.get(other, batch) is batch]

    def live(self, job_id: str) -> int:
        with self.cond:
            return sum(g not in self.dead for g in self.runs.get(job_id, ()))

    def kill(self, generation: int) -> None:
        with self.cond:
            self.dead.add(generation)
            self.cond.notify_all()

    def tell(self, job_id: str, fate: str | None = None, progress: int | None = None) -> None:
        with self.cond:
            if fate is not None:
                self.fates[job_id] = fate
            if progress is not None:
                self.progress[job_id] = progress
            self.cond.notify_all()

    def finish(self) -> None:
        """The example is over: every handler still waiting returns (raises), dead ones too."""
        with self.cond:
            self.over = True
            self.cond.notify_all()

    def _run(self, generation: int, job: JobContext) -> Output:
        with self.cond:
            self.entries[job.id] = self.entries.get(job.id, 0) + 1
            self.runs.setdefault(job.id, []).append(generation)
            self.reported[job.id] = 0
        try:
            shown = 0
            while True:
                with self.cond:
                    while generation in self.dead and not self.over:
                        self.cond.wait()  # its process is gone: it never goes on
                    if self.over:
                        raise RuntimeError("the test is over")
                    wanted = self.progress.get(job.id, 0)
                    fate = self.fates.get(job.id)
                    if wanted <= shown and fate is None:
                        # A cancel sets an Event of the engine's, not this condition: look
                        # again soon.
                        self.cond.wait(POLL_SECONDS)
                job.raise_if_cancelled()
                if wanted > shown:
                    shown = wanted
                    job.set_progress(shown, 100, "steps")
                    with self.cond:
                        self.reported[job.id] = shown
                        self.cond.notify_all()
                elif fate == "succeed":
                    path = job.out_dir / RESULT
                    path.write_text(job.id)
                    return Output(data={"id": job.id}, files=[path])
                elif fate == "fail":
                    raise BadInput("the lifecycle test's bad input")
                elif fate == "crash":
                    raise RuntimeError("the lifecycle test's handler bug")
        finally:
            with self.cond:
                self.runs[job.id].remove(generation)
                self.cond.notify_all()


class Loop:
    """An event loop on a thread of its own, running between the machine's steps too (the
    PostgreSQL side beats and listens all the time)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coroutine, seconds: float = CALL_SECONDS):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(seconds)

    def freeze(self) -> None:
        """Stop running it, as a killed process would: its tasks never run again."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_all(), 10)
        self.freeze()
        with contextlib.suppress(Exception):
            self.loop.close()


# ---- the engines, as the machine drives them ----


class EmbeddedHarness:
    """The embedded engine on a SQLite file and an out/ folder that outlive it."""

    name = "embedded"

    def __init__(self, folder: Path, control: Control, metrics: Metrics) -> None:
        self.control = control
        self.metrics = metrics
        self.settings = Settings(out_dir=folder / "out", shutdown_grace=0)
        self.out_dir = self.settings.out_dir
        self.loop = Loop("embedded-loop")
        self.generation = 0
        self.dead: list[EmbeddedEngine] = []
        self.engine = self._open()

    def _open(self) -> EmbeddedEngine:
        self.generation += 1
        engine = EmbeddedEngine(self.settings, {KIND: self.control.kind(self.generation)},
                                self.metrics)
        self.loop.run(engine.start())
        return engine

    def call(self, method: str, *args):
        return self.loop.run(getattr(self.engine, method)(*args))

    def restart(self) -> None:
        """A clean stop, as the server's shutdown does it (no grace), then a start."""
        self.loop.run(_shut_down(self.engine))
        self.engine = self._open()

    def crash(self) -> None:
        """kill -9 of the process, right after its store's writer committed what it had: its
        threads never go on and nothing of it writes again; a new engine opens the same
        SQLite file and out/ folder."""
        old = self.engine
        old._stopping.set()  # its watchdog ends (it would cancel jobs)
        for pool in old.pools.values():
            pool.closed = True  # its threads start nothing more
        self.control.kill(self.generation)  # its running handlers never return
        old.store.flush()
        old.store.save = old.store.delete = lambda *args, **kwargs: None
        self.dead.append(old)
        self.engine = self._open()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.run(self.engine.stop(), 30)
        self.loop.close()


async def _shut_down(engine) -> None:
    await engine.close_intake()
    if await engine.busy():
        await engine.end_put_jobs()
    await engine.stop()


class PostgresHarness:
    """The API side (PostgresEngine without workers) on the test's loop, and a worker
    (Runner) on a loop and a connection pool of its own, so that it can die alone."""

    name = "postgres"

    def __init__(self, folder: Path, control: Control, metrics: Metrics, url: str) -> None:
        from jobqueue.engines.postgres.engine import PostgresEngine

        self.control = control
        self.metrics = metrics
        self.url = url
        self.settings = Settings(out_dir=folder / "out", database_url=url, shutdown_grace=0)
        self.out_dir = self.settings.out_dir
        self.loop = Loop("api-loop")
        self.generation = 0
        self._engine_class = PostgresEngine
        self.engine = self._open_engine()
        self.runner_loop: Loop | None = None
        self.runner = None
        self.dead: list = []
        self._start_runner()

    def _open_engine(self):
        engine = self._engine_class(self.settings, {KIND: self.control.kind(0)}, self.metrics)
        self.loop.run(engine.start())
        return engine

    def _start_runner(self) -> None:
        from jobqueue.engines.postgres import timeouts
        from jobqueue.engines.postgres.engine import STATEMENT_SECONDS
        from jobqueue.engines.postgres.runner import Runner

        self.generation += 1
        application = f"jq-runner-{self.generation}"
        loop = Loop(f"runner-{self.generation}")

        async def start():
            pool = timeouts.Pool(f"{self.url}?application_name={application}",
                                 STATEMENT_SECONDS, min_size=1, max_size=8, open=False,
                                 timeout=3.0)
            await pool.open(wait=False)
            runner = Runner(self.settings, {KIND: self.control.kind(self.generation)}, pool,
                            self.metrics)
            await runner.start()
            return runner

        self.runner = loop.run(start())
        self.runner_loop = loop

    def _stop_runner(self) -> None:
        async def stop():
            await self.runner.stop()
            await self.runner.pool.close()

        self.runner_loop.run(stop())
        self.runner_loop.close()

    def call(self, method: str, *args):
        """The facade's call, again while PostgreSQL is away (503) within the deadline: a
        client's retry. Submits carry an idempotency key, so a retry never makes two."""
        deadline = time.monotonic() + CALL_SECONDS
        while True:
            try:
                return self.loop.run(getattr(self.engine, method)(*args))
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(POLL_SECONDS)

    def restart(self) -> None:
        """The worker's clean stop (running jobs are queued again), the replica's, then both
        start again."""
        self._stop_runner()
        self.loop.run(_shut_down(self.engine))
        self.engine = self._open_engine()
        self._start_runner()

    def crash(self) -> None:
        """The worker process dies (kill -9): its loop never runs again, its connections are
        cut (as the server sees a killed client's), its handlers never return. A new worker
        (the same name, as a restarted container's) rescues its jobs."""
        self.runner_loop.freeze()
        self.control.kill(self.generation)
        self.dead.append((self.runner, self.runner_loop))
        self._terminate(f"AND application_name = 'jq-runner-{self.generation}'")
        self._start_runner()

    def outage(self) -> None:
        """Every connection to the database is cut at once (an outage, a failover)."""
        self._terminate()

    def _terminate(self, where: str = "") -> None:
        database = self.url.rsplit("/", 1)[1]
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         f"WHERE datname = %s AND pid <> pg_backend_pid() {where}",
                         (database,))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stop_runner()
        with contextlib.suppress(Exception):
            self.loop.run(self.engine.stop(), 30)
        self.loop.close()
        for runner, _ in self.dead:
            runner.executor.shutdown(wait=False)


# ---- the machine ----


@dataclass
class Tracked:
    """The test's view of one accepted job."""

    id: str
    origin: Origin
    upload: bool
    status: str = "queued"  # as last seen
    deleted: bool = False
    cancelled: bool = False  # a cancel was asked
    fate: str | None = None  # an end was asked
    end: tuple | None = None  # the end as first seen
    entries_at_end: int = 0


def end_of(record: JobRecord) -> tuple:
    return (record.status, record.finished_at, record.error_kind, record.result,
            record.attempt)


ENDED_OUTCOMES = [o.value for o in Outcome if o is not Outcome.REFUSED]
FATE_STATUS = {"succeed": "succeeded", "fail": "failed", "crash": "failed"}
FATE_KIND = {"succeed": None, "fail": "bad_input", "crash": "internal"}


class Lifecycle(RuleBasedStateMachine):
    """Rules pick a job by an index into the jobs that fit (shrinks well)."""

    make_harness = None  # set by each test: (Control, Metrics) -> harness
    batched = False  # the batched variants': the kind runs its jobs in batches

    def __init__(self) -> None:
        super().__init__()
        self.control = Control(self.batched)
        self.metrics = Metrics([KIND])
        self.h = type(self).make_harness(self.control, self.metrics)
        self.jobs: dict[str, Tracked] = {}
        self.records: dict[str, JobRecord | None] = {}
        self.steps: list[str] = []

    def teardown(self) -> None:
        self.control.finish()
        self.h.close()
        # A killed worker's loop leaves its tasks pending: collected here, their finalizers
        # run now rather than inside a later ast.parse (hypothesis reads the test's source),
        # where CPython 3.11 fails with "AST constructor recursion depth mismatch".
        gc.collect()

    # -- choosing --

    def _with(self, *statuses: str) -> list[Tracked]:
        return [job for job in self.jobs.values() if not job.deleted and job.status in statuses
                and not job.cancelled and job.fate is None]

    def _ended(self) -> list[Tracked]:
        return [job for job in self.jobs.values() if not job.deleted and job.end is not None]

    @staticmethod
    def _pick(jobs: list[Tracked], index: int) -> Tracked:
        return jobs[index % len(jobs)]

    # -- rules --

    @rule(upload=st.booleans())
    def submit_job(self, upload: bool) -> None:
        """POST /jobs."""
        self._submit(Origin.JOBS, upload)

    @rule(upload=st.booleans())
    def submit_put(self, upload: bool) -> None:
        """PUT /put: its client waits for the answer (the engine's deadline on it)."""
        self._submit(Origin.PUT, upload)

    def _submit(self, origin: Origin, upload: bool) -> None:
        job_id = jobfiles.new_job_id()
        input_path = None
        if upload:  # as read_submission leaves it: out/<id>/input/<name>
            folder = jobfiles.job_dir(self.h.out_dir, job_id)
            jobfiles.make_job_dir(folder)
            (folder / "input").mkdir()
            input_path = folder / "input" / "upload.txt"
            input_path.write_text("an upload")
        new = NewJob(id=job_id, kind=self.h.engine.kinds[KIND], options=StepOptions(label="x"),
                     input_path=input_path, origin=origin, idempotency_key=str(uuid.uuid4()))
        self.steps.append(f"submit({origin.value}, upload={upload})")
        try:
            record = self.h.call("submit", new, True)
        except QueueFull:
            assert self.h.call("get", job_id) is None
            assert not jobfiles.job_dir(self.h.out_dir, job_id).exists(), \
                "a refused upload leaves no folder"
        else:
            assert record.id == job_id and record.status == "queued"
            self.jobs[job_id] = Tracked(job_id, origin, upload)
        self.settle()

    @precondition(lambda self: self._with("running"))
    @rule(index=st.integers(0, 20))
    def progress(self, index: int) -> None:
        job = self._pick(self._with("running"), index)
        self.steps.append(f"progress({job.id[:8]})")
        wanted = self.control.progress.get(job.id, 0) + 1
        self.control.tell(job.id, progress=wanted)
        self.settle()

    @precondition(lambda self: self._with("running"))
    @rule(index=st.integers(0, 20), fate=st.sampled_from(["succeed", "fail", "crash"]))
    def end(self, index: int, fate: str) -> None:
        job = self._pick(self._with("running"), index)
        self.steps.append(f"end({job.id[:8]}, {fate})")
        # A batch's jobs end together, when it returns: each is told its end.
        running = self._with("running")
        ending = [other for other in running if other.id in self.control.mates(job.id)]
        for other in ending:
            other.fate = fate
            self.control.tell(other.id, fate=fate)
        self.settle()
        for other in ending:
            record = self.records[other.id]
            assert (record.status, record.error_kind) == (FATE_STATUS[fate], FATE_KIND[fate]), \
                (fate, record)

    @precondition(lambda self: self._with("queued", "running"))
    @rule(index=st.integers(0, 20))
    def cancel(self, index: int) -> None:
        job = self._pick(self._with("queued", "running"), index)
        self.steps.append(f"cancel({job.id[:8]}, {job.status})")
        job.cancelled = True
        self.h.call("cancel", job.id, "the lifecycle test")
        self.settle()
        assert self.records[job.id].status == "cancelled", self.records[job.id]

    @precondition(lambda self: self._ended())
    @rule(index=st.integers(0, 20))
    def cancel_after_end(self, index: int) -> None:
        job = self._pick(self._ended(), index)
        self.steps.append(f"cancel_after_end({job.id[:8]})")
        self.h.call("cancel", job.id, "the lifecycle test, late")
        self.settle()

    @precondition(lambda self: self._ended())
    @rule(index=st.integers(0, 20), twice=st.booleans())
    def delete(self, index: int, twice: bool) -> None:
        job = self._pick(self._ended(), index)
        self.steps.append(f"delete({job.id[:8]}, twice={twice})")
        self.h.call("delete", job.id)
        job.deleted = True
        if twice:
            self.h.call("delete", job.id)
        self.settle()

    def _may_stop(self) -> bool:
        """A crash or restart with work in flight, a few times an example (each costs)."""
        stops = sum(step in ("worker_crash()", "restart()", "outage()")
                    for step in self.steps)
        return stops < MAX_STOPS and bool(self._with("queued", "running")
                                          or any(job.cancelled and job.end is None
                                                 for job in self.jobs.values()))

    @precondition(_may_stop)
    @rule()
    def worker_crash(self) -> None:
        self.steps.append("worker_crash()")
        self.h.crash()
        self.settle()

    @precondition(_may_stop)
    @rule()
    def restart(self) -> None:
        self.steps.append("restart()")
        self.h.restart()
        self.settle()

    # -- waiting for the state a step leads to --

    def settle(self) -> None:
        """Poll (bounded) until every asked end has come, each running job's handler runs
        in a live worker, and no worker is free while a job waits; then note what is seen."""
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            records = {job_id: self.h.call("get", job_id) for job_id in self.jobs}
            waiting = self._unsettled(records)
            if not waiting:
                break
            assert time.monotonic() < deadline, \
                f"{self.h.name}: never settled: {waiting}; steps: {self.steps}"
            time.sleep(POLL_SECONDS)
        self.records = records
        for job_id, record in records.items():
            job = self.jobs[job_id]
            if record is None:
                continue
            job.status = record.status
            if record.status in FINISHED and job.end is None:
                job.end = end_of(record)
                job.entries_at_end = self.control.entries.get(job_id, 0)

    def _unsettled(self, records: dict[str, JobRecord | None]) -> list[str]:
        waiting = []
        running = queued = 0
        for job_id, record in records.items():
            job = self.jobs[job_id]
            if record is None:
                continue  # deleted: the invariants check it is meant to be
            if record.status in FINISHED:
                if self.control.live(job_id):
                    waiting.append(f"{job_id[:8]} ended, its handler still in")
                continue
            if job.cancelled or job.fate is not None:
                waiting.append(f"{job_id[:8]} {record.status}, to end")
            if record.status == "running":
                running += 1
                if not self.control.live(job_id):
                    waiting.append(f"{job_id[:8]} running with no live handler")
                elif (self.h.name == "embedded" and record.progress.get("done", 0)
                      < self.control.progress.get(job_id, 0)):
                    waiting.append(f"{job_id[:8]} progress not shown yet")
            elif record.status == "queued":
                queued += 1
        if queued and running < self.control.workers:
            waiting.append(f"{queued} queued with {running} of {self.control.workers} workers "
                           "busy")
        return waiting

    # -- the invariants --

    @invariant()
    def an_end_never_changes_and_runs_nothing_more(self) -> None:
        for job in self.jobs.values():
            if job.end is None:
                continue
            record = self.records.get(job.id)
            if record is not None:
                assert end_of(record) == job.end, \
                    f"{job.id}: ended {job.end}, now {end_of(record)}; steps: {self.steps}"
            assert self.control.entries.get(job.id, 0) == job.entries_at_end, \
                f"{job.id}: its handler ran again after its end; steps: {self.steps}"

    @invariant()
    def a_deleted_job_never_comes_back_and_no_other_goes(self) -> None:
        for job in self.jobs.values():
            record = self.records.get(job.id)
            if job.deleted:
                assert record is None, f"{job.id}: deleted, back as {record}; {self.steps}"
            else:
                assert record is not None, f"{job.id}: accepted, lost; steps: {self.steps}"

    @invariant()
    def the_queue_count_is_the_queued_records(self) -> None:
        queued = sum(r is not None and r.status == "queued" for r in self.records.values())
        stats = self.h.call("stats")[KIND]
        assert stats["queued"] == queued, (stats, queued, self.steps)

    @invariant()
    def each_end_is_counted_once(self) -> None:
        ended = sum(job.end is not None for job in self.jobs.values())
        counted = self._counted()
        assert counted <= ended, f"{counted} ends counted for {ended} jobs; {self.steps}"
        self._eventually(lambda: self._counted() == ended,
                         lambda: f"{self._counted()} ends counted for {ended} jobs")

    @invariant()
    def job_folders_follow_the_records(self) -> None:
        def wrong() -> list[str]:
            problems = []
            folders = {path.name for path in self.h.out_dir.iterdir()
                       if jobfiles.is_job_id(path.name)} if self.h.out_dir.exists() else set()
            for name in folders:
                job = self.jobs.get(name)
                if job is None or job.deleted:
                    problems.append(f"folder {name} with no record")
            for job in self.jobs.values():
                if job.deleted or job.end is None or job.end[0] != "succeeded":
                    continue
                if not (jobfiles.job_dir(self.h.out_dir, job.id) / RESULT).is_file():
                    problems.append(f"succeeded {job.id} without its {RESULT}")
            return problems

        self._eventually(lambda: not wrong(), lambda: str(wrong()))

    def _counted(self) -> int:
        return int(sum(self.metrics.registry.get_sample_value(
            "jobqueue_jobs_total", {"kind": KIND, "outcome": o}) or 0 for o in ENDED_OUTCOMES))

    def _eventually(self, condition, describe, seconds: float = 15.0) -> None:
        """Some bookkeeping follows the record a moment later (a worker tidies the files
        after it wrote the end): poll for it, bounded."""
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline, f"{self.h.name}: {describe()}; {self.steps}"
            time.sleep(POLL_SECONDS)


class PostgresLifecycle(Lifecycle):
    @precondition(lambda self: self._may_stop())
    @rule()
    def outage(self) -> None:
        self.steps.append("outage()")
        self.h.outage()
        self.settle()


class BatchedLifecycle(Lifecycle):
    batched = True


class BatchedPostgresLifecycle(PostgresLifecycle):
    batched = True


BOUNDS = dict(deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                     HealthCheck.data_too_large])


def test_embedded_lifecycle(tmp_path):
    def make(control: Control, metrics: Metrics) -> EmbeddedHarness:
        return EmbeddedHarness(Path(tempfile.mkdtemp(dir=tmp_path)), control, metrics)

    Lifecycle.make_harness = staticmethod(make)
    run_state_machine_as_test(Lifecycle, settings=settings(
        max_examples=40, stateful_step_count=40, **BOUNDS))


def test_embedded_lifecycle_batched(tmp_path):
    def make(control: Control, metrics: Metrics) -> EmbeddedHarness:
        return EmbeddedHarness(Path(tempfile.mkdtemp(dir=tmp_path)), control, metrics)

    BatchedLifecycle.make_harness = staticmethod(make)
    run_state_machine_as_test(BatchedLifecycle, settings=settings(
        max_examples=12, stateful_step_count=40, **BOUNDS))


@pytest.fixture
def quick_rescue(monkeypatch):
    """A worker that stopped beating is taken for dead after 3 s, not 8: the rescue of a killed
    worker's jobs within a step's wait."""
    from jobqueue.engines.postgres import engine, runner

    monkeypatch.setattr(runner, "HEARTBEAT_SECONDS", 0.5)
    monkeypatch.setattr(runner, "STALLED_SECONDS", 3.0)
    monkeypatch.setattr(runner, "FETCH_POLL_SECONDS", 0.2)
    monkeypatch.setattr(engine, "STALLED_SECONDS", 3.0)


# A killed worker's loop never runs again: its coroutines are collected unfinished.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_postgres_lifecycle(postgres, tmp_path, quick_rescue):
    def make(control: Control, metrics: Metrics) -> PostgresHarness:
        return PostgresHarness(Path(tempfile.mkdtemp(dir=tmp_path)), control, metrics,
                               postgres.new_database())

    PostgresLifecycle.make_harness = staticmethod(make)
    run_state_machine_as_test(PostgresLifecycle, settings=settings(
        max_examples=6, stateful_step_count=25, **BOUNDS))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_postgres_lifecycle_batched(postgres, tmp_path, quick_rescue):
    def make(control: Control, metrics: Metrics) -> PostgresHarness:
        return PostgresHarness(Path(tempfile.mkdtemp(dir=tmp_path)), control, metrics,
                               postgres.new_database())

    BatchedPostgresLifecycle.make_harness = staticmethod(make)
    run_state_machine_as_test(BatchedPostgresLifecycle, settings=settings(
        max_examples=3, stateful_step_count=25, **BOUNDS))


def test_postgres_a_cancel_that_a_shutdown_overtakes_still_ends_the_job(postgres, tmp_path,
                                                                       quick_rescue,
                                                                       monkeypatch):
    """A cancel written to the database whose abort has not reached the worker yet (here it
    never does: neither procrastinate's abort nor the watch of cancels looks), then the
    worker's shutdown aborts the run: the job ends as cancelled, not queued to run again (the
    lifecycle machine's outage-then-cancel found it: the outage stopped procrastinate's
    worker just after the cancel)."""
    from jobqueue.engines.postgres import runner

    monkeypatch.setattr(runner, "ABORT_POLL_SECONDS", 3600.0)
    control = Control()
    harness = PostgresHarness(tmp_path, control, Metrics([KIND]), postgres.new_database())
    try:
        job_id = jobfiles.new_job_id()
        harness.call("submit", NewJob(id=job_id, kind=harness.engine.kinds[KIND],
                                      options=StepOptions(), input_path=None,
                                      origin=Origin.JOBS), True)
        deadline = time.monotonic() + SETTLE_SECONDS
        while not control.live(job_id):
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(POLL_SECONDS)
        with psycopg.connect(harness.url, autocommit=True) as conn:  # the cancel, no abort
            conn.execute("UPDATE jobqueue_jobs SET cancelled_as = 'cancelled' WHERE id = %s",
                         (job_id,))
        harness.restart()
        while (record := harness.call("get", job_id)).status != "cancelled":
            assert time.monotonic() < deadline, f"the cancel was lost: {record}"
            time.sleep(POLL_SECONDS)
        assert control.entries[job_id] == 1 and not control.live(job_id)
    finally:
        control.finish()
        harness.close()
