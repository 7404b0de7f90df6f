"""Turning a request into a job: read JSON or multipart, pick the kind, validate its options."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from jobqueue import tracing, webhooks
from jobqueue.api import uploads
from jobqueue.api.access import HEADER, owner
from jobqueue.api.shutdown import refuse_while_draining
from jobqueue.api.uploads import read_multipart
from jobqueue.engines import JobEngine, NewJob
from jobqueue.errors import (
    ANSWERED,
    BadInput,
    MalformedRequest,
    QueueFull,
    SetupFailed,
    TooLarge,
    Unavailable,
    UnsupportedInput,
)
from jobqueue.files import jobfiles
from jobqueue.jobs import JobKind
from jobqueue.records import JobRecord, Origin
from jobqueue.settings import MAX_PRIORITY, MIN_PRIORITY, Settings

log = logging.getLogger(__name__)

DEFAULT_JOB_TYPE = "message"
MAX_JSON_BYTES = 1024 * 1024


@dataclass
class Submission:
    job_id: str
    kind: JobKind
    options: BaseModel
    upload: Path | None  # already stored in out/<job_id>/input/
    priority: int = 0
    callback_url: str | None = None  # where its status document goes when it ends


async def read_submission(request: Request, settings: Settings,
                          idempotency_key: str | None = None,
                          callbacks: bool = True) -> Submission:
    """Parse `{"jobType": ..., <options>}` from a JSON body, or from multipart fields with the
    upload streamed into the new job's folder (removed again if anything is wrong).
    `idempotency_key`: the route's (POST /jobs): a full queue lets in a retry of its job.
    `callbacks`: whether the job may have a `callbackUrl` (a /put only with Prefer:
    respond-async)."""
    refuse_while_draining(request)
    kinds = request.app.state.kinds
    job_id = jobfiles.new_job_id()
    content_type = request.headers.get("content-type", "").lower()
    min_rate = settings.min_upload_kbps * 1024
    try:
        upload = None
        try:
            if content_type.startswith("multipart/form-data"):
                # 503 past JOBQUEUE_MAX_UPLOADS; the orphan sweep leaves this job's folder be.
                with request.app.state.uploads.slot(job_id):
                    fields, upload = await read_multipart(
                        request, jobfiles.job_dir(settings.out_dir, job_id) / jobfiles.INPUT_DIR,
                        int(settings.max_upload_mb * 2**20), min_rate, file_refused(kinds),
                        lambda fields: room_for_file(request, fields, idempotency_key))
            else:
                fields = await read_json(request, content_type, min_rate)
        except ANSWERED as refusal:
            # Refused before the body was all read: the connection cannot carry another
            # request, and a client still sending should stop (api/problems.py closes it).
            refusal.body_unread = True
            raise
        except ClientDisconnect:
            raise MalformedRequest("The client closed the connection before its request body "
                                   "was complete.") from None
        priority = parse_priority(fields, settings, request.headers.get(HEADER))
        callback_url = await parse_callback(fields, settings, request.headers.get(HEADER),
                                            callbacks)
        kind, options = parse_options(kinds, fields)
        if upload is not None and kind.sample is None:
            raise BadInput(f"{kind.name} jobs take no file; send only the options.")
    except BaseException:
        jobfiles.remove_job_dir(settings.out_dir, job_id)
        raise
    return Submission(job_id, kind, options, upload, priority, callback_url)


async def parse_callback(fields: dict, settings: Settings, api_key: str | None,
                         allowed: bool) -> str | None:
    """The `callbackUrl` field (webhooks.py), checked (no server-side request forgery:
    webhooks.checked_address); without one, the API key's JOBQUEUE_WEBHOOK_URLS default; an
    empty one: none. A /put that waits for its answer (no Prefer: respond-async) takes none."""
    given = "callbackUrl" in fields
    url = fields.pop("callbackUrl", None)
    if isinstance(url, str):
        url = url.strip()
    elif url is not None:  # a JSON number, boolean, list: no URL, and no opt-out either
        raise BadInput('callbackUrl must be a string: an http:// or https:// URL, or "" for '
                       "none.")
    if given and url == "":
        return None  # "": no callback, not even the key's default
    if url is None:
        if not allowed or given:
            return None
        return settings.webhook_url_for(api_key if settings.api_key_list else None)
    if not allowed:
        raise BadInput("callbackUrl is for jobs that are not waited for: POST /jobs, or /put "
                       "with Prefer: respond-async.")
    if not settings.webhook_secret.get_secret_value():
        raise BadInput("callbackUrl needs the server to sign its deliveries, and "
                       "JOBQUEUE_WEBHOOK_SECRET is not set.")
    await webhooks.checked_address(url, settings.webhook_allow_host_list)  # BadInput: 422
    return url


def parse_priority(fields: dict, settings: Settings, api_key: str | None) -> int:
    """The `priority` field (JSON or a form field): a whole number from MIN_PRIORITY to
    MAX_PRIORITY, at most what JOBQUEUE_MAX_PRIORITY_PER_KEY lets the caller's key ask for."""
    value = fields.pop("priority", 0)
    if isinstance(value, str):  # a form field
        value = value.strip()
        value = int(value) if re.fullmatch(r"[+-]?[0-9]{1,2}", value) else value
    if isinstance(value, bool) or not isinstance(value, int) \
            or not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise BadInput(f"priority must be a whole number from {MIN_PRIORITY} to {MAX_PRIORITY} "
                       f"(higher runs first; default 0), not {str(value)[:40]!r}.")
    cap = settings.priority_cap(api_key if settings.api_key_list else None)
    if value > cap:
        raise BadInput(f"priority {value} is more than this API key may ask for ({cap}, "
                       "JOBQUEUE_MAX_PRIORITY_PER_KEY).")
    return value


def file_refused(kinds: dict[str, JobKind]) -> Callable[[dict[str, str]], str | None]:
    """Why a file part is not wanted, given the fields before it: a `jobType` named first
    whose kind takes no file (a file before any jobType is judged once the form is read)."""
    def refused(fields: dict[str, str]) -> str | None:
        kind = kinds.get(fields.get("jobType", ""))
        if kind is not None and kind.sample is None:
            return f"{kind.name} jobs take no file; send only the options."
        return None
    return refused


async def room_for_file(request: Request, fields: dict[str, str],
                        idempotency_key: str | None) -> Exception | None:
    """QueueFull (503) when the queue of the kind named before the file is full already, or
    SetupFailed when the kind's setup failed: the client hears it before sending the file, not
    after (only a look; the submit decides). A retry with the Idempotency-Key of a job already
    accepted is let in: it gets that job back."""
    kind = request.app.state.kinds.get(fields.get("jobType", ""))
    if kind is None:
        return None
    try:
        await request.app.state.engine.check_room(kind.name, owner(request), idempotency_key)
    except (QueueFull, SetupFailed) as full:  # counted where it is answered (api/problems.py)
        return full
    except Unavailable as error:  # the database is down: the submit could not take it either
        return error
    except Exception as error:  # the look is a courtesy: the submit decides
        log.warning("could not look at the %s queue before an upload: %s", kind.name, error)
    return None


def parse_options(kinds: dict[str, JobKind], fields: dict) -> tuple[JobKind, BaseModel]:
    kind_name = fields.pop("jobType", DEFAULT_JOB_TYPE)
    kind = kinds.get(kind_name) if isinstance(kind_name, str) else None
    if kind is None:
        raise BadInput(f"Unknown jobType {kind_name!r}; valid job types: {', '.join(kinds)}.")
    try:
        return kind, kind.options.model_validate(fields)
    except ValidationError as error:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])}
             for e in error.errors(include_url=False, include_context=False)]
        ) from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large a number")
    return value


# Made once: json.loads with these arguments makes a decoder on every call (as json.loads
# does, the body's encoding is detected and a lone surrogate let through, then refused).
DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite)


def json_too_large() -> TooLarge:
    return TooLarge(f"The JSON body is larger than {MAX_JSON_BYTES // 1024} KB; send files as "
                    "multipart/form-data.")


async def read_json(request: Request, content_type: str, min_bytes_per_second: float) -> dict:
    if (uploads.declared_length(request) or 0) > MAX_JSON_BYTES:
        raise json_too_large()  # before a byte is read (or an Expect: 100-continue answered)
    body = bytearray()
    try:
        async for chunk in uploads.body(request, min_bytes_per_second):
            body += chunk
            if len(body) > MAX_JSON_BYTES:
                break  # the rest is read and dropped as the connection closes (api/connections.py)
    except uploads.TooSlow:
        raise uploads.too_slow(min_bytes_per_second) from None
    if len(body) > MAX_JSON_BYTES:
        raise json_too_large()
    try:
        text = body.decode(json.detect_encoding(body), "surrogatepass")
        fields = DECODER.decode(text) if body.strip() else {}
    except (ValueError, RecursionError) as error:
        if content_type and not content_type.startswith("application/json"):
            raise UnsupportedInput(f"Unsupported Content-Type {content_type!r}: send "
                                   "application/json, or multipart/form-data with a `file` "
                                   "field and the options as text fields.") from None
        raise BadInput(f"The body is not valid JSON ({str(error)[:200]}).") from None
    if not isinstance(fields, dict):
        raise BadInput('The JSON body must be an object, such as {"data": "hello"}.')
    try:
        # Looked for in the text (a UTF-16 body's bytes never show a "\\u"): only an escape,
        # or a character beyond ASCII, can be one.
        if "\\u" in text or not text.isascii():
            json.dumps(fields, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # "\ud800": JSON allows it, nothing downstream can store it
        raise BadInput("The JSON body has text that is not valid Unicode (a lone surrogate "
                       "escape such as \\ud800).") from None
    return fields


async def start_job(engine: JobEngine, submission: Submission, origin: Origin,
                    check_input: bool = False, owner: str = "",
                    idempotency_key: str | None = None, fair_key: str = "",
                    respond_async: bool = False) -> JobRecord:
    """Queue the job: its record as accepted (QueueFull: 503). With `check_input`, an upload
    of the wrong type is UnsupportedInput (415) and one over the server's limits TooLarge
    (413), before it is queued.
    A POST /jobs job is on disk before this returns; a /put job need not be, its client waits."""
    kind = submission.kind
    try:
        if check_input and submission.upload and kind.check_input:
            try:
                await run_in_threadpool(kind.check_input, submission.upload,
                                        submission.options, engine.settings)
            except FileNotFoundError:
                raise MalformedRequest("The upload was removed before it could be checked "
                                       "(the server may be shutting down); send it "
                                       "again.") from None
    except BaseException:
        jobfiles.remove_job_dir(engine.settings.out_dir, submission.job_id)
        raise
    # From here the engine looks after the job's folder, whatever happens.
    return await engine.submit(NewJob(id=submission.job_id, kind=kind,
                                      options=submission.options, input_path=submission.upload,
                                      origin=origin, owner=owner,
                                      idempotency_key=idempotency_key,
                                      priority=submission.priority,
                                      fair_key=fair_key or owner,
                                      respond_async=respond_async,
                                      traceparent=tracing.traceparent(),
                                      callback_url=submission.callback_url),
                               durable=origin is Origin.JOBS)
