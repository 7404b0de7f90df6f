"""Child processes (pdfinfo, ffmpeg, ffprobe) run on behalf of a job: killed on cancel, always reaped."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from .jobs import BadInput, DiskFull, Job

STDERR_TAIL_BYTES = 2000
# Less free space than this where a failed child was writing: the disk is why it failed.
FULL_DISK_BYTES = 1024 * 1024


def disk_nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < FULL_DISK_BYTES
    except OSError:
        return False


class ProcessFailed(BadInput):
    """A child process exited with an error, most often over its input; the message carries
    the tail of its stderr."""

    def __init__(self, program: str, returncode: int, stderr_tail: str):
        how = (f"{program} was killed by signal {-returncode}" if returncode < 0
               else f"{program} exited with code {returncode}")
        tail = stderr_tail.strip()
        super().__init__(f"{how}: {tail}" if tail else f"{how}.")
        self.returncode = returncode
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
            if "No space left on device" in tail or disk_nearly_full(job.out_dir):
                raise DiskFull(job.id)  # pdftoppm only says "Write Error", or crashes
            raise ProcessFailed(args[0], process.returncode, tail)
