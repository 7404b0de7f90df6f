"""A kind of the tests' own, served by import path (JOBQUEUE_KINDS=echo:KIND): it imports only
jobqueue's public API, as a user's kind would."""

from __future__ import annotations

from pydantic import BaseModel

from jobqueue import JobContext, JobKind, Output


class EchoOptions(BaseModel):
    text: str = ""


def echo(job: JobContext) -> Output:
    return Output(data={"echo": job.options.text})


KIND = JobKind(name="echo", description="Answers its text.", options=EchoOptions, handler=echo,
               writes_files=False, workers=2, queue_size=3, timeout=30)
# Another name for the same module's kind, and things that are no kind.
SECOND = KIND
NOT_A_KIND = "echo"
