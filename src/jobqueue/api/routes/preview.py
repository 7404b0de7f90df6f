"""`GET /jobs/{id}/preview.mjpg`: a video job's frames as a stream an <img> tag plays."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from jobqueue import processes
from jobqueue.api.routes.jobs import find_job
from jobqueue.api.schemas import error_responses
from jobqueue.errors import Busy, NotFound
from jobqueue.files.store import FileStore
from jobqueue.jobs import JobStatus
from jobqueue.kinds import video
from jobqueue.records import JobRecord

log = logging.getLogger(__name__)
router = APIRouter(tags=["async jobs"])

CHUNK_BYTES = 64 * 1024
# A slot granted to a viewer whose stream never started (it left at once) frees up after this.
UNUSED_SLOT_SECONDS = 10.0


class PreviewSlots:
    """Counts the previews playing, and those just granted whose ffmpeg is not up yet, so
    that many viewers arriving at once cannot start more than `limit` decoders."""

    def __init__(self, limit: int):
        self.limit = limit
        self.playing = 0
        self._granted: dict[object, float] = {}

    def grant(self) -> object | None:
        now = time.monotonic()
        self._granted = {t: at for t, at in self._granted.items()
                         if now - at < UNUSED_SLOT_SECONDS}
        if self.playing + len(self._granted) >= self.limit:
            return None
        ticket = object()
        self._granted[ticket] = now
        return ticket

    def start(self, ticket: object) -> None:
        self._granted.pop(ticket, None)
        self.playing += 1

    def stop(self) -> None:
        self.playing -= 1


def preview_source(request: Request, record: JobRecord) -> str:
    """The output video once the job has succeeded, its uploaded input while it waits or runs:
    a path, or with object storage a presigned URL ffmpeg reads over HTTP."""
    if record.job_type != video.KIND.name:
        raise NotFound(f"Job {record.id} is a {record.job_type} job; only {video.KIND.name} "
                       "jobs have a preview.")
    files: FileStore = request.app.state.engine.files
    source = None
    if record.status == JobStatus.SUCCEEDED.value and record.result and record.result["files"]:
        name = record.result["files"][0]
        if files.exists(record, name):
            source = files.output_source(record, name)
    elif record.status in (JobStatus.QUEUED.value, JobStatus.RUNNING.value):
        source = files.input_source(record)
    if source is None:
        raise NotFound(f"Job {record.id} is {record.status} and has no video of its own to "
                       "preview.")
    return source


@router.get(
    "/jobs/{job_id}/preview.mjpg",
    summary="Watch a video job: JPEG frames as multipart/x-mixed-replace",
    description="Plays the output video once the job has succeeded, the uploaded input while "
                "it waits or runs, at the video's own frame rate, once. Use it as `<img src>`. "
                "`fps` and `width` cap the frame rate and the width. Each viewer gets its own "
                "ffmpeg, killed as soon as the viewer leaves; at most "
                "`JOBQUEUE_PREVIEW_STREAMS` play at once (503 beyond that).",
    response_class=StreamingResponse,
    responses={200: {"content": {"multipart/x-mixed-replace": {}}},
               **error_responses(404, 422, 503)},
)
async def preview(
    request: Request,
    record: JobRecord = Depends(find_job),
    fps: float | None = Query(None, gt=0, le=60, description="Most frames per second"),
    width: int | None = Query(None, ge=16, le=3840, description="Most pixels wide"),
) -> StreamingResponse:
    source = await run_in_threadpool(preview_source, request, record)  # the store: I/O
    slots: PreviewSlots = request.app.state.preview_slots
    ticket = slots.grant()
    if ticket is None:
        raise Busy(f"{slots.limit} previews are playing, the most JOBQUEUE_PREVIEW_STREAMS "
                   "allows; retry in a few seconds.", 5)
    return StreamingResponse(
        frames(processes.guarded(video.preview_command(source, fps, width),
                                 request.app.state.settings.video_max_mb),
               slots, ticket, record.id),
        media_type=f"multipart/x-mixed-replace;boundary={video.PREVIEW_BOUNDARY}",
        headers={"Cache-Control": "no-store"},
    )


async def frames(command: list[str], slots: PreviewSlots, ticket: object,
                 job_id: str) -> AsyncIterator[bytes]:
    """ffmpeg's output as it comes. ffmpeg starts here, not in the route, so a viewer gone
    before the first byte starts none. When the viewer leaves, Starlette cancels this
    generator and the finally kills ffmpeg; the event loop's child watcher reaps it."""
    slots.start(ticket)
    try:
        # stderr to a file, so a flood of decoding errors can never stall the frames.
        with tempfile.TemporaryFile() as stderr:
            process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=stderr)
            log.info("job %s: preview started (ffmpeg %d)", job_id, process.pid)
            try:
                while chunk := await process.stdout.read(CHUNK_BYTES):
                    yield chunk
                if await process.wait() != 0:
                    stderr.seek(0)
                    log.warning("job %s: preview ffmpeg exited with code %d: %s", job_id,
                                process.returncode,
                                stderr.read()[-500:].decode(errors="replace"))
            finally:
                if process.returncode is None:
                    process.kill()
                    log.info("job %s: preview viewer left; ffmpeg %d killed", job_id,
                             process.pid)
    finally:
        slots.stop()
