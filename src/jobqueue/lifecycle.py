"""A job's lifecycle: every transition and every rule attached to one, for both engines.

    submit ──> queued ──start──> running ──end──> succeeded | failed | cancelled
                 │  ^ ^              │                            │
                 │  │ └──requeue─────┤  (a shutdown, a dead worker: it runs again)
                 │  └────retry───────┘  (a failed attempt its kind's Retry runs again, later)
                 │  ^─────────────── POST /jobs/{id}/retry ───────┘ (a failed job, by hand)
                 └──cancel──> cancelled <──cancel (stops the run; its end says cancelled)

An ended job never changes again (but for a client's explicit retry of a failed one): a late
cancel, a second DELETE, an end of a stale run (an
attempt that is no longer the job's) or a second end change nothing. The engines keep the state
(a `Job` under a lock in the embedded one, a row in PostgreSQL guarded by the same rules in its
statements) and ask this module what each event does; neither decides an outcome itself.

Which queued job starts next: the highest `priority` first, then the lowest `fair_round`
(owners take turns), then the first to come (`dispatch_order`). A failed attempt runs again
as `retry_in` says; a queued job's start is estimated by `estimated_start`.

`run` is the ladder from a handler's run to its `Ending`, `run_batch` the same for a batched
kind's handler and its jobs; `at_deadline` is how a job stopped at its run-time limit ends;
`files_after` says which of a job's files stay once it has ended.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from jobqueue import logs
from jobqueue.errors import (
    BadInput,
    DiskFull,
    JobCancelled,
    KindError,
    RetryLater,
    TimedOut,
    Unavailable,
    category_of,
    is_disk_full,
    user_message,
)
from jobqueue.files import jobfiles
from jobqueue.jobs import JobContext, JobKind, JobStatus, Output, Retry
from jobqueue.records import JobRecord, Origin

log = logging.getLogger(__name__)

QUEUED, RUNNING = JobStatus.QUEUED, JobStatus.RUNNING
SUCCEEDED, FAILED, CANCELLED = JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED

# Which statuses each transition leaves from. The PostgreSQL statements guard their UPDATEs
# with these same statuses (tests/test_sql.py holds them to it), the embedded engine checks
# them under its lock.
CAN_START = frozenset({QUEUED})
# In the distributed engine the record's own procrastinate job may also claim it again while
# it shows running (procrastinate ran that job anew after its fetch died): the claim's new
# attempt makes the earlier run stale.
CAN_CLAIM = CAN_START | {RUNNING}
# A run's end, its progress and its requeue are written only while it runs, and only by the
# run that claimed the job last (its `attempt`).
RUN_ENDS_FROM = frozenset({RUNNING})
# A queued job ends at its cancel; a running one is told to stop and ends when its run does.
ENDS_AT_CANCEL = frozenset({QUEUED})
STOPS_AT_CANCEL = frozenset({RUNNING})
# Any end: a run's or a cancel's.
CAN_END = RUN_ENDS_FROM | ENDS_AT_CANCEL


# A client's retry (POST /jobs/{id}/retry) takes a failed job back to queued; a /put job's
# client that stops waiting (Prefer: respond-async) hands over a job not ended yet.
CAN_RETRY = frozenset({FAILED})
CAN_HAND_OVER = frozenset({QUEUED, RUNNING})


def can_start(status: JobStatus) -> bool:
    return status in CAN_START


def can_end(status: JobStatus) -> bool:
    """Whether an end may be written: a run's (RUN_ENDS_FROM) or a cancel's (ENDS_AT_CANCEL);
    never twice."""
    return status in CAN_END


def next_attempt(attempt: int) -> int:
    """The attempt a start makes: every run, the first and each one after a requeue, counts."""
    return attempt + 1


class AtCancel(Enum):
    """What a cancel does to a job, by the status it finds."""

    ENDS_NOW = "ends now"  # queued: cancelled at once, its queue slot given back
    STOPS_RUN = "stops its run"  # running: its children are killed, its run ends cancelled
    # Running in a batch: it ends now (cancelled, or at its deadline as `at_deadline` says),
    # its context is told (its children are killed), and its answer is dropped when the batch
    # returns; the batch runs on for its other jobs.
    LEAVES_BATCH = "leaves its batch"
    NOTHING = "nothing"  # ended already: a late or second cancel changes nothing


def at_cancel(status: JobStatus, batched: bool = False) -> AtCancel:
    """What a cancel (a client's, a deadline, a shutdown) does; `batched`: the job runs in a
    batch (its kind has `batch`), whose shared run a cancel of one job must not stop."""
    if status in ENDS_AT_CANCEL:
        return AtCancel.ENDS_NOW
    if status in STOPS_AT_CANCEL:
        return AtCancel.LEAVES_BATCH if batched else AtCancel.STOPS_RUN
    return AtCancel.NOTHING


def after_interrupted_run(cancel_requested: bool) -> JobStatus:
    """A run that stopped without an end of its own (its worker shut down, or died): a job a
    cancel asked to stop is cancelled, any other is queued again to run from the start."""
    return CANCELLED if cancel_requested else QUEUED


def after_restart(origin: Origin) -> JobStatus:
    """An unfinished job found at an embedded server's start: a /put job's client was answered
    or gone with the server, so it is cancelled; a POST /jobs job is queued again."""
    return CANCELLED if origin is Origin.PUT else QUEUED


@dataclass(frozen=True)
class Ending:
    """How a run ended: its status, the handler's output (succeeded only) and its error."""

    status: JobStatus
    output: Output | None = None
    error: BaseException | None = None

    @property
    def result(self) -> dict[str, Any] | None:
        """The result as a record keeps it: the handler's data and its files' names."""
        if self.output is None:
            return None
        return {"data": self.output.data, "files": [path.name for path in self.output.files]}

    @property
    def error_category(self) -> str | None:
        """What the record keeps as its `error_kind`: the error's category (errors.py)."""
        return category_of(self.error) if self.error is not None else None

    def error_message(self, job_id: str) -> str | None:
        return user_message(self.error, job_id)


def run(kind: JobKind, context: JobContext, prepare: Callable[[], None] | None = None,
        keep: Callable[[Output], None] | None = None) -> Ending:
    """Run a job's handler on this thread, and how it ended. `prepare` runs first (a worker
    fetches the input), `keep` after a success (a worker publishes the outputs); a cancel
    during either ends the job cancelled too.

    The ladder: a handler that returns succeeds, unless a cancel came meanwhile; a cancel
    (JobCancelled) cancels; BadInput (TooLarge, UnsupportedInput) fails with its message; a
    full disk fails naming the disk; anything else fails as an internal error, its traceback
    logged (`failed`). A deadline or a shutdown is the engine's to apply on top
    (`at_deadline`, `after_interrupted_run`)."""
    # What the handler logs is about this job (logs.py gives its JSON lines the jobId).
    token = logs.current_job.set(context.id)
    try:
        if kind.writes_files:
            jobfiles.make_job_dir(context.out_dir)
        if prepare is not None:
            prepare()
        output = kind.handler(context)
        context.raise_if_cancelled()
        if keep is not None and output.files:
            keep(output)
    except BaseException as error:  # a job's failure must never end its worker
        return failed(context.id, error)
    finally:
        logs.current_job.reset(token)
    return Ending(SUCCEEDED, output)


def failed(job_id: str, error: BaseException, traceback: bool = True) -> Ending:
    """The ladder's rungs below success: how a job whose run raised `error` (or whose batch
    answered it in the job's place) ends. `traceback`: log it (a batch's own error is logged
    once, not once per job)."""
    if isinstance(error, JobCancelled):
        return Ending(CANCELLED)
    if isinstance(error, BadInput):
        log.info("job %s: bad input: %s", job_id, error)
        return Ending(FAILED, error=error)
    if _disk_full(error):
        log.error("job %s: the disk is full: %s", job_id, error)
        return Ending(FAILED, error=DiskFull(job_id))
    if traceback:  # a KindError's says nothing more than its message
        log.error("job %s: failed: %s", job_id, error,
                  exc_info=None if isinstance(error, KindError) else error)
    else:  # its batch's error, logged with its traceback once
        log.info("job %s: failed with its batch: %r", job_id, error)
    return Ending(FAILED, error=error)


def _disk_full(error: BaseException) -> bool:
    return isinstance(error, DiskFull) or is_disk_full(error)


def run_batch(kind: JobKind, contexts: Sequence[JobContext],
              prepare: Callable[[JobContext], None] | None = None,
              keep: Callable[[JobContext, Output], None] | None = None,
              on_call: Callable[[int], None] | None = None) -> list[Ending]:
    """Run a batched kind's handler once for these jobs (started, in their queue's order) on
    this thread; how each ended, in the same order. Per job, `run`'s ladder: `prepare(job)`
    first (a job whose prepare fails, or that was cancelled by then, is left out of the call
    and ends by the ladder), then one call of the handler for all the others (`on_call(n)`
    just before it); its answer in a job's place decides that job: an `Output` succeeds
    (unless the job was cancelled meanwhile; `keep(job, output)` after), an exception ends it
    as the same exception raised by a single job's handler would. The handler raising ends
    every job of the call with its exception; an answer that is no list of one `Output` or
    exception per job fails them all as a crash of the kind (KindError)."""
    endings: list[Ending | None] = [None] * len(contexts)
    called: list[int] = []
    for index, context in enumerate(contexts):
        try:
            context.raise_if_cancelled()
            if kind.writes_files:
                jobfiles.make_job_dir(context.out_dir)
            if prepare is not None:
                prepare(context)
            context.raise_if_cancelled()
        except BaseException as error:
            endings[index] = failed(context.id, error)
        else:
            called.append(index)
    if called:
        jobs = [contexts[index] for index in called]
        if on_call is not None:
            on_call(len(jobs))
        try:
            answers = kind.handler(jobs)
            if not isinstance(answers, (list, tuple)) or len(answers) != len(jobs):
                got = (f"{len(answers)} answers" if isinstance(answers, (list, tuple))
                       else f"a {type(answers).__name__}")
                raise KindError(f"the {kind.name} kind's batch handler returned {got} for a "
                                f"batch of {len(jobs)} jobs (it must return a list of one "
                                "Output or exception per job, in their order)")
        except BaseException as error:  # every job of the call ends with it
            ids = ", ".join(context.id for context in jobs)
            if not isinstance(error, (JobCancelled, BadInput)) and not _disk_full(error):
                log.error("a batch of %d %s jobs failed (%s): %s", len(jobs), kind.name, ids,
                          error, exc_info=None if isinstance(error, KindError) else error)
            for index in called:
                endings[index] = failed(contexts[index].id, error, traceback=False)
        else:
            for index, answer in zip(called, answers):
                endings[index] = _answered(kind, contexts[index], answer, keep)
    return endings  # type: ignore[return-value]  # every place is filled


def _answered(kind: JobKind, context: JobContext, answer: Any,
              keep: Callable[[JobContext, Output], None] | None) -> Ending:
    """How a job of a batch ends by its answer (the place of `run`'s handler return)."""
    try:
        if isinstance(answer, BaseException):
            raise answer
        if not isinstance(answer, Output):
            raise KindError(f"the {kind.name} kind's batch handler answered a "
                            f"{type(answer).__name__} for it, not an Output or an exception")
        context.raise_if_cancelled()
        if keep is not None and answer.files:
            keep(context, answer)
    except BaseException as error:
        return failed(context.id, error)
    return Ending(SUCCEEDED, answer)


def deadline(origin: Origin, created_at: float, started_at: float, put_timeout: float,
             max_seconds: float) -> float:
    """When a running job is stopped (epoch seconds): a /put job when its client stops waiting
    (its kind's timeout from its submission: the watchdog makes sure it stops), a POST /jobs
    job JOBQUEUE_JOB_MAX_SECONDS after it started."""
    if origin is Origin.PUT:
        return created_at + put_timeout
    return started_at + max_seconds


def at_deadline(job_id: str, origin: Origin, max_seconds: float,
                store_down_for: float | None = None) -> Ending:
    """How a job stopped at its deadline ends, whatever its handler made of being stopped: a
    run that waited for the object store all along fails naming the store; otherwise a /put
    job is cancelled (its client got 504 and its folder goes), a POST /jobs job fails naming
    the setting."""
    if store_down_for is not None:  # not the input's fault: say whose (a /put gets 503)
        return Ending(FAILED, error=Unavailable(
            f"Job {job_id} waited {store_down_for:.0f} s for the object store "
            "(JOBQUEUE_STORAGE_URL), which could not be reached, until "
            "JOBQUEUE_JOB_MAX_SECONDS stopped it. Send it again once the store is back."))
    if origin is Origin.PUT:
        return Ending(CANCELLED)
    return Ending(FAILED, error=TimedOut(
        f"Job {job_id} ran longer than {max_seconds:g} s (JOBQUEUE_JOB_MAX_SECONDS) and was "
        "stopped. Send smaller input, or raise the setting."))


class Keep(Enum):
    """Which of an ended job's files stay."""

    ALL = "all"  # succeeded: its upload and its outputs, until it is deleted or expires
    INPUT = "input"  # a failed POST /jobs job: its upload stays with its record, to look at
    NOTHING = "nothing"  # cancelled, or a failed /put job (its answer carried the error)


def files_after(status: JobStatus, origin: Origin) -> Keep:
    """Partial output is no use to anyone, nor is a failed /put job's."""
    if status is CANCELLED or (status is FAILED and origin is Origin.PUT):
        return Keep.NOTHING
    if status is FAILED:
        return Keep.INPUT
    return Keep.ALL


# ---- which job starts next ----

def fair_round(lowest_queued: int | None, owners_last: int | None) -> int:
    """A new queued job's round, given the lowest round among the queued jobs of its kind and
    priority (None: none queued) and the highest among its owner's queued and running ones
    (None: none). Jobs are dispatched by round, so an owner with one job gets in ahead of
    another's backlog: key A's twenty jobs take rounds 1…20, key B's one then takes the
    round before the lowest still queued and starts next; an owner already in the queue
    takes the round after its last."""
    lowest = 1 if lowest_queued is None else lowest_queued
    return max(lowest - 1, (owners_last or 0) + 1)


def dispatch_order(priority: int, round_: int, seq: int) -> tuple[int, int, int]:
    """The sort key of a queued job: higher priority first, then lower round, then the
    order of submission (`seq`)."""
    return (-priority, round_, seq)


# ---- retries ----

# Never run again, whatever the kind's Retry says: the input's fault (BadInput, TooLarge,
# UnsupportedInput, TimedOut: the deadline), a cancel (a client's, a shutdown's), a full disk.
NEVER_RETRIED = (BadInput, JobCancelled, DiskFull)
# The attempts a RetryLater gets on a kind without a Retry of its own.
RETRY_LATER_ATTEMPTS = 3


def retry_policy(kind: JobKind, retries: int) -> Retry | None:
    """The kind's Retry with JOBQUEUE_<NAME>_RETRIES (`retries`) applied; None: no retries."""
    if retries <= 0:
        return None
    base = kind.retry or Retry()
    return Retry(retries + 1, base.backoff, base.max_backoff, base.jitter, base.on)


def max_attempts(kind: JobKind, retries: int) -> int:
    policy = retry_policy(kind, retries)
    return policy.attempts if policy is not None else 1


def retry_in(ending: Ending, policy: Retry | None, failures: int, origin: Origin,
             created_at: float, put_timeout: float, now: float, stopped: bool = False,
             rng: random.Random | None = None) -> float | None:
    """Seconds until a failed attempt runs again, or None when the failure is final.
    `failures`: the failed attempts before this one; `stopped`: a deadline or a shutdown
    stopped this run (never retried). A /put job is retried only if its next attempt starts
    within its client's wait (`put_timeout` from `created_at`)."""
    error = ending.error
    if ending.status is not FAILED or error is None or stopped:
        return None
    if isinstance(error, NEVER_RETRIED) or _disk_full(error):
        return None
    if isinstance(error, RetryLater):
        attempts = policy.attempts if policy is not None else RETRY_LATER_ATTEMPTS
        delay = error.after
    else:
        if policy is None or not isinstance(error, policy.on):
            return None
        attempts = policy.attempts
        delay = min(policy.max_backoff, policy.backoff * 2 ** failures)
        if policy.jitter:  # half of it at least: a retry never comes at once by chance
            delay = (rng or random).uniform(delay / 2, delay)
    if failures + 1 >= attempts:
        return None
    if origin is Origin.PUT and now + delay >= created_at + put_timeout:
        return None
    return delay


def upload_gone(record: JobRecord, kind: JobKind) -> bool:
    """Whether a failed job's upload is gone by the rules (files_after): a failed /put job
    keeps none, so a client's retry of it is refused (410) even while its folder is still
    being removed."""
    own_upload = record.input_path is not None and (
        kind.sample is None or record.input_path != str(kind.sample))
    return own_upload and files_after(FAILED, record.origin) is Keep.NOTHING


def earlier_error(attempt: int, message: str | None, finished_at: float) -> dict[str, Any]:
    """What a job keeps of a failed attempt, in its `earlier_errors`."""
    return {"attempt": attempt, "error": message or "failed", "finishedAt": finished_at}


# ---- how long a queued job waits ----

# Estimates start once a kind has this many finished runs to take a median of.
ESTIMATE_AFTER = 20


def estimated_start(ahead: int, median_seconds: float | None, finished: int, workers: int,
                    busy: int) -> float | None:
    """Seconds until a queued job likely starts: the jobs ahead of it × the kind's recent
    median run time ÷ its live workers; 0 while a worker is free; None before the kind has
    ESTIMATE_AFTER finished runs (or has no live worker)."""
    if finished < ESTIMATE_AFTER or median_seconds is None or workers <= 0:
        return None
    if busy < workers:
        return 0.0
    return ahead * median_seconds / workers
