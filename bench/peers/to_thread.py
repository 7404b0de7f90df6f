"""The baseline for jobqueue's embedded /put: the few lines a user writes instead. A pydantic
body, the work on a thread (`asyncio.to_thread`), the answer; no queue, no records."""

import asyncio
import time

from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()


class Submission(BaseModel):
    data: str
    seconds: float


def work(data: str, seconds: float) -> dict:
    if seconds:
        time.sleep(seconds)
    return {"result": data}


@app.post("/put")
async def put(submission: Submission) -> dict:
    return await asyncio.to_thread(work, submission.data, submission.seconds)
