"""`GET /` and `GET /health`: is the server up, and how busy is each queue."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from jobqueue.api.schemas import Health

router = APIRouter(tags=["server"])


@router.get("/", summary="Say hello, list the job types and point to the docs")
async def root(request: Request) -> dict[str, str | dict[str, str]]:
    return {
        "message": "Hello from jobqueue. The API is described at /docs; watch it at /dashboard.",
        "docs": "/docs",
        "dashboard": "/dashboard",
        "jobTypes": {name: kind.description for name, kind in request.app.state.kinds.items()},
    }


@router.get("/health", summary="Queue sizes and busy workers per job kind", response_model=Health,
            response_model_exclude_none=True,
            responses={503: {"model": Health, "description": "Draining (shutting down, taking "
                                                            "no new jobs), or a dependency "
                                                            "(the database) is down"}})
async def health(request: Request) -> JSONResponse:
    # The engine's figures are already the answer's JSON: answered as they are, not validated
    # again through the Health model (which documents them), since load balancers ask often.
    engine = request.app.state.engine
    problems = {name: state for name, state in (await engine.health()).items() if state != "ok"}
    # Load balancers read the status code, not the body.
    if problems:
        return JSONResponse({"status": "unavailable", "dependencies": problems, "queues": {}},
                            503)
    queues = await engine.stats()
    processes = await engine.worker_processes()
    more = {} if processes is None else {"workerProcesses": processes}
    if request.app.state.draining:
        return JSONResponse({"status": "draining", "queues": queues, **more}, 503)
    # A kind whose setup failed: 200 all the same, so a load balancer keeps sending the other
    # kinds' jobs (that kind's get 503 naming it).
    failed = any(queue.get("state") == "failed" for queue in queues.values())
    return JSONResponse({"status": "degraded" if failed else "ok", "queues": queues, **more})
