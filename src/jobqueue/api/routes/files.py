"""`GET /jobs/{id}/files/{name}`: the output files of a job, from `out/<id>/` or the object
store (files/store.py), and thumbnails of its images."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, RedirectResponse

from jobqueue import processes
from jobqueue.api.downloads import CACHE, file_response
from jobqueue.api.routes.jobs import find_job
from jobqueue.api.schemas import error_responses
from jobqueue.children import thumbnail as thumbnail_program
from jobqueue.errors import BadInput, Conflict, NotFound, Unavailable
from jobqueue.files.store import FileStore
from jobqueue.jobs import JobStatus
from jobqueue.records import JobRecord
from jobqueue.settings import Settings

log = logging.getLogger(__name__)
router = APIRouter(tags=["jobs"])

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
# The widths thumbnails are made at: `?w=` is rounded up to the next of them, so a job keeps
# at most this many thumbnails of a page, whatever widths are asked for (each distinct width
# kept one more JPEG: 400 GETs took a job's folder from 0.3 to 89 MB).
THUMBNAIL_WIDTHS = (16, 32, 64, 128, 256, 512, 1024, 2048)
# Decoding a page can take hundreds of MB (in a child): only this many at once.
_decoding = threading.BoundedSemaphore(2)
THUMBNAIL_PROGRAM = Path(thumbnail_program.__file__)
THUMBNAIL_SECONDS = 30


@router.get(
    "/jobs/{job_id}/files/{name}",
    name="job_file",
    summary="Download one output file of a job",
    description="For example `page-001.png` of a pdf2image job or `video.mp4` of a video job. "
                "`?w=` turns an image into a JPEG thumbnail: `w` is rounded up to the next of "
                f"{', '.join(map(str, THUMBNAIL_WIDTHS))}, and the JPEG is that wide (or as "
                "wide as the image, if it is narrower: never enlarged). "
                "With object storage, `?redirect=1` answers 307 to a presigned URL of the file "
                "(valid an hour); on a local disk it is ignored.",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "video/mp4": {}}},
               307: {"description": "?redirect=1 with object storage: the file's presigned URL"},
               **error_responses(404, 409, 422, 503)},
)
async def job_file(job_id: str, name: str, request: Request,
                   record: JobRecord = Depends(find_job),  # 404 for another API key's job
                   w: int | None = Query(None, ge=THUMBNAIL_WIDTHS[0],
                                         le=THUMBNAIL_WIDTHS[-1],
                                         description="Thumbnail width in pixels, rounded up "
                                                     "to the next of "
                                                     f"{', '.join(map(str, THUMBNAIL_WIDTHS))}"),
                   redirect: bool = Query(False, description="With object storage: answer "
                                          "307 to a presigned URL of the file instead")
                   ) -> Response:
    if record.status != JobStatus.SUCCEEDED.value or record.result is None:
        # A running job's pages are still being written: none is served half done.
        raise Conflict(f"Job {job_id} is {record.status}; its files are ready once it has "
                       "succeeded.")
    files: FileStore = request.app.state.engine.files
    if name not in record.result["files"]:  # a file gone since is a 404 of the reads below
        raise NotFound(f"Job {job_id!r} has no output file {name!r}.")
    if w is None:
        # None on a local disk. Signing may fetch credentials (an instance role): a thread.
        link = await run_in_threadpool(files.link, record, name) if redirect else None
        if link:
            return RedirectResponse(link, status_code=307, headers={"Cache-Control": "no-store"})
        return file_response(await run_in_threadpool(files.download, record, name))
    if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
        raise BadInput(f"{name!r} is not an image; ?w= makes thumbnails of PNG and JPEG files "
                       "only.")
    try:
        jpeg = await run_in_threadpool(thumbnail, files, record, name, snapped_width(w),
                                       request.app.state.settings)
    except (processes.OutputTooLarge, subprocess.TimeoutExpired, ThumbnailFailed):
        raise BadInput(f"No thumbnail can be made of {name!r}; download it without ?w=.") \
            from None
    except OSError:  # deleted meanwhile
        raise NotFound(f"Job {job_id!r} has no readable image {name!r}.") from None
    return Response(jpeg, media_type="image/jpeg", headers=CACHE)


class ThumbnailFailed(Exception):
    pass


def snapped_width(width: int) -> int:
    """The width a thumbnail asked `width` wide is made at: the next of THUMBNAIL_WIDTHS."""
    return next((size for size in THUMBNAIL_WIDTHS if size >= width), THUMBNAIL_WIDTHS[-1])


def thumbnail(files: FileStore, record: JobRecord, name: str, width: int,
              settings: Settings) -> bytes:
    """A JPEG at most `width` pixels wide, made once per width and kept by the store beside
    the job's files (beside the image on a local disk, under the job's `thumbnails/` in object
    storage, made from a scratch copy of the image)."""
    if (jpeg := files.kept_thumbnail(record, name, width)) is not None:
        return jpeg
    # A copy under the same semaphore as the decoding: N requests, not N copies at once.
    with _decoding, tempfile.TemporaryDirectory(prefix="jobqueue-thumbnail-") as scratch:
        source = files.local_copy(record, name, Path(scratch))
        jpeg = make_thumbnail(source, Path(scratch) / "thumbnail.jpg", width, settings,
                              decoding=False)
    try:
        files.keep_thumbnail(record, name, width, jpeg)
    except Unavailable as error:  # made, just not kept: the next request makes it again
        log.warning("job %s: thumbnail not kept: %s", record.id, error)
    return jpeg


def make_thumbnail(path: Path, cached: Path, width: int, settings: Settings,
                   decoding: bool = True) -> bytes:
    """The thumbnail program, in a child process under the render memory cap (a page can be
    100 megapixels: never decoded in the server); its JPEG is kept as `cached`. `decoding`:
    take a place under the decoding semaphore (False: the caller holds one)."""
    partial = cached.with_suffix(f".{threading.get_ident()}.tmp")
    try:
        with _decoding if decoding else contextlib.nullcontext():
            done = processes.output(
                [sys.executable, "-I", str(THUMBNAIL_PROGRAM), str(path), str(partial),
                 str(width)], THUMBNAIL_SECONDS, settings.render_max_mb)
        if done.returncode == thumbnail_program.GONE:
            raise FileNotFoundError(path)  # deleted meanwhile: 404
        if done.returncode != 0:
            raise ThumbnailFailed(done.stderr.decode(errors="replace")[-300:])
        jpeg = partial.read_bytes()
        os.replace(partial, cached)  # whole or not at all, for a request reading it meanwhile
        return jpeg
    finally:
        partial.unlink(missing_ok=True)
