"""What can go wrong, and the one table that says how each is answered over HTTP.

A job's failure crosses processes (a worker writes it, an API replica answers it), so a failed
job's record keeps the kind of its error (`kind_of`) beside its message, and HTTP_STATUS turns
that kind into the status `/put` answers. Errors raised in a request go through the same table.
"""

from __future__ import annotations

import errno


class BadInput(Exception):
    """The job's input cannot be processed; the message tells the user what to send instead."""


class UnsupportedInput(BadInput):
    """The upload is not the kind of file the job kind takes."""


class TooLarge(BadInput):
    """The input is over one of the server's limits (a JOBQUEUE_*_MAX_* setting)."""


class TimedOut(BadInput):
    """The job ran longer than JOBQUEUE_JOB_MAX_SECONDS and was stopped."""


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


class JobCancelled(Exception):
    """Raised inside a handler when its job was cancelled; the worker stops the job quietly."""


class QueueFull(Exception):
    """The kind's queue is at capacity; the client should retry after `retry_after` seconds."""

    def __init__(self, kind: str, capacity: int, retry_after: int):
        super().__init__(
            f"The {kind} queue is full ({capacity} jobs waiting); retry in {retry_after} s."
        )
        self.kind = kind
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is stopping and takes no new jobs."""


class CannotStart(Exception):
    """The server must not start as configured (a damaged database, an output folder it
    cannot write); the message names what and how to put it right."""


class Unavailable(Exception):
    """Something the server needs (the database) cannot be reached; the message says what."""

    retry_after = 5


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


# The kind of each error, most specific first: what a failed job's record keeps.
KINDS: list[tuple[type[BaseException], str]] = [
    (TooLarge, "too_large"),
    (UnsupportedInput, "unsupported"),
    (TimedOut, "timed_out"),
    (BadInput, "bad_input"),
    (DiskFull, "disk_full"),
    (QueueFull, "queue_full"),
    (ShuttingDown, "shutting_down"),
    (Unavailable, "unavailable"),
]

# How each kind is answered over HTTP. "internal" is a bug: the detail names the job, the
# traceback is in the log.
HTTP_STATUS: dict[str, int] = {
    "too_large": 413,
    "unsupported": 415,
    "timed_out": 422,
    "bad_input": 422,
    "disk_full": 507,
    "queue_full": 503,
    "shutting_down": 503,
    "unavailable": 503,
    "internal": 500,
}


def kind_of(error: BaseException) -> str:
    if is_disk_full(error):
        return "disk_full"
    return next((kind for cls, kind in KINDS if isinstance(error, cls)), "internal")


def user_message(error: BaseException | None, job_id: str) -> str | None:
    """What a job's record says of its error: the message of an error the user can act on,
    never the inside of a bug."""
    if error is None:
        return None
    if kind_of(error) == "internal":
        return f"Job {job_id} failed with an internal error; the server log has the details."
    return str(error) if not is_disk_full(error) else str(DiskFull(job_id))
