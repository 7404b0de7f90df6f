"""Kinds of the tests of priorities, fair share, retries and admission (tests/test_scheduling.py),
on jobqueue's public API only, as a user's kind would be.

A `gate` job holds its worker until its gate file exists, so a test decides when the queue may
move; a `step` job fails its first `fails` attempts (counted in its `tally` file, which any
worker process can reach), or raises what `answer` asks for; `brisk` jobs run `seconds` each,
behind a /put timeout of 1 s, to give the admission's estimate its run times.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from jobqueue import BadInput, JobContext, JobKind, Output, Retry, RetryLater

GATE_POLL_SECONDS = 0.02


class StepOptions(BaseModel):
    text: str = ""
    gate: str = ""
    tally: str = ""
    fails: int = 0
    seconds: float = 0
    answer: Literal["ok", "bad", "later"] = "ok"
    later: float = 0.05  # RetryLater's `after`


def step(job: JobContext) -> Output:
    options = job.options
    if options.gate:
        while not Path(options.gate).exists():
            if job.cancel_requested.wait(GATE_POLL_SECONDS):
                job.raise_if_cancelled()
    if options.seconds:
        job.cancel_requested.wait(options.seconds)
        job.raise_if_cancelled()
    attempt = 1
    if options.tally:
        with open(options.tally, "a+") as tally:
            tally.write("x")
            tally.seek(0)
            attempt = len(tally.read())
    if options.answer == "bad":
        raise BadInput(f"{options.text!r} is not something step can do")
    if options.answer == "later" and attempt <= options.fails:
        raise RetryLater(after=options.later, reason=f"upstream busy (attempt {attempt})")
    if attempt <= options.fails:
        raise RuntimeError(f"step failed on attempt {attempt}")
    path = job.out_dir / "step.txt"
    path.write_text(options.text)
    return Output(data={"text": options.text, "attempt": attempt, "startedAt": time.time()},
                  files=[path])


GATE = JobKind(name="gate", description="Waits for its gate file", options=StepOptions,
               handler=step, queue_size=40)
STEP = JobKind(name="step", description="Fails its first attempts", options=StepOptions,
               handler=step, queue_size=40,
               retry=Retry(attempts=3, backoff=0.05, max_backoff=0.2, jitter=False))
BRISK = JobKind(name="brisk", description="Runs a set time", options=StepOptions,
                handler=step, queue_size=40, timeout=1.0)
