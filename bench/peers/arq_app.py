"""arq 0.28 behind FastAPI: `/put` enqueues the job on Redis and waits for its result; the
worker is `arq arq_app.WorkerSettings` (run from this folder). REDIS_URL names the Redis.

Both polls are arq's knobs for latency: the client's `job.result(poll_delay=0.01)` and the
worker's `poll_delay = 0.01` (arq's default is 0.5 s for both, which would put up to half a
second on every job)."""

import os
import time
from contextlib import asynccontextmanager

from arq import create_pool
from arq.connections import RedisSettings
from fastapi import FastAPI, Request
from pydantic import BaseModel

REDIS = RedisSettings.from_dsn(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))


async def work(ctx: dict, data: str, seconds: float) -> dict:
    if seconds:
        time.sleep(seconds)  # as a blocking model call would: arq runs jobs on its loop
    return {"result": data}


class WorkerSettings:
    functions = [work]
    redis_settings = REDIS
    poll_delay = 0.01


@asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.redis = await create_pool(REDIS)
    yield
    await app.state.redis.aclose()


app = FastAPI(lifespan=lifespan)


class Submission(BaseModel):
    data: str
    seconds: float


@app.post("/put")
async def put(submission: Submission, request: Request) -> dict:
    job = await request.app.state.redis.enqueue_job("work", submission.data, submission.seconds)
    return await job.result(timeout=60, poll_delay=0.01)
