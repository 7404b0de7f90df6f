"""The kind of bench/scheduling.py's retry measurement, loaded by import path
(JOBQUEUE_KINDS=flaky:FLAKY, with bench/kinds on the server's PYTHONPATH).

A `flaky` job fails its first `fails` attempts with a RuntimeError, then succeeds; it does no
work otherwise, so what a retried job costs beside one that succeeds at once is the retry
machinery alone. Attempts are counted in this process by job id: the bench runs the embedded
server, whose worker threads share it (a distributed worker would need a shared tally).
"""

from __future__ import annotations

import threading
from collections import Counter

from pydantic import BaseModel, Field

from jobqueue import JobContext, JobKind, Output, Retry

_attempts: Counter[str] = Counter()
_lock = threading.Lock()


class FlakyOptions(BaseModel):
    fails: int = Field(0, ge=0, le=10, description="Attempts that fail before one succeeds")


def flaky(job: JobContext) -> Output:
    with _lock:
        _attempts[job.id] += 1
        attempt = _attempts[job.id]
        if attempt > job.options.fails:
            del _attempts[job.id]
    if attempt <= job.options.fails:
        raise RuntimeError(f"flaky failed on attempt {attempt}")
    return Output(data={"attempt": attempt})


FLAKY = JobKind(name="flaky", description="Fails its first `fails` attempts, then succeeds",
                options=FlakyOptions, handler=flaky, workers=1, queue_size=1000,
                retry=Retry(attempts=3, backoff=0.01, max_backoff=0.05, jitter=False))
