"""Turning a request into a job: read JSON or multipart, pick the kind, validate its options."""

from __future__ import annotations

import json
from dataclasses import dataclass

from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from . import storage
from .engine import Engine
from .jobs import Job, JobKind
from .kinds import KINDS

DEFAULT_JOB_TYPE = "message"


@dataclass
class Submission:
    kind: JobKind
    options: BaseModel
    upload: UploadFile | None


async def read_submission(request: Request) -> Submission:
    """Parse `{"jobType": ..., <options>}` from a JSON body or from multipart form fields."""
    content_type = request.headers.get("content-type", "")
    upload = None
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
        upload = form.get("file")
        if upload is not None and not isinstance(upload, UploadFile):
            raise HTTPException(422, "The `file` field must be a file upload, not text.")
    else:
        body = await request.body()
        try:
            fields = json.loads(body) if body.strip() else {}
        except ValueError as error:
            if content_type and not content_type.startswith("application/json"):
                raise HTTPException(415, f"Unsupported Content-Type {content_type!r}: send "
                                         "application/json, or multipart/form-data with a "
                                         "`file` field.") from None
            raise HTTPException(422, f"The body is not valid JSON ({error}).") from None
        if not isinstance(fields, dict):
            raise HTTPException(422, 'The JSON body must be an object, such as {"data": "hello"}.')

    kind_name = fields.pop("jobType", DEFAULT_JOB_TYPE)
    kind = KINDS.get(kind_name) if isinstance(kind_name, str) else None
    if kind is None:
        raise HTTPException(422, f"Unknown jobType {kind_name!r}; valid job types: "
                                 f"{', '.join(KINDS)}.")
    if upload is not None and kind.sample is None:
        raise HTTPException(422, f"{kind.name} jobs take no file; send only form fields or JSON.")
    try:
        options = kind.options.model_validate(fields)
    except ValidationError as error:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])}
             for e in error.errors(include_url=False, include_context=False)]
        ) from None
    return Submission(kind, options, upload)


async def start_job(engine: Engine, submission: Submission) -> Job:
    """Create the job, store its upload in `out/<id>/input/`, and queue it (QueueFull: 503)."""
    engine.check_room(submission.kind.name)
    job = engine.new_job(submission.kind, submission.options)
    upload = submission.upload
    if upload is not None:
        try:
            job.input_path = await run_in_threadpool(
                storage.save_upload, upload.file, job.out_dir / storage.INPUT_DIR,
                upload.filename or "upload",
            )
        except BaseException:
            storage.remove_job_dir(engine.out_dir, job.id)
            raise
    engine.submit(job)
    return job
