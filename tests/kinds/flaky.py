"""Kinds of the tests' own that fail and are retried (tests/test_pg_retries.py), served by
import path (JOBQUEUE_KINDS=flaky:FLAKY). Each counts a job's attempts with a file per attempt
in <JOBQUEUE_OUT_DIR>/flaky/<tag>/, a folder every process of a deployment shares, so the
count holds whichever worker runs the next attempt.

- FLAKY (`flaky`): `Retry(attempts=3)` with tiny back-offs; fails (RuntimeError) its first
  `fail_times` attempts, or with `bad` fails with BadInput (never retried); then answers how
  many attempts it took.
- LATER (`later`): no Retry of its own; raises RetryLater(after=`after`) for its first
  `fail_times` attempts (three attempts in all).
- BATCHED (`flakybatch`): FLAKY's rules, in batches.
- GATED (`gated`): one worker, a 3 s timeout; waits until the file <folder>/<gate> appears.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel

from jobqueue import Batch, JobContext, JobKind, Output, Retry
from jobqueue.errors import BadInput, RetryLater


class Options(BaseModel):
    tag: str = "default"
    fail_times: int = 0
    bad: bool = False
    gate: str = ""
    after: float = 0.05  # LATER's RetryLater


def folder(job: JobContext) -> Path:
    path = Path(job.settings.out_dir) / "flaky"
    path.mkdir(parents=True, exist_ok=True)
    return path


def attempt(job: JobContext) -> int:
    """This attempt's number among the job's (its tag's), counted in files."""
    tagged = folder(job) / job.options.tag
    tagged.mkdir(parents=True, exist_ok=True)
    number = len(list(tagged.iterdir())) + 1
    (tagged / f"attempt-{number}").touch()
    return number


def flaky(job: JobContext) -> Output:
    number = attempt(job)
    if job.options.bad:
        raise BadInput("this input is bad, every time")
    if number <= job.options.fail_times:
        raise RuntimeError(f"attempt {number} fails on purpose")
    return Output(data={"attempts": number})


def later(job: JobContext) -> Output:
    number = attempt(job)
    if number <= job.options.fail_times:
        raise RetryLater(after=job.options.after, reason=f"attempt {number} asks to be retried")
    return Output(data={"attempts": number})


def batched(jobs: list[JobContext]) -> list:
    answers = []
    for job in jobs:
        try:
            answers.append(flaky(job))
        except Exception as error:
            answers.append(error)
    return answers


def gated(job: JobContext) -> Output:
    gate = folder(job) / job.options.gate
    while not gate.exists():
        job.raise_if_cancelled()
        time.sleep(0.05)
    return Output(data={"gate": job.options.gate})


RETRY = Retry(attempts=3, backoff=0.05, max_backoff=0.1, jitter=False)
FLAKY = JobKind(name="flaky", description="Fails its first attempts.", options=Options,
                handler=flaky, writes_files=False, workers=2, queue_size=50, timeout=30,
                retry=RETRY)
LATER = JobKind(name="later", description="Asks to be retried.", options=Options,
                handler=later, writes_files=False, workers=2, queue_size=50, timeout=30)
BATCHED = JobKind(name="flakybatch", description="Fails its first attempts, in batches.",
                  options=Options, handler=batched, writes_files=False, workers=1,
                  queue_size=50, timeout=30, retry=RETRY, batch=Batch(max_size=4, max_wait=0.05))
GATED = JobKind(name="gated", description="Waits for its gate.", options=Options,
                handler=gated, writes_files=False, workers=1, queue_size=50, timeout=3)
