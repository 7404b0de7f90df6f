"""Kinds of the tests' own with a `setup` (tests/test_resources.py), served by import path
(JOBQUEUE_KINDS=resourceful:COUNTED). Each keeps its files in <JOBQUEUE_OUT_DIR>/resourceful/,
which every process of a deployment shares: the tests read what the setups and teardowns wrote
there, and create the files the setups wait for.

- COUNTED (`counted`): its setup notes its process id in `setups`; its resource is a dict with
  that pid, this process's count of setups and a token made once; each job answers them, and
  its own number among the jobs that used the resource. Its teardown writes `teardown-<pid>`.
- SLOW (`slow`): its setup waits until the file `release` appears.
- FLAKY (`flaky`): its setup waits until `go` appears, then fails (OSError) until `fixed`
  appears; every try is a line in `tries`.
- STUBBORN (`stubborn`): its handler ignores its cancel until `release-stubborn` appears; its
  teardown writes `teardown-stubborn`.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from jobqueue import JobContext, JobKind, Output, Settings

_setups = 0  # setups of COUNTED in this process
_lock = threading.Lock()


class Options(BaseModel):
    text: str = ""


def folder(settings: Settings) -> Path:
    path = Path(settings.out_dir) / "resourceful"
    path.mkdir(parents=True, exist_ok=True)
    return path


def note(path: Path, line: str) -> None:
    with path.open("a") as file:
        file.write(f"{line}\n")


def wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.05)


def counted_setup(settings: Settings) -> dict[str, Any]:
    global _setups
    here = folder(settings)
    with _lock:
        _setups += 1
        setups = _setups
    note(here / "setups", str(os.getpid()))
    return {"pid": os.getpid(), "setups": setups, "token": uuid.uuid4().hex, "jobs": 0,
            "folder": here, "lock": threading.Lock()}


def counted(job: JobContext) -> Output:
    resource = job.resource
    with resource["lock"]:
        resource["jobs"] += 1
        number = resource["jobs"]
    return Output(data={"pid": resource["pid"], "setups": resource["setups"],
                        "token": resource["token"], "job": number, "text": job.options.text})


def counted_teardown(resource: dict[str, Any]) -> None:
    (resource["folder"] / f"teardown-{resource['pid']}").write_text(str(resource["jobs"]))


def slow_setup(settings: Settings) -> str:
    wait_for(folder(settings) / "release")
    return "released"


def flaky_setup(settings: Settings) -> str:
    here = folder(settings)
    note(here / "tries", str(os.getpid()))
    wait_for(here / "go")
    if not (here / "fixed").exists():
        raise OSError("model.bin not found")
    return "fixed"


def answer_resource(job: JobContext) -> Output:
    return Output(data={"resource": job.resource, "text": job.options.text})


COUNTED = JobKind(name="counted", description="Answers its process's resource.", options=Options,
                  handler=counted, writes_files=False, workers=2, queue_size=50, timeout=30,
                  setup=counted_setup, teardown=counted_teardown)
SLOW = JobKind(name="slow", description="Its setup waits for a file.", options=Options,
               handler=answer_resource, writes_files=False, queue_size=5, timeout=30,
               setup=slow_setup)
FLAKY = JobKind(name="flaky", description="Its setup fails until a file appears.",
                options=Options, handler=answer_resource, writes_files=False, queue_size=5,
                timeout=30, setup=flaky_setup)


def stubborn(job: JobContext) -> Output:
    """Ignores its cancel: runs until the test lets it go (`release-stubborn`)."""
    here = job.resource
    (here / "stubborn-started").write_text(job.id)
    wait_for(here / "release-stubborn")
    return Output(data={})


def stubborn_teardown(here: Path) -> None:
    (here / "teardown-stubborn").write_text("torn down")


STUBBORN = JobKind(name="stubborn", description="Ignores cancels; torn down at shutdown.",
                   options=Options, handler=stubborn, writes_files=False, timeout=30,
                   setup=folder, teardown=stubborn_teardown)
