"""`GET /jobs/{id}/files/{name}`: the output files a job wrote into `out/<id>/`."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse

from .. import storage
from ..schemas import error_responses

router = APIRouter(tags=["jobs"])


@router.get(
    "/jobs/{job_id}/files/{name}",
    name="job_file",
    summary="Download one output file of a job",
    description="For example `page-001.png` of a pdf2image job or `video.mp4` of a video job.",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}, "video/mp4": {}}}, **error_responses(404)},
)
async def job_file(job_id: str, name: str, request: Request) -> FileResponse:
    path = storage.output_file(request.app.state.settings.out_dir, job_id, name)
    if path is None:
        raise HTTPException(404, f"Job {job_id!r} has no output file {name!r}.")
    return FileResponse(path)
