"""JSON shapes of the API, with camelCase field names on the wire."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class CamelModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class JobResult(CamelModel):
    worker_name: str = Field(examples=["message-worker-1"])
    dequeue_elapsed_ms: float = Field(description="Time the job waited in its queue.")
    process_elapsed_ms: float = Field(description="Time the worker spent on the job.")
    total_elapsed_ms: float = Field(description="From accepted to finished.")
    data: dict[str, Any] = Field(description="Kind-specific summary.",
                                 examples=[{"message": "hello xdata team", "length": 16,
                                            "seconds": 3}])
    files: list[str] = Field(description="Link to each output file: a path on this server, "
                             "or absolute from JOBQUEUE_PUBLIC_URL.")


class PutData(CamelModel):
    id: str = Field(examples=["0b8f5f6e-3f0a-4c1e-9a57-1f2d3c4b5a69"])
    result: JobResult


class PutResponse(CamelModel):
    data: PutData


class Links(CamelModel):
    self_: str = Field(alias="self", examples=["/jobs/0b8f5f6e-3f0a-4c1e-9a57-1f2d3c4b5a69"])
    events: str
    result: str
    cancel: str


class Accepted(CamelModel):
    id: str
    job_type: str = Field(examples=["pdf2image"])
    status: str = Field(examples=["queued"])
    links: Links


class ProgressView(CamelModel):
    # int first: counts (pages) stay whole numbers on the wire, seconds stay fractions.
    done: int | float = Field(examples=[2])
    total: int | float = Field(examples=[4])
    unit: str = Field(examples=["pages"])


class ResultSummary(CamelModel):
    files: list[str] = Field(description="Link to each output file: a path on this server, "
                             "or absolute from JOBQUEUE_PUBLIC_URL.")


class ResultView(ResultSummary):
    data: dict[str, Any]


class EarlierError(CamelModel):
    attempt: int = Field(examples=[1])
    error: str = Field(examples=["Job 0b8f…: the upstream service answered 503"])
    finished_at: str = Field(examples=["2026-11-23T10:15:02.5+00:00"])


class JobSummary(CamelModel):
    """A job as lists and the event feed show it: its result without its data."""

    id: str
    job_type: str
    status: str = Field(description="queued, running, succeeded, failed or cancelled")
    attempt: int = Field(examples=[1], description="Runs started: 0 while it waits for its "
                         "first, 1 once it has started; a run again after a crash, a restart "
                         "or a stopped worker counts one more")
    max_attempts: int = Field(1, examples=[3], description="Runs it may get: 1 + its kind's "
                              "retries (JOBQUEUE_<NAME>_RETRIES)")
    priority: int = Field(0, examples=[0], description="-10…10: higher runs first, within its "
                          "kind")
    progress: ProgressView
    queue_position: int | None = Field(None, description="1 = next to start; only while queued")
    estimated_start_seconds: float | None = Field(
        None, examples=[12.5], description="Only while queued, once its kind has 20 finished "
        "jobs: about when it starts (the jobs ahead × their recent median run time ÷ the live "
        "workers; 0 while a worker is free)")
    next_attempt_at: str | None = Field(None, description="Only while it waits for its next "
                                        "attempt after a failure (its kind retries)")
    earlier_errors: list[EarlierError] | None = Field(
        None, description="The failed attempts before this one, oldest first; omitted when "
        "there were none")
    created_at: str = Field(examples=["2026-11-23T10:15:00.123456+00:00"])
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = Field(None, description="Only when failed")
    result: ResultSummary | None = Field(None, description="Only when succeeded: the file "
                                         "URLs; GET /jobs/{id} has the data too")


class CallbackView(CamelModel):
    status: Literal["pending", "delivered", "failed"] = Field(
        examples=["delivered"], description="pending: to be sent once the job ends, or being "
        "retried; delivered: a 2xx answer; failed: no 2xx answer within "
        "JOBQUEUE_WEBHOOK_RETRY_HOURS of the job's end")
    attempts: int = Field(examples=[1], description="Attempts made for the job's last end")
    last_error: str | None = Field(None, examples=["HTTP 500"],
                                   description="Why the last attempt failed, if it did")


class JobView(JobSummary):
    result: ResultView | None = Field(None, description="Only when succeeded")
    callback: CallbackView | None = Field(
        None, description="Only for a job with a callbackUrl (or its API key's "
        "JOBQUEUE_WEBHOOK_URLS): the delivery of its status document when it ends")


class JobList(CamelModel):
    items: list[JobSummary]
    next: str | None = Field(None, description="Link to the next page (a path, or absolute "
                             "from JOBQUEUE_PUBLIC_URL); null on the last page")


KindState = Literal["ready", "loading", "failed"]


class QueueStats(CamelModel):
    workers: int
    busy: int
    queued: int
    capacity: int
    state: KindState = Field("ready", description="The kind's resource (its `setup`): ready; "
                             "loading (its jobs wait in the queue meanwhile); failed (new jobs "
                             "get 503 while its setup is tried again). Distributed mode: ready "
                             "if any live worker has it ready, else loading if any loads it")
    error: str | None = Field(None, examples=["OSError: model.bin not found"],
                              description="Only when failed: the setup's error, type and message")


class KindStatus(CamelModel):
    state: KindState
    error: str | None = Field(None, description="Only when failed")


class WorkerProcess(CamelModel):
    name: str = Field(examples=["node-2-4711"], description="host-pid")
    kinds: dict[str, int] = Field(examples=[{"pdf2image": 2, "video": 1}],
                                  description="Jobs of each kind it runs at once")
    last_seen: float = Field(description="Seconds since its last heartbeat")
    metrics: str | None = Field(None, examples=["http://127.0.0.1:40113/metrics"],
                                description="Where Prometheus scrapes its own metrics "
                                            "(JOBQUEUE_WORKER_METRICS_PORT)")
    states: dict[str, KindStatus] = Field(
        default_factory=dict, examples=[{"pdf2image": {"state": "ready"},
                                         "video": {"state": "loading"}}],
        description="Its resource of each kind it runs (the kind's `setup` in this process)")


class Health(CamelModel):
    status: str = Field(examples=["ok"], description="ok; degraded (still HTTP 200) while a "
                        "kind's setup has failed (its `state` says failed, the other kinds "
                        "work); draining (HTTP 503) while the server shuts down; unavailable "
                        "(HTTP 503) while a dependency is down")
    dependencies: dict[str, str] | None = Field(None, description="Only when unavailable: "
                                                "what is down, and why")
    queues: dict[str, QueueStats] = Field(examples=[{
        "message": {"workers": 1, "busy": 1, "queued": 3, "capacity": 10, "state": "ready"},
        "pdf2image": {"workers": 2, "busy": 0, "queued": 0, "capacity": 20, "state": "ready"},
        "video": {"workers": 1, "busy": 0, "queued": 0, "capacity": 10, "state": "ready"},
    }])
    worker_processes: list[WorkerProcess] | None = Field(
        None, description="Distributed mode only: the worker processes whose heartbeat is "
                          "fresh. `workers` above counts their job slots")


class AccessToken(CamelModel):
    token: str = Field(description="Empty when the server has no API keys")
    expires_in: int = Field(description="Seconds the token is valid", examples=[43200])


class ErrorResponse(BaseModel):
    detail: Any = Field(examples=["The message queue is full (10 jobs waiting); retry in 3 s."])


ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorResponse"}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error status codes a route can answer."""
    meaning = {
        400: "The multipart body is malformed or cut off.",
        401: "No valid X-API-Key (only when the server has JOBQUEUE_API_KEYS).",
        404: "Unknown job or file.",
        408: "The body came in slower than JOBQUEUE_MIN_UPLOAD_KBPS.",
        409: "The job has not succeeded (yet); for a retry: it has not failed.",
        410: "The job's upload is gone, so it cannot run again.",
        413: "The upload is too large, or the input is over a JOBQUEUE_*_MAX_* limit.",
        415: "The body is neither JSON nor multipart/form-data, or the upload is not the kind "
             "of file the job takes.",
        422: "Bad options, unknown jobType, or input the job kind cannot process.",
        429: "Rate limit exceeded, or JOBQUEUE_MAX_QUEUED_PER_KEY of your jobs wait already; "
             "see Retry-After.",
        500: "The job failed unexpectedly; the detail names the job id.",
        503: "The kind's queue is full or its setup failed, a /put job would start only after "
             "its timeout, too many uploads or streams are open, or the server is shutting "
             "down; see Retry-After.",
        504: "The job did not finish within its kind's timeout and was cancelled.",
        507: "The server's disk is full.",
    }
    # The JSON content type is named: routes that stream (event-stream, mjpeg) answer errors as
    # JSON too, not in their own media type.
    return {code: {"model": ErrorResponse, "description": meaning[code],
                   "content": {"application/json": {"schema": ERROR_SCHEMA}}} for code in codes}


class MinuteView(CamelModel):
    minute: int = Field(description="The minute's start, in epoch seconds", examples=[1795500780])
    finished: int = Field(description="Jobs that ran to an end (succeeded or failed)",
                          examples=[12])
    p50_seconds: float = Field(description="Median run time", examples=[0.8])
    p95_seconds: float = Field(description="95th percentile run time (nearest rank)",
                               examples=[2.1])


class Throughput(CamelModel):
    since: float = Field(description="Start of the window, in epoch seconds")
    minutes: int = Field(examples=[60])
    kinds: dict[str, list[MinuteView]] = Field(
        description="Per job kind, the minutes in which some of its jobs finished, oldest first")


CALLBACK_URL = {
    "type": "string", "maxLength": 2000, "examples": ["https://example.com/hooks/jobqueue"],
    "description": "POST /jobs, or /put with Prefer: respond-async: where the job's status "
                   "document is POSTed when it ends (Standard Webhooks, signed with "
                   "JOBQUEUE_WEBHOOK_SECRET). http(s) to a public address only (422 "
                   "otherwise); empty: none, not even the API key's JOBQUEUE_WEBHOOK_URLS"}

# The request body of /put and POST /jobs as OpenAPI shows it (the kinds served fill in
# jobType's values: routes/put.describe_kinds).
REQUEST_EXAMPLES = {
    "application/json": {
        "schema": {
            "type": "object",
            "properties": {
                "jobType": {"type": "string", "default": "message"},
                "data": {"type": "string"},
                "seconds": {"type": "number", "default": 3},
                "dpi": {"type": "integer", "default": 200},
                "width": {"type": "integer"},
                "height": {"type": "integer"},
                "callbackUrl": CALLBACK_URL,
            },
        },
        "examples": {
            "message": {"value": {"data": "hello xdata team"}},
            "pdf2image": {"summary": "Convert the bundled sample PDF",
                          "value": {"data": "sample", "jobType": "pdf2image", "dpi": 100}},
            "video": {"summary": "Resize the bundled sample video",
                      "value": {"jobType": "video", "width": 320}},
        },
    },
    "multipart/form-data": {
        "schema": {
            "type": "object",
            "properties": {
                "file": {"type": "string", "format": "binary"},
                "jobType": {"type": "string"},
                "dpi": {"type": "integer"},
                "width": {"type": "integer"},
                "height": {"type": "integer"},
                "callbackUrl": CALLBACK_URL,
            },
            "required": ["file", "jobType"],
        },
    },
}
