"""`message`: simulated slow work — the stand-in for a user's own model or computation."""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

from jobqueue import JobContext, JobKind, Output

# How often a running message job reports progress and notices a cancel.
TICK_SECONDS = 0.1


class MessageOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    data: str = Field("", description="Text to process.", max_length=1_000_000)
    seconds: float = Field(3, ge=0, le=3600, description="Simulated work time in seconds.")


def process_message(job: JobContext) -> Output:
    options: MessageOptions = job.options
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < options.seconds:
        job.set_progress(round(elapsed, 1), options.seconds, "seconds")
        # Waiting on the cancel event, not sleeping, so a cancel ends the job at once.
        if job.cancel_requested.wait(min(TICK_SECONDS, options.seconds - elapsed)):
            job.raise_if_cancelled()
    job.set_progress(options.seconds, options.seconds, "seconds")
    return Output(data={"message": options.data, "length": len(options.data),
                        "seconds": options.seconds})


KIND = JobKind(
    name="message",
    description="Simulated work: waits `seconds`, then echoes `data`.",
    options=MessageOptions,
    handler=process_message,
    writes_files=False,
    workers=1,
    queue_size=10,
    timeout=5,
)
