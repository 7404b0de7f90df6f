"""Turning a request into a job: read JSON or multipart, pick the kind, validate its options."""

from __future__ import annotations

import json
from dataclasses import dataclass

from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile

from . import storage
from .engine import Engine
from .jobs import Job, JobKind
from .kinds import KINDS

DEFAULT_JOB_TYPE = "message"
MAX_FORM_FIELDS = 20
UNSUPPORTED = ("send application/json, or multipart/form-data with a `file` field "
               "and the options as text fields.")


@dataclass
class Submission:
    kind: JobKind
    options: BaseModel
    upload: UploadFile | None
    form: FormData | None = None  # closed by start_job, which removes its temporary files


async def read_submission(request: Request) -> Submission:
    """Parse `{"jobType": ..., <options>}` from a JSON body or from multipart form fields."""
    content_type = request.headers.get("content-type", "").lower()
    form = None
    upload = None
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS)
        fields = read_form(form)
        upload = form.get("file")
    else:
        fields = await read_json(request, content_type)

    kind_name = fields.pop("jobType", DEFAULT_JOB_TYPE)
    kind = KINDS.get(kind_name) if isinstance(kind_name, str) else None
    try:
        if kind is None:
            raise HTTPException(422, f"Unknown jobType {kind_name!r}; valid job types: "
                                     f"{', '.join(KINDS)}.")
        if upload is not None and kind.sample is None:
            raise HTTPException(422, f"{kind.name} jobs take no file; send only the options.")
        try:
            options = kind.options.model_validate(fields)
        except ValidationError as error:
            raise RequestValidationError(
                [{**e, "loc": ("body", *e["loc"])}
                 for e in error.errors(include_url=False, include_context=False)]
            ) from None
    except BaseException:
        if form is not None:
            await form.close()
        raise
    return Submission(kind, options, upload, form)


def read_form(form: FormData) -> dict[str, str]:
    fields: dict[str, str] = {}
    for key, value in form.multi_items():
        if key in fields:
            raise HTTPException(422, f"The form field {key!r} is given twice; send it once.")
        if key == "file":
            if not isinstance(value, UploadFile):
                raise HTTPException(422, "The `file` field must be a file upload, not text.")
            continue
        if not isinstance(value, str):
            raise HTTPException(422, f"The form field {key!r} must be text; only `file` "
                                     "may be a file.")
        fields[key] = value
    return fields


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


async def read_json(request: Request, content_type: str) -> dict:
    body = await request.body()
    try:
        fields = json.loads(body, parse_constant=_reject_constant) if body.strip() else {}
    except (ValueError, RecursionError) as error:
        if content_type and not content_type.startswith("application/json"):
            raise HTTPException(415, f"Unsupported Content-Type {content_type!r}: "
                                     + UNSUPPORTED) from None
        raise HTTPException(422, f"The body is not valid JSON ({str(error)[:200]}).") from None
    if not isinstance(fields, dict):
        raise HTTPException(422, 'The JSON body must be an object, such as {"data": "hello"}.')
    return fields


async def start_job(engine: Engine, submission: Submission) -> Job:
    """Create the job, store its upload in `out/<id>/input/`, and queue it (QueueFull: 503)."""
    job = engine.new_job(submission.kind, submission.options)
    upload = submission.upload
    try:
        if upload is not None:
            job.input_path = await run_in_threadpool(
                storage.save_upload, upload.file, job.out_dir / storage.INPUT_DIR,
                upload.filename or "upload",
            )
    except BaseException:
        storage.remove_job_dir(engine.out_dir, job.id)
        raise
    finally:
        if submission.form is not None:
            await submission.form.close()
    engine.submit(job)
    return job
