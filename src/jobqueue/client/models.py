"""What the server answers, as typed objects: a Job (GET /jobs/{id}, the 202 of POST /jobs,
an item of GET /jobs), its Progress and Result, and an Event of its event stream.

The wire's camelCase fields (docs/api.md, api/schemas.py on the server) are snake_case
attributes here; each object keeps the JSON it was made of as `raw`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued", "running", "succeeded", "failed", "cancelled")
FINISHED = frozenset({SUCCEEDED, FAILED, CANCELLED})


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


@dataclass(frozen=True)
class Progress:
    """`done` of `total` `unit`s (pages, seconds); 0 of 0 before the job reports any."""

    done: float = 0
    total: float = 0
    unit: str = ""

    @property
    def fraction(self) -> float | None:
        """done / total, or None while the total is not known."""
        return self.done / self.total if self.total else None

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Progress:
        data = data or {}
        return cls(data.get("done", 0), data.get("total", 0), data.get("unit", ""))


@dataclass(frozen=True)
class Result:
    """A succeeded job's result: the kind's summary `data` and the links to its `files`
    (paths on the server, or absolute URLs when it has JOBQUEUE_PUBLIC_URL).

    `data` is None in a job list's items (GET /jobs sends the files only). The timings and
    worker name come with `Client.put()` only."""

    job_id: str
    data: dict[str, Any] | None
    files: list[str]
    worker_name: str | None = None
    dequeue_elapsed_ms: float | None = None
    process_elapsed_ms: float | None = None
    total_elapsed_ms: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, job_id: str, data: dict[str, Any]) -> Result:
        return cls(job_id=job_id, data=data.get("data"), files=list(data.get("files") or []),
                   worker_name=data.get("workerName"),
                   dequeue_elapsed_ms=data.get("dequeueElapsedMs"),
                   process_elapsed_ms=data.get("processElapsedMs"),
                   total_elapsed_ms=data.get("totalElapsedMs"), raw=data)

    @classmethod
    def from_put(cls, answer: dict[str, Any]) -> Result:
        """POST /put's `{"data": {"id", "result": {...}}}`."""
        return cls.from_json(answer["data"]["id"], answer["data"]["result"])


@dataclass(frozen=True)
class Links:
    """The links of a submitted job (POST /jobs' 202): `url` is the job's own (the wire's
    `self`)."""

    url: str
    events: str
    result: str
    cancel: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Links:
        return cls(data["self"], data["events"], data["result"], data["cancel"])


@dataclass(frozen=True)
class EarlierError:
    """A failed attempt of a job that was retried (the wire's `earlierErrors` items): its
    number (from 1), its error and when it ended."""

    attempt: int
    error: str
    finished_at: datetime | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EarlierError:
        return cls(data.get("attempt", 0), data.get("error") or "",
                   _time(data.get("finishedAt")))


@dataclass(frozen=True)
class Callback:
    """The delivery of a job's completion webhook (the wire's `callback`): `status` pending,
    delivered or failed, the attempts made for its last end, and why the last one failed."""

    status: str
    attempts: int = 0
    last_error: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Callback:
        return cls(data.get("status") or "", data.get("attempts", 0), data.get("lastError"))


@dataclass(frozen=True)
class Job:
    """A job as the server last described it.

    `status` is one of queued, running, succeeded, failed, cancelled. `error` is set when it
    failed, `result` when it succeeded, `queue_position` while it is queued (1: next), `links`
    only on what `submit()` returns. `attempt` counts the runs started (0 while it waits for its
    first), `max_attempts` how many its kind's retries allow; a job waiting for its next
    attempt is queued with `next_attempt_at`, and `earlier_errors` are its failed attempts.
    `estimated_start_seconds` is the server's estimate while it is queued (None when there is
    none). `callback`: the delivery of its completion webhook, for a job with a callbackUrl.
    A field a server does not send keeps its default (`priority` 0)."""

    id: str
    job_type: str
    status: str
    attempt: int = 0
    progress: Progress = field(default_factory=Progress)
    queue_position: int | None = None
    priority: int = 0
    max_attempts: int | None = None
    next_attempt_at: datetime | None = None
    earlier_errors: tuple[EarlierError, ...] = ()
    estimated_start_seconds: float | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    result: Result | None = None
    links: Links | None = None
    callback: Callback | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def succeeded(self) -> bool:
        return self.status == SUCCEEDED

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        result = data.get("result")
        return cls(
            id=data["id"], job_type=data["jobType"], status=data["status"],
            attempt=data.get("attempt", 0), progress=Progress.from_json(data.get("progress")),
            queue_position=data.get("queuePosition"), priority=data.get("priority") or 0,
            max_attempts=data.get("maxAttempts"), next_attempt_at=_time(data.get("nextAttemptAt")),
            earlier_errors=tuple(EarlierError.from_json(item)
                                 for item in data.get("earlierErrors") or ()),
            estimated_start_seconds=data.get("estimatedStartSeconds"),
            created_at=_time(data.get("createdAt")),
            started_at=_time(data.get("startedAt")), finished_at=_time(data.get("finishedAt")),
            error=data.get("error"),
            result=Result.from_json(data["id"], result) if result is not None else None,
            links=Links.from_json(data["links"]) if data.get("links") else None,
            callback=Callback.from_json(data["callback"]) if data.get("callback") else None,
            raw=data)


@dataclass(frozen=True)
class Event:
    """One message of a job's event stream (GET /jobs/{id}/events): the job's state after a
    change. The first is its state when the stream opened, the last its final one."""

    job: Job

    @property
    def status(self) -> str:
        return self.job.status

    @property
    def progress(self) -> Progress:
        return self.job.progress

    @property
    def finished(self) -> bool:
        return self.job.finished


@dataclass(frozen=True)
class Retry:
    """What the `on_retry` hook is told before the client waits and sends a request again.

    `status` is the answer's (503, 429), or None when no answer came (`detail` then says what
    went wrong on the network). `retry_after` is the server's Retry-After in seconds, if it
    sent one; `wait` is what the client will wait. `attempt` counts from 1 (the one that was
    just refused)."""

    method: str
    url: str
    attempt: int
    status: int | None
    detail: str
    wait: float
    retry_after: float | None = None
    idempotency_key: str | None = None
