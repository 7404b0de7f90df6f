"""What the client raises. Everything is a ClientError:

    ClientError            the base
    ├── Refused            the server answered with an error: .status, .detail
    │   └── RetriesExhausted   still 503 or 429 when the retry caps ran out: .attempts
    ├── Unreachable        no answer came (connection refused, reset, timed out)
    └── JobFailed          the job ended failed: .job (its error in .job.error)
        └── JobCancelled   the job ended cancelled
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

    from jobqueue.client.models import Job


class ClientError(Exception):
    """Anything the jobqueue client raises."""


class Refused(ClientError):
    """The server answered with an error status. `status` is it, `detail` the server's
    `{"detail": …}` as sent (a string, or for a request it could not validate a list of
    problems), `message` the detail as one line. str() is "<status>: <message>"."""

    def __init__(self, status: int, detail: Any, response: httpx.Response | None = None):
        self.status = status
        self.detail = detail
        self.response = response
        super().__init__(f"{status}: {self.message}")

    @property
    def message(self) -> str:
        if isinstance(self.detail, list):  # validation errors: where and what
            return "; ".join(_problem(problem) for problem in self.detail)
        return str(self.detail)

    @classmethod
    def of(cls, response: httpx.Response, **extra: Any) -> Refused:
        try:
            detail = response.json()["detail"]
        except (ValueError, KeyError, TypeError):
            detail = response.reason_phrase or "error"
        return cls(response.status_code, detail, response, **extra)


def _problem(problem: Any) -> str:
    if isinstance(problem, dict) and "msg" in problem:
        where = ".".join(map(str, problem.get("loc", [])[1:]))
        return f"{where}: {problem['msg']}" if where else str(problem["msg"])
    return str(problem)


class RetriesExhausted(Refused):
    """A 503 (busy) or 429 (rate limit) answer that the client stopped retrying: its
    Retry-After was longer than `max_retry_wait`, or waiting it would have gone past
    `max_retry_seconds`. `attempts` is how many times the request was sent."""

    def __init__(self, status: int, detail: Any, response: httpx.Response | None = None,
                 attempts: int = 1):
        self.attempts = attempts
        super().__init__(status, detail, response)


class Unreachable(ClientError):
    """No answer from the server (after the retries that were safe to make); the network
    error is the __cause__."""


class JobFailed(ClientError):
    """The job ended without succeeding: `job` is it, as it ended (`job.error` says why a
    failed job failed). Raised by put() and wait(), and by download() of such a job."""

    def __init__(self, job: Job):
        self.job = job
        reason = f": {job.error}" if job.error else ""
        super().__init__(f"job {job.id} {job.status}{reason}")


class JobCancelled(JobFailed):
    """The job ended cancelled (a DELETE, a /put timeout, a shutdown), not failed."""
