"""What can go wrong, and the one table that says how each is answered over HTTP.

A job's failure crosses processes (a worker writes it, an API replica answers it), so a failed
job's record keeps the category of its error (`category_of`; the record's `error_kind`) beside
its message, and HTTP_STATUS turns that category into the status `/put` answers. (A category is
not a job kind: those are the `jobType`s in kinds/.) Errors raised in a request go through the
same table: the code below the routes raises these, never HTTP's own, and api/problems.py
alone turns them into answers (status, `{"detail": message}`, Retry-After and the like).
"""

from __future__ import annotations

import errno
import math


class BadInput(Exception):
    """The job's input cannot be processed; the message tells the user what to send instead."""


class UnsupportedInput(BadInput):
    """The upload is not the kind of file the job kind takes."""


class TooLarge(BadInput):
    """The input is over one of the server's limits (a JOBQUEUE_*_MAX_* setting)."""


class TimedOut(BadInput):
    """The job ran longer than JOBQUEUE_JOB_MAX_SECONDS and was stopped."""


class MalformedRequest(Exception):
    """The request itself is broken (a multipart body cut off or garbled, a client gone before
    its body was complete), whatever it asked for."""


class UploadTooSlow(Exception):
    """The body came in slower than JOBQUEUE_MIN_UPLOAD_KBPS allows and was cut off."""


class NotAuthenticated(Exception):
    """JOBQUEUE_API_KEYS is set and the request carries none of them (nor a valid token)."""


class NotFound(Exception):
    """What the request names is not there, or not the caller's: a job, a file."""


class FilesGone(NotFound):
    """A job's output file is not there any more (its job was deleted meanwhile)."""

    def __init__(self, job_id: str, name: str):
        super().__init__(f"Job {job_id!r} has no output file {name!r} (deleted?).")


class Conflict(Exception):
    """The job is not in the state the request needs (its files before it has succeeded)."""


class RateLimited(Exception):
    """One address asked too often (wrong API keys); it may again after `retry_after` s."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Busy(Exception):
    """As many uploads, event streams or previews are open as the server allows; retry after
    `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class JobFailed(Exception):
    """A job waited for (`/put`) did not succeed: answered by the category of error its record
    keeps (`error_kind`, one of HTTP_STATUS's), with the record's message, and with a
    Location naming the job (`job_id`) so that a client can tell it from a refused request."""

    def __init__(self, error_kind: str, message: str, job_id: str | None = None):
        super().__init__(message)
        self.error_kind = error_kind
        self.job_id = job_id


class DiskFull(Exception):
    """The output folder's disk is full: not the input's fault, but the user should know."""

    def __init__(self, job_id: str):
        super().__init__(f"The server's disk is full (JOBQUEUE_OUT_DIR); job {job_id} could not "
                         "write its files. Try again once space has been freed.")


class RecordsDiskFull(DiskFull):
    """The disk of the job records is full: the change asked for could not be recorded."""

    def __init__(self, location: str):
        Exception.__init__(self, f"The server's disk is full: the job records ({location}) "
                           "could not be written. Try again once space has been freed.")


class UploadDiskFull(DiskFull):
    """The disk filled up while an upload was being stored."""

    def __init__(self) -> None:
        Exception.__init__(self, "The server's disk is full; the upload could not be stored. "
                                 "Try again once space has been freed.")


class JobCancelled(Exception):
    """Raised inside a handler when its job was cancelled; the worker stops the job quietly."""


class RetryLater(Exception):
    """Raised by a handler: this attempt failed, run the job again in `after` seconds (a rate
    limit upstream, a resource busy). Counts as an attempt of the kind's Retry (three in all
    without one); once they are used up the job fails with `reason`."""

    def __init__(self, after: float = 1.0, reason: str = ""):
        after = float(after)
        # At most a day (a wait past threading's limits would break the worker that waits).
        self.after = min(max(0.0, after), 86400.0) if math.isfinite(after) else 86400.0
        super().__init__(reason or f"asked to be retried in {self.after:g} s")
        self.reason = reason


class KindError(Exception):
    """A kind's handler broke its side of the interface (a batch answered with the wrong
    number of results): a crash of the kind (category "internal"), whose record says what,
    since the message holds nothing of the server's insides."""


class QueueFull(Exception):
    """The kind's queue is at capacity; the client should retry after `retry_after` seconds."""

    def __init__(self, kind: str, capacity: int, retry_after: int):
        super().__init__(
            f"The {kind} queue is full ({capacity} jobs waiting); retry in {retry_after} s."
        )
        self.kind = kind
        self.retry_after = retry_after


class TooManyQueued(Exception):
    """One owner (API key, or client address) has JOBQUEUE_MAX_QUEUED_PER_KEY jobs of a kind
    waiting already; other owners still get in."""

    def __init__(self, kind: str, cap: int, retry_after: int):
        super().__init__(f"You have {cap} {kind} jobs waiting already, the most one API key may "
                         f"have (JOBQUEUE_MAX_QUEUED_PER_KEY); retry in {retry_after} s, once "
                         "one of them has started.")
        self.kind = kind
        self.retry_after = retry_after


class WouldTimeOut(Exception):
    """A /put job would start only after its kind's timeout (the jobs ahead of it × their
    recent median run time ÷ the live workers): refused at once rather than left to end in
    504."""

    def __init__(self, kind: str, estimate: float, timeout: float):
        self.retry_after = max(1, math.ceil(estimate))
        super().__init__(f"A {kind} job sent now would start in about {estimate:.0f} s, after "
                         f"the {timeout:g} s /put waits (JOBQUEUE_{kind.upper()}_TIMEOUT); "
                         f"retry in {self.retry_after} s, or use POST /jobs.")
        self.kind = kind
        self.estimate = estimate


class Gone(Exception):
    """What the request needs existed once and has been removed for good (a failed job's
    upload, for a retry)."""


class SetupFailed(Exception):
    """The kind's `setup` failed in every process that would run its jobs: a new job of it
    would only wait. `error` is the setup's (its type and message); setup is tried again in
    `retry_after` seconds."""

    def __init__(self, kind: str, error: str, retry_after: int):
        super().__init__(f"{kind} jobs cannot run now: the kind's setup failed ({error}); it is "
                         f"tried again in {retry_after} s, retry then.")
        self.kind = kind
        self.error = error
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is stopping and takes no new jobs. Answered with the message and the
    `retry_after` of api/shutdown.py's `shutting_down`, which knows when it will be back."""


class CannotStart(Exception):
    """The server must not start as configured (a damaged database, an output folder it
    cannot write); the message names what and how to put it right."""


class Unavailable(Exception):
    """Something the server needs (the database) cannot be reached; the message says what."""

    retry_after = 5


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


# The category of each error, most specific first: what a failed job's record keeps, and what
# a request's error is answered by (those after "unavailable" come of requests only).
CATEGORIES: list[tuple[type[BaseException], str]] = [
    (TooLarge, "too_large"),
    (UnsupportedInput, "unsupported"),
    (TimedOut, "timed_out"),
    (BadInput, "bad_input"),
    (DiskFull, "disk_full"),
    (QueueFull, "queue_full"),
    (WouldTimeOut, "would_time_out"),
    (TooManyQueued, "too_many_queued"),
    (Gone, "gone"),
    (RetryLater, "retry_later"),
    (ShuttingDown, "shutting_down"),
    (Unavailable, "unavailable"),
    (SetupFailed, "setup_failed"),
    (MalformedRequest, "malformed"),
    (UploadTooSlow, "too_slow"),
    (NotAuthenticated, "not_authenticated"),
    (NotFound, "not_found"),
    (Conflict, "conflict"),
    (RateLimited, "rate_limited"),
    (Busy, "busy"),
]

# Every error api/problems.py answers: what code below the routes may raise for a client.
ANSWERED: tuple[type[BaseException], ...] = (*(cls for cls, _ in CATEGORIES), JobFailed)

# How each category is answered over HTTP. "internal" is a bug: the detail names the job, the
# traceback is in the log.
HTTP_STATUS: dict[str, int] = {
    "too_large": 413,
    "unsupported": 415,
    "timed_out": 422,
    "bad_input": 422,
    "disk_full": 507,
    "queue_full": 503,
    "would_time_out": 503,
    "too_many_queued": 429,
    "gone": 410,
    "retry_later": 503,
    "shutting_down": 503,
    "unavailable": 503,
    "setup_failed": 503,
    "malformed": 400,
    "too_slow": 408,
    "not_authenticated": 401,
    "not_found": 404,
    "conflict": 409,
    "rate_limited": 429,
    "busy": 503,
    "internal": 500,
}


def category_of(error: BaseException) -> str:
    if is_disk_full(error):
        return "disk_full"
    return next((category for cls, category in CATEGORIES if isinstance(error, cls)),
                "internal")


def user_message(error: BaseException | None, job_id: str) -> str | None:
    """What a job's record says of its error: the message of an error the user can act on,
    never the inside of a bug."""
    if error is None:
        return None
    if isinstance(error, KindError):
        return f"Job {job_id} failed with an internal error: {error}."
    if category_of(error) == "internal":
        return f"Job {job_id} failed with an internal error; the server log has the details."
    return str(error) if not is_disk_full(error) else str(DiskFull(job_id))
