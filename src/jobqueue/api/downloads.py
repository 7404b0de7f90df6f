"""The answer that sends an output file, made of what the file store says to send
(files/store.py's `Download`): the file itself from this machine's disk, or its bytes as they
come from the object store."""

from __future__ import annotations

from fastapi.responses import FileResponse, Response, StreamingResponse

from jobqueue.files.store import Download

# Output files never change once written.
CACHE = {"Cache-Control": "private, max-age=3600"}


def file_response(download: Download) -> Response:
    if download.path is not None:  # Starlette stats it, answers Range requests, names it
        return FileResponse(download.path, media_type=download.media_type,
                            filename=download.filename, headers=CACHE)
    headers = {**CACHE, "Content-Length": str(download.size)}
    if download.filename:
        headers["Content-Disposition"] = f'attachment; filename="{download.filename}"'
    return StreamingResponse(download.chunks, media_type=download.media_type, headers=headers)
