"""Celery 5.7 behind FastAPI: `/put` sends the task (`delay`) and waits for its result
(`.get()`) on a thread, since both block. Redis is the broker and the result backend
(REDIS_URL); the worker is `celery -A celery_app worker --pool threads -c 4` (from this
folder)."""

import asyncio
import os
import time

from celery import Celery
from fastapi import FastAPI
from pydantic import BaseModel

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/1")
celery = Celery("celery_app", broker=REDIS_URL, backend=REDIS_URL)


@celery.task
def work(data: str, seconds: float) -> dict:
    if seconds:
        time.sleep(seconds)
    return {"result": data}


app = FastAPI()


class Submission(BaseModel):
    data: str
    seconds: float


@app.post("/put")
async def put(submission: Submission) -> dict:
    return await asyncio.to_thread(
        lambda: work.delay(submission.data, submission.seconds).get(timeout=60))
