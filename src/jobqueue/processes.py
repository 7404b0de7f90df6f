"""Child processes (pdftoppm, the PDF render program, ffmpeg, ffprobe) run on behalf of a job:
killed on cancel, always reaped, dead with the server, and optionally under a memory cap.

Every command is started as `setpriv --pdeathsig KILL [prlimit --as=N] -- program ...`: both
are util-linux tools that set up the process and then exec the program in place (same pid), so
no Python code runs between fork and exec (`preexec_fn` can deadlock a threaded server) and the
kernel kills the child when the server's thread that started it dies, `kill -9` included.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from jobqueue import tracing
from jobqueue.errors import BadInput, DiskFull
from jobqueue.jobs import JobContext

STDERR_TAIL_BYTES = 2000
# What `output` keeps of a check's stdout, and the longest stdout line a job's child may write
# (a longer one is dropped): a few hundred bytes of PDF can make pdfinfo print 150 MB of title.
MAX_OUTPUT_BYTES = 8 * 2**20
MAX_LINE_BYTES = 64 * 1024
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


class _TracedPopen(subprocess.Popen):
    """A child a kind started itself (start_child) and reaps itself: its span ends once a
    wait or poll (communicate waits) sees it exit."""

    span: Any = None

    def poll(self) -> int | None:
        code = super().poll()
        self._reaped()
        return code

    def wait(self, timeout: float | None = None) -> int:
        code = super().wait(timeout)
        self._reaped()
        return code

    def _reaped(self) -> None:
        if self.returncode is not None and self.span is not None:
            span, self.span = self.span, None
            tracing.end_child(span, self.pid, self.returncode)


def start_child(args: Sequence[str], memory_mb: float | None = None,
                **kwargs) -> subprocess.Popen:
    """`popen` for a kind's own use (jobqueue.start_child): while tracing is on, the child has
    a span under the job's run, as run_child's do."""
    span = tracing.start_child(args)
    if span is None:
        return popen(args, memory_mb, **kwargs)
    try:
        process = _TracedPopen(guarded(args, memory_mb), stdin=subprocess.DEVNULL, **kwargs)
    except BaseException:
        tracing.end_child(span, None, None)
        raise
    process.span = span
    return process


class OutputTooLarge(BadInput):
    """A check's program printed more than `output` keeps: what it reads about the file
    (a PDF's title, a video's tags) is too large to be a document's own."""

    def __init__(self, program: str, max_bytes: int):
        super().__init__(f"{program} printed more than {max_bytes // 2**20} MB about the file; "
                         "its metadata is too large.")


def output(args: Sequence[str], timeout: float, memory_mb: float | None = None,
           max_bytes: int = MAX_OUTPUT_BYTES) -> subprocess.CompletedProcess:
    """Run a short command that belongs to no job (a check before queueing) and capture its
    output, at most `max_bytes` of it (OutputTooLarge past that) and the tail of its stderr;
    subprocess.TimeoutExpired past `timeout`. The child is killed and reaped either way."""
    span = tracing.start_child(args)  # a request's check of its upload is in its trace
    with tempfile.TemporaryFile() as stderr:
        try:
            process = popen(args, memory_mb, stdout=subprocess.PIPE, stderr=stderr)
        except BaseException:
            tracing.end_child(span, None, None)
            raise
        chunks, size = [], 0
        deadline = time.monotonic() + timeout
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(process.stdout, selectors.EVENT_READ)
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise subprocess.TimeoutExpired(args, timeout)
                    if not selector.select(left):
                        continue
                    data = os.read(process.stdout.fileno(), 65536)
                    if not data:
                        break
                    size += len(data)
                    if size > max_bytes:
                        raise OutputTooLarge(Path(args[0]).name, max_bytes)
                    chunks.append(data)
            process.wait(max(0.0, deadline - time.monotonic()))
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
            process.stdout.close()
            tracing.end_child(span, process.pid, process.returncode)
        stderr.seek(0)
        tail = stderr.read()[-STDERR_TAIL_BYTES:]
    return subprocess.CompletedProcess(args, process.returncode, b"".join(chunks), tail)


@dataclass(eq=False)
class _Child:
    index: int
    program: str
    process: subprocess.Popen
    stderr: IO[bytes]
    partial: bytearray = field(default_factory=bytearray)
    # Inside a line longer than MAX_LINE_BYTES: dropped up to its end.
    skipping: bool = False
    # Its span while tracing is on (tracing.start_child), ended as it is reaped.
    span: Any = None


class ChildSlots:
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


def run(job: JobContext, args: list[str], on_line: Callable[[str], None] | None = None,
        memory_mb: float | None = None) -> None:
    """Run `args` for `job`, passing each line of its stdout to `on_line`.

    Raises JobCancelled when the job was cancelled meanwhile, ProcessFailed on a non-zero exit.
    """
    run_many(job, [args], on_line=(lambda _, line: on_line(line)) if on_line else None,
             memory_mb=memory_mb)


def run_many(job: JobContext, commands: Iterable[list[str]], slots: ChildSlots | None = None,
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
    slots = slots or ChildSlots()
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
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(child.process.stdout)
            try:
                child.process.kill()
                _reap(job, child)
            finally:
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


def _start(job: JobContext, index: int, args: list[str], memory_mb: float | None) -> _Child:
    # stderr goes to a file, not a pipe, so a chatty process can never block on a full pipe.
    stderr = tempfile.TemporaryFile()
    span = tracing.start_child(args)  # a child of the job's run span, current on this thread
    try:
        process = popen(args, memory_mb, stdout=subprocess.PIPE, stderr=stderr)
    except BaseException:
        stderr.close()
        tracing.end_child(span, None, None)
        raise
    job.attach_process(process)  # kills it at once if the job was cancelled meanwhile
    return _Child(index, Path(args[0]).name, process, stderr, span=span)


def _read_lines(child: _Child, on_line: Callable[[int, str], None] | None) -> bool:
    """Read what the child wrote, passing whole lines on (and the last one, unterminated, at
    the end); False at the end of its output. Lines over MAX_LINE_BYTES are dropped."""
    data = os.read(child.process.stdout.fileno(), 65536)
    if on_line is None:
        return bool(data)
    if not data:
        if child.partial and not child.skipping:
            on_line(child.index, child.partial.decode(errors="replace").strip())
        return False
    start = 0
    while (end := data.find(b"\n", start)) >= 0:
        if not child.skipping and len(child.partial) + end - start <= MAX_LINE_BYTES:
            child.partial += data[start:end]
            on_line(child.index, child.partial.decode(errors="replace").strip())
        child.partial.clear()
        child.skipping = False
        start = end + 1
    if not child.skipping:
        child.partial += data[start:]
        if len(child.partial) > MAX_LINE_BYTES:
            child.partial.clear()
            child.skipping = True
    return True


def _reap(job: JobContext, child: _Child) -> None:
    """Wait for a child whose output has ended (or kill it first), and forget it."""
    try:
        child.process.wait()
    finally:
        job.detach_process(child.process)
        child.process.stdout.close()
        tracing.end_child(child.span, child.process.pid, child.process.returncode)
