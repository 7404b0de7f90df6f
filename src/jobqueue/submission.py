"""Turning a request into a job: read JSON or multipart, pick the kind, validate its options."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from starlette.requests import ClientDisconnect
from pydantic import BaseModel, ValidationError

from . import storage
from .engine import Engine
from .jobs import Job, JobKind, TooLarge, UnsupportedInput
from .kinds import KINDS
from .settings import Settings
from . import uploads
from .uploads import read_multipart

DEFAULT_JOB_TYPE = "message"
MAX_JSON_BYTES = 1024 * 1024


@dataclass
class Submission:
    job_id: str
    kind: JobKind
    options: BaseModel
    upload: Path | None  # already stored in out/<job_id>/input/


async def read_submission(request: Request, settings: Settings) -> Submission:
    """Parse `{"jobType": ..., <options>}` from a JSON body, or from multipart fields with the
    upload streamed into the new job's folder (removed again if anything is wrong)."""
    job_id = storage.new_job_id()
    content_type = request.headers.get("content-type", "").lower()
    min_rate = settings.min_upload_kbps * 1024
    try:
        upload = None
        try:
            if content_type.startswith("multipart/form-data"):
                # 503 past JOBQUEUE_MAX_UPLOADS; the orphan sweep leaves this job's folder be.
                with request.app.state.uploads.slot(job_id):
                    fields, upload = await read_multipart(
                        request, storage.job_dir(settings.out_dir, job_id) / storage.INPUT_DIR,
                        int(settings.max_upload_mb * 2**20), min_rate, file_refused)
            else:
                fields = await read_json(request, content_type, min_rate)
        except HTTPException as refusal:
            # Refused before the body was all read: the connection cannot carry another
            # request, and a client still sending should stop.
            refusal.headers = {**(refusal.headers or {}), "Connection": "close"}
            raise
        except ClientDisconnect:
            raise HTTPException(400, "The client closed the connection before its request "
                                     "body was complete.") from None
        kind, options = parse_options(fields)
        if upload is not None and kind.sample is None:
            raise HTTPException(422, f"{kind.name} jobs take no file; send only the options.")
    except BaseException:
        storage.remove_job_dir(settings.out_dir, job_id)
        raise
    return Submission(job_id, kind, options, upload)


def file_refused(fields: dict[str, str]) -> str | None:
    """Why a file part is not wanted, given the fields before it: a `jobType` named first
    whose kind takes no file (a file before any jobType is judged once the form is read)."""
    kind = KINDS.get(fields.get("jobType", ""))
    if kind is not None and kind.sample is None:
        return f"{kind.name} jobs take no file; send only the options."
    return None


def parse_options(fields: dict) -> tuple[JobKind, BaseModel]:
    kind_name = fields.pop("jobType", DEFAULT_JOB_TYPE)
    kind = KINDS.get(kind_name) if isinstance(kind_name, str) else None
    if kind is None:
        raise HTTPException(422, f"Unknown jobType {kind_name!r}; valid job types: "
                                 f"{', '.join(KINDS)}.")
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


async def read_json(request: Request, content_type: str, min_bytes_per_second: float) -> dict:
    body = bytearray()
    try:
        async for chunk in uploads.body(request, min_bytes_per_second):
            body += chunk
            if len(body) > MAX_JSON_BYTES:
                break  # no draining: a JSON client sends little, and gets its 413 at once
    except uploads.TooSlow:
        raise uploads.too_slow(min_bytes_per_second) from None
    if len(body) > MAX_JSON_BYTES:
        raise HTTPException(413, f"The JSON body is larger than {MAX_JSON_BYTES // 1024} KB;"
                                 " send files as multipart/form-data.")
    try:
        fields = (json.loads(body, parse_constant=_reject_constant, parse_float=_finite)
                  if body.strip() else {})
    except (ValueError, RecursionError) as error:
        if content_type and not content_type.startswith("application/json"):
            raise HTTPException(415, f"Unsupported Content-Type {content_type!r}: send "
                                     "application/json, or multipart/form-data with a `file` "
                                     "field and the options as text fields.") from None
        raise HTTPException(422, f"The body is not valid JSON ({str(error)[:200]}).") from None
    if not isinstance(fields, dict):
        raise HTTPException(422, 'The JSON body must be an object, such as {"data": "hello"}.')
    try:
        json.dumps(fields, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # "\ud800": JSON allows it, nothing downstream can store it
        raise HTTPException(422, "The JSON body has text that is not valid Unicode (a lone "
                                 "surrogate escape such as \\ud800).") from None
    return fields


async def start_job(engine: Engine, submission: Submission, origin: str,
                    check_input: bool = False, owner: str = "") -> Job:
    """Queue the job (QueueFull: 503). With `check_input`, an upload of the wrong type is 415
    and one over the server's limits 413.
    `origin` is "put" for a client that waits for the result, "jobs" for one that comes back."""
    kind = submission.kind
    try:
        if check_input and submission.upload and kind.check_input:
            try:
                await run_in_threadpool(kind.check_input, submission.upload,
                                        submission.options, engine.settings)
            except FileNotFoundError:
                raise HTTPException(400, "The upload was removed before it could be checked "
                                         "(the server may be shutting down); send it "
                                         "again.") from None
        job = engine.new_job(kind, submission.options, submission.job_id, submission.upload,
                             origin, owner)
        engine.submit(job)
    except (UnsupportedInput, TooLarge) as error:
        storage.remove_job_dir(engine.out_dir, submission.job_id)
        raise HTTPException(413 if isinstance(error, TooLarge) else 415, str(error)) from None
    except BaseException:
        storage.remove_job_dir(engine.out_dir, submission.job_id)
        raise
    if origin == "jobs":  # answered 202: accepted means on disk, to survive a restart
        try:
            await engine.store.written()
        except BaseException:  # a full disk (507), or a client gone before its 202
            # Not accepted after all. The job may have started: it ends as cancelled, and the
            # engine records that and removes its folder once it has stopped.
            engine.cancel(job, "its record could not be written")
            raise
    return job
