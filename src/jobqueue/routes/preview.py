"""`GET /jobs/{id}/preview.mjpg`: a video job's frames as a stream an <img> tag plays."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from .. import storage
from ..jobs import JobStatus
from ..kinds import video
from ..schemas import error_responses
from .jobs import Found, find_job

log = logging.getLogger("jobqueue.preview")
router = APIRouter(tags=["async jobs"])

CHUNK_BYTES = 64 * 1024


def preview_source(request: Request, found: Found) -> Path:
    """The output video once the job has succeeded, its input before that."""
    record = found.record
    if record.job_type != video.KIND.name:
        raise HTTPException(404, f"Job {record.id} is a {record.job_type} job; only "
                                 f"{video.KIND.name} jobs have a preview.")
    if record.status == JobStatus.SUCCEEDED.value and record.result:
        path = storage.output_file(request.app.state.settings.out_dir, record.id,
                                   record.result["files"][0])
    else:
        path = Path(record.input_path) if record.input_path else None
    if path is None or not path.is_file():
        raise HTTPException(404, f"Job {record.id} has no video left to preview.")
    return path


@router.get(
    "/jobs/{job_id}/preview.mjpg",
    summary="Watch a video job: JPEG frames as multipart/x-mixed-replace",
    description="Plays the output video once the job has succeeded, the input video before "
                "that, at the video's own frame rate, once. Use it as `<img src>`. `fps` and "
                "`width` cap the frame rate and the width. Each viewer gets its own ffmpeg, "
                "killed as soon as the viewer leaves; at most `JOBQUEUE_PREVIEW_STREAMS` run "
                "at once (503 beyond that).",
    response_class=StreamingResponse,
    responses={200: {"content": {"multipart/x-mixed-replace": {}}},
               **error_responses(404, 422, 503)},
)
async def preview(
    request: Request,
    found: Found = Depends(find_job),
    fps: float | None = Query(None, gt=0, le=60, description="Most frames per second"),
    width: int | None = Query(None, ge=16, le=3840, description="Most pixels wide"),
) -> StreamingResponse:
    source = preview_source(request, found)
    playing: set[asyncio.subprocess.Process] = request.app.state.previews
    limit = request.app.state.settings.preview_streams
    if len(playing) >= limit:
        raise HTTPException(503, f"{len(playing)} previews are playing, the most "
                                 "JOBQUEUE_PREVIEW_STREAMS allows; retry in a few seconds.",
                            headers={"Retry-After": "5"})
    return StreamingResponse(
        frames(video.preview_command(str(source), fps, width), playing, found.record.id),
        media_type=f"multipart/x-mixed-replace;boundary={video.PREVIEW_BOUNDARY}",
        headers={"Cache-Control": "no-store"},
    )


async def frames(command: list[str], playing: set[asyncio.subprocess.Process],
                 job_id: str) -> AsyncIterator[bytes]:
    """ffmpeg's output as it comes. ffmpeg starts here, not in the route, so a viewer gone
    before the first byte starts none. When the viewer leaves, Starlette cancels this
    generator and the finally kills ffmpeg; the event loop's child watcher reaps it."""
    process = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    playing.add(process)
    log.info("job %s: preview started (ffmpeg %d)", job_id, process.pid)
    try:
        while chunk := await process.stdout.read(CHUNK_BYTES):
            yield chunk
        await process.wait()
    finally:
        playing.discard(process)
        if process.returncode is None:
            process.kill()
            log.info("job %s: preview viewer left; ffmpeg %d killed", job_id, process.pid)
