"""`GET /jobs/{id}/files/{name}`: the output files a job wrote into `out/<id>/`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from .. import jobfiles, processes
from .. import thumbnail as thumbnail_program
from ..jobs import JobStatus
from ..records import JobRecord
from ..schemas import error_responses
from ..settings import Settings
from .jobs import find_job

router = APIRouter(tags=["jobs"])

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
# Thumbnails are kept beside the job's outputs, made once per width.
THUMBNAIL_DIR = "thumbnails"
# Decoding a page can take hundreds of MB (in a child): only this many at once.
_decoding = threading.BoundedSemaphore(2)
THUMBNAIL_PROGRAM = Path(thumbnail_program.__file__)
THUMBNAIL_SECONDS = 30
# Output files never change once written.
CACHE = {"Cache-Control": "private, max-age=3600"}


@router.get(
    "/jobs/{job_id}/files/{name}",
    name="job_file",
    summary="Download one output file of a job",
    description="For example `page-001.png` of a pdf2image job or `video.mp4` of a video job. "
                "`?w=` turns an image into a JPEG thumbnail at most that many pixels wide.",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "video/mp4": {}}},
               **error_responses(404, 409, 422)},
)
async def job_file(job_id: str, name: str, request: Request,
                   record: JobRecord = Depends(find_job),  # 404 for another API key's job
                   w: int | None = Query(None, ge=16, le=2048,
                                         description="Thumbnail width in pixels")) -> Response:
    if record.status != JobStatus.SUCCEEDED.value or record.result is None:
        # A running job's pages are still being written: none is served half done.
        raise HTTPException(409, f"Job {job_id} is {record.status}; its files are ready once "
                                 "it has succeeded.")
    path = jobfiles.output_file(request.app.state.settings.out_dir, job_id, name)
    if path is None or name not in record.result["files"]:
        raise HTTPException(404, f"Job {job_id!r} has no output file {name!r}.")
    if w is None:
        return FileResponse(path, headers=CACHE)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise HTTPException(422, f"{name!r} is not an image; ?w= makes thumbnails of "
                                 "PNG and JPEG files only.")
    try:
        jpeg = await run_in_threadpool(thumbnail, path, w, request.app.state.settings)
    except (processes.OutputTooLarge, subprocess.TimeoutExpired, ThumbnailFailed):
        raise HTTPException(422, f"No thumbnail can be made of {name!r}; download it without "
                                 "?w=.") from None
    except OSError:  # deleted meanwhile
        raise HTTPException(404, f"Job {job_id!r} has no readable image {name!r}.") from None
    return Response(jpeg, media_type="image/jpeg", headers=CACHE)


class ThumbnailFailed(Exception):
    pass


def thumbnail(path: Path, width: int, settings: Settings) -> bytes:
    """A JPEG at most `width` pixels wide, made by the thumbnail program in a child process
    under the render memory cap (a page can be 100 megapixels: never decoded in the server);
    cached in the job's `thumbnails/` folder."""
    cached = path.parent / THUMBNAIL_DIR / f"{width}-{path.stem}.jpg"
    if cached.is_file():
        return cached.read_bytes()
    cached.parent.mkdir(exist_ok=True)
    partial = cached.with_suffix(f".{threading.get_ident()}.tmp")
    try:
        with _decoding:
            done = processes.output(
                [sys.executable, "-I", str(THUMBNAIL_PROGRAM), str(path), str(partial),
                 str(width)], THUMBNAIL_SECONDS, settings.render_max_mb)
        if done.returncode != 0:
            raise ThumbnailFailed(done.stderr.decode(errors="replace")[-300:])
        jpeg = partial.read_bytes()
        os.replace(partial, cached)  # whole or not at all, for a request reading it meanwhile
        return jpeg
    finally:
        partial.unlink(missing_ok=True)
