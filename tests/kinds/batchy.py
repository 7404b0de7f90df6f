"""Batched kinds of the tests' own (JOBQUEUE_KINDS=batchy:GATED,batchy:QUICK), on jobqueue's
public API only, as a user's kind would be.

The handler takes a batch of jobs and answers, in each job's place, its text with the batch's
id, size and the job's index in it, in a file of the job's own too; or what the job's `answer`
asks for: an exception of its own (`too_large`, `crash`), the whole call raising (`raise`), or
one answer too few (`short`); a job cancelled meanwhile is skipped, as a handler should. A job
with a `gate` holds its batch until that file exists, so a test decides when a batch may end;
each job's progress says when its batch's call has begun.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from jobqueue import Batch, JobCancelled, JobContext, JobKind, Output, TooLarge

# How often a gated batch looks for its gate file.
GATE_POLL_SECONDS = 0.02


class BatchyOptions(BaseModel):
    text: str = ""
    gate: str = ""
    answer: Literal["ok", "too_large", "crash", "raise", "short"] = "ok"


def answer_batch(jobs: list[JobContext]) -> list[Output | Exception]:
    batch = uuid.uuid4().hex
    for job in jobs:
        job.set_progress(1, 1, "in its batch")
    for gate in {Path(job.options.gate) for job in jobs if job.options.gate}:
        # A cancel of one job does not stop the batch: it waits for its gate, unless every
        # job of it has been cancelled (a shutdown).
        while not gate.exists() and not all(job.cancel_requested.is_set() for job in jobs):
            time.sleep(GATE_POLL_SECONDS)
    if any(job.options.answer == "raise" for job in jobs):
        raise RuntimeError("the batchy kind's handler failed for its whole batch")
    answers: list[Output | Exception] = []
    for index, job in enumerate(jobs):
        if job.cancel_requested.is_set():  # it has ended; its answer would be dropped
            answers.append(JobCancelled(job.id))
        elif job.options.answer == "too_large":
            answers.append(TooLarge(f"{job.options.text!r} is too large for batchy"))
        elif job.options.answer == "crash":
            answers.append(RuntimeError(f"batchy crashed on {job.options.text!r}"))
        else:
            path = job.out_dir / "answer.txt"
            path.write_text(job.options.text)
            answers.append(Output(data={"text": job.options.text, "batch": batch,
                                        "size": len(jobs), "index": index}, files=[path]))
    if any(job.options.answer == "short" for job in jobs):
        answers.pop()
    return answers


GATED = JobKind(name="gated", description="A batch of up to 4, held by a gate file.",
                options=BatchyOptions, handler=answer_batch, workers=1, queue_size=20,
                timeout=30, batch=Batch(max_size=4, max_wait=2.0))
QUICK = JobKind(name="quick", description="Batches of up to 8 on two workers.",
                options=BatchyOptions, handler=answer_batch, workers=2, queue_size=32,
                timeout=30, batch=Batch(max_size=8, max_wait=1.0))
# A /put of it is stopped at 1 s; a batch of two waits up to 2 s for its second job.
BRIEF = JobKind(name="brief", description="A /put timeout of 1 s.", options=BatchyOptions,
                handler=answer_batch, workers=1, queue_size=5, timeout=1.0,
                batch=Batch(max_size=2, max_wait=2.0))
