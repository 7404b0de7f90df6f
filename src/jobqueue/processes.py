"""Child processes (pdfinfo, ffmpeg, ffprobe) run on behalf of a job: killed on cancel, always reaped."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable

from .jobs import BadInput, Job

STDERR_TAIL_BYTES = 2000


class ProcessFailed(BadInput):
    """A child process exited with an error, most often over its input; the message carries
    the tail of its stderr."""

    def __init__(self, program: str, returncode: int, stderr_tail: str):
        super().__init__(f"{program} exited with code {returncode}: {stderr_tail.strip()}")
        self.stderr_tail = stderr_tail


def run(job: Job, args: list[str], on_line: Callable[[str], None] | None = None) -> None:
    """Run `args` for `job`, passing each line of its stdout to `on_line`.

    Raises JobCancelled when the job was cancelled meanwhile, ProcessFailed on a non-zero exit.
    """
    # stderr goes to a file, not a pipe, so a chatty process can never block on a full pipe.
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if on_line else subprocess.DEVNULL,
            stderr=stderr,
        )
        job.attach_process(process)
        try:
            if on_line:
                for raw in process.stdout:
                    on_line(raw.decode(errors="replace").strip())
            process.wait()
        finally:
            job.detach_process(process)
            if process.poll() is None:
                process.kill()
            process.wait()
            if process.stdout:
                process.stdout.close()
        job.raise_if_cancelled()
        if process.returncode != 0:
            stderr.seek(0)
            tail = stderr.read()[-STDERR_TAIL_BYTES:].decode(errors="replace")
            raise ProcessFailed(args[0], process.returncode, tail)
