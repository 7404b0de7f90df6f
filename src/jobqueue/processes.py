"""Child processes (pdftoppm, the PDF render program, ffmpeg, ffprobe) run on behalf of a job:
killed on cancel, always reaped, dead with the server, and optionally under a memory cap.

Every command is started as `setpriv --pdeathsig KILL [prlimit --as=N] -- program ...`: both
are util-linux tools that set up the process and then exec the program in place (same pid), so
no Python code runs between fork and exec (`preexec_fn` can deadlock a threaded server) and the
kernel kills the child when the server's thread that started it dies, `kill -9` included.
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

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
    the tail of its stderr. `index` is its place in the list given to `run_many`."""

    def __init__(self, program: str, returncode: int, stderr_tail: str, index: int = 0):
        how = (f"{program} was killed by signal {-returncode}" if returncode < 0
               else f"{program} exited with code {returncode}")
        tail = stderr_tail.strip()
        super().__init__(f"{how}: {tail}" if tail else f"{how}.")
        self.program = program
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.index = index


def guarded(args: Sequence[str], memory_mb: float | None = None) -> list[str]:
    """`args` as a command that dies with the server and, with `memory_mb`, may not map more
    than that much memory (RLIMIT_AS: an allocation past it fails inside the program)."""
    prefix = ["setpriv", "--pdeathsig", "KILL", "--"]
    if memory_mb:
        prefix += ["prlimit", f"--as={int(memory_mb * 2**20)}", "--"]
    return [*prefix, *args]


def popen(args: Sequence[str], memory_mb: float | None = None, **kwargs) -> subprocess.Popen:
    """subprocess.Popen of `guarded(args)`, stdin from /dev/null."""
    return subprocess.Popen(guarded(args, memory_mb), stdin=subprocess.DEVNULL, **kwargs)


def output(args: Sequence[str], timeout: float, memory_mb: float | None = None
           ) -> subprocess.CompletedProcess:
    """Run a short command that belongs to no job (a check before queueing) and capture its
    output; subprocess.TimeoutExpired (the child killed and reaped) past `timeout`."""
    return subprocess.run(guarded(args, memory_mb), stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=timeout)


@dataclass(eq=False)
class _Child:
    index: int
    program: str
    process: subprocess.Popen
    stderr: IO[bytes]
    partial: bytes = b""


class Slots:
    """When `run_many` may start another child: while fewer than `limit` of its own run.

    A subclass may share a budget between several calls: `take` is asked before each start
    (False: not now, ask again when one of this call's children has written or ended) and
    `give` is called when a child it allowed has ended.
    """

    def __init__(self, limit: int = 1):
        self.limit = limit

    def take(self, running: int) -> bool:
        return running < self.limit

    def give(self) -> None:
        pass


def run(job: Job, args: list[str], on_line: Callable[[str], None] | None = None,
        memory_mb: float | None = None) -> None:
    """Run `args` for `job`, passing each line of its stdout to `on_line`.

    Raises JobCancelled when the job was cancelled meanwhile, ProcessFailed on a non-zero exit.
    """
    run_many(job, [args], on_line=(lambda _, line: on_line(line)) if on_line else None,
             memory_mb=memory_mb)


def run_many(job: Job, commands: Iterable[list[str]], slots: Slots | None = None,
             on_line: Callable[[int, str], None] | None = None,
             on_exit: Callable[[int], None] | None = None,
             memory_mb: float | None = None) -> None:
    """Run `commands` for `job` in order, several at a time as `slots` allows (one by default).

    `commands` may be endless: a command is taken only when `slots` lets it start. The n-th
    command started has index n (from 0): `on_line(index, line)` gets each line it writes to
    stdout, `on_exit(index)` is called when it has exited with 0. The first failure kills the
    others and raises ProcessFailed; a cancel of the job kills them all and raises
    JobCancelled. All are reaped either way, all on the calling thread.
    """
    slots = slots or Slots()
    pending = iter(commands)
    running: set[_Child] = set()
    selector = selectors.DefaultSelector()
    failed: _Child | None = None
    started = 0
    try:
        while failed is None:
            while not job.cancel_requested.is_set() and slots.take(len(running)):
                args = next(pending, None)
                if args is None:
                    slots.give()
                    break
                try:
                    child = _start(job, started, args, memory_mb)
                except BaseException:
                    slots.give()
                    raise
                started += 1
                running.add(child)
                selector.register(child.process.stdout, selectors.EVENT_READ, child)
            if not running:
                break  # all done, or cancelled before the next one started
            for key, _ in selector.select():
                child = key.data
                if _read_lines(child, on_line):
                    continue
                selector.unregister(child.process.stdout)
                running.discard(child)
                _reap(job, child)
                slots.give()
                if child.process.returncode != 0:
                    failed = child
                    break
                child.stderr.close()
                if on_exit:
                    on_exit(child.index)
    finally:
        for child in running:  # a failure, a cancel, or an exception from a callback
            selector.unregister(child.process.stdout)
            child.process.kill()
            _reap(job, child)
            slots.give()
            child.stderr.close()
        selector.close()
    if failed is None:
        job.raise_if_cancelled()
        return
    with failed.stderr:
        job.raise_if_cancelled()  # killed by the cancel: that is no failure of the program
        failed.stderr.seek(0)
        tail = failed.stderr.read()[-STDERR_TAIL_BYTES:].decode(errors="replace")
    if "No space left on device" in tail or disk_nearly_full(job.out_dir):
        raise DiskFull(job.id)  # pdftoppm only says "Write Error", or crashes
    raise ProcessFailed(failed.program, failed.process.returncode, tail, failed.index)


def _start(job: Job, index: int, args: list[str], memory_mb: float | None) -> _Child:
    # stderr goes to a file, not a pipe, so a chatty process can never block on a full pipe.
    stderr = tempfile.TemporaryFile()
    try:
        process = popen(args, memory_mb, stdout=subprocess.PIPE, stderr=stderr)
    except BaseException:
        stderr.close()
        raise
    job.attach_process(process)  # kills it at once if the job was cancelled meanwhile
    return _Child(index, Path(args[0]).name, process, stderr)


def _read_lines(child: _Child, on_line: Callable[[int, str], None] | None) -> bool:
    """Read what the child wrote, passing whole lines on; False at the end of its output."""
    data = os.read(child.process.stdout.fileno(), 65536)
    if not data:
        return False
    if on_line is None:
        return True
    *lines, child.partial = (child.partial + data).split(b"\n")
    for line in lines:
        on_line(child.index, line.decode(errors="replace").strip())
    return True


def _reap(job: Job, child: _Child) -> None:
    """Wait for a child whose output has ended (or kill it first), and forget it."""
    try:
        child.process.wait()
    finally:
        job.detach_process(child.process)
        child.process.stdout.close()
