"""`GET /jobs/{id}/files/{name}`: the output files a job wrote into `out/<id>/`."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from PIL import Image

from .. import storage
from ..jobs import JobStatus
from ..schemas import error_responses
from .jobs import Found, find_job

router = APIRouter(tags=["jobs"])

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
# Thumbnails are kept beside the job's outputs, made once per width.
THUMBNAIL_DIR = "thumbnails"
# Decoding a 600 dpi page takes about 100 MB: only this many at once, however many are asked.
_decoding = threading.BoundedSemaphore(2)
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
                   found: Found = Depends(find_job),  # 404 for another API key's job
                   w: int | None = Query(None, ge=16, le=2048,
                                         description="Thumbnail width in pixels")) -> Response:
    record = found.record
    if record.status != JobStatus.SUCCEEDED.value or record.result is None:
        # A running job's pages are still being written: none is served half done.
        raise HTTPException(409, f"Job {job_id} is {record.status}; its files are ready once "
                                 "it has succeeded.")
    path = storage.output_file(request.app.state.settings.out_dir, job_id, name)
    if path is None or name not in record.result["files"]:
        raise HTTPException(404, f"Job {job_id!r} has no output file {name!r}.")
    if w is None:
        return FileResponse(path, headers=CACHE)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise HTTPException(422, f"{name!r} is not an image; ?w= makes thumbnails of "
                                 "PNG and JPEG files only.")
    try:
        jpeg = await run_in_threadpool(thumbnail, path, w)
    except Image.DecompressionBombError:
        raise HTTPException(422, f"{name!r} is too large to make a thumbnail of; "
                                 "download it without ?w=.") from None
    except OSError:  # deleted meanwhile, or not readable as an image
        raise HTTPException(404, f"Job {job_id!r} has no readable image {name!r}.") from None
    return Response(jpeg, media_type="image/jpeg", headers=CACHE)


def thumbnail(path: Path, width: int) -> bytes:
    """A JPEG at most `width` pixels wide (never enlarged), keeping the aspect ratio; cached
    in the job's `thumbnails/` folder."""
    cached = path.parent / THUMBNAIL_DIR / f"{width}-{path.stem}.jpg"
    if cached.is_file():
        return cached.read_bytes()
    with _decoding, Image.open(path) as image:
        image.thumbnail((width, width * 20))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=80)
    jpeg = buffer.getvalue()
    try:
        cached.parent.mkdir(exist_ok=True)
        partial = cached.with_suffix(f".{threading.get_ident()}.tmp")
        partial.write_bytes(jpeg)
        os.replace(partial, cached)  # whole or not at all, for a request reading it meanwhile
    except OSError:  # the job was deleted meanwhile, or the disk is full: serve it uncached
        pass
    return jpeg
