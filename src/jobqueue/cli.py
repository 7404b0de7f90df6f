"""`jobqueue`: the one command. `jobqueue serve …` runs the server (jobqueue.server),
`jobqueue worker …` a worker process of the distributed mode (jobqueue.worker); every other
command is the client: submit files, follow their progress, download the results.

The client commands are built on the client library (jobqueue.client, over HTTP only) and rich;
they import nothing of the server, which `serve` and `worker` load only when run. Exit code 0
when everything asked for worked, 1 when a job failed or the server refused a request (or
could not be reached), 2 for a usage error. `python -m jobqueue.client` is the same command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from jobqueue.client import (
    DEFAULT_URL,
    FINISHED,
    AsyncClient,
    ClientError,
    Job,
    Retry,
)

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

# What a retry message names: the file of the submission whose task is retrying.
LABEL: contextvars.ContextVar[str | None] = contextvars.ContextVar("label", default=None)


def announce(retry: Retry) -> None:
    """The library's on_retry hook: a line on stderr for each wait."""
    label = LABEL.get() or f"{retry.method} {retry.url}"
    reason = retry.detail if retry.status is None else f"{retry.status}: {retry.detail}"
    err.print(f"[yellow]{label}: {reason}; retrying in {retry.wait:g} s", highlight=False)


# ---- submitting ----

@dataclass
class Submission:
    """One job this run submits: its input file (None for the bundled sample or no file)."""

    path: Path | None
    label: str
    job: Job | None = None
    error: str | None = None
    waited: float | None = None  # submit --wait N: the server held the answer this long


async def follow(client: AsyncClient, job_id: str, progress: Progress, task: TaskID,
                 label: str) -> Job:
    """Follow the job's event stream, moving its progress bar; returns its final state."""
    job = None
    async for event in client.events(job_id):
        job = event.job
        done, total = job.progress.done, job.progress.total
        if job.succeeded:
            done = total = total or 1
        unit = job.progress.unit
        progress.update(task, completed=done, total=total or None,
                        description=f"{label} [dim]{job.status}",
                        amount=f"{done:g}/{total:g} {unit}" if total else "")
    assert job is not None  # the stream ends after the final state, or raises
    return job


def report(item: Submission, files: list[Path] | None) -> bool:
    """One line per job on stdout; True when it succeeded."""
    if item.error:
        err.print(f"[red]✘ {item.label}: {item.error}", highlight=False)
        return False
    job = item.job
    if job.succeeded:
        count = f"{len(files)} file{'s' if len(files) > 1 else ''}" if files else ""
        where = f" → {files[0].parent}/ ({count})" if files else ""
        data = "" if files else f" {json.dumps(job.result.data)}"
        out.print(f"[green]✔[/] {item.label}: {job.id} succeeded{where}{data}",
                  highlight=False)
        return True
    if job.finished:
        reason = f": {job.error}" if job.error else ""
        err.print(f"[red]✘ {item.label}: {job.id} {job.status}{reason}", highlight=False)
        return False
    if item.waited is not None:  # --wait N: not ended within it
        out.print(f"{job.id}  {item.label}  {job.status} after {item.waited:g} s",
                  highlight=False)
        return True
    out.print(f"{job.id}  {item.label}", highlight=False)  # submitted, not waited for
    return True


def output_folders(items: list[Submission], out_dir: Path) -> dict[int, Path]:
    """`out/<input file stem>/` per job, made unique when two inputs share a stem."""
    folders, taken = {}, set()
    for index, item in enumerate(items):
        stem = item.path.stem if item.path else "sample"
        name, number = stem, 2
        while name in taken:
            name, number = f"{stem}-{number}", number + 1
        taken.add(name)
        folders[index] = out_dir / name
    return folders


async def run_submit(client: AsyncClient, args: argparse.Namespace,
                     options: dict[str, str]) -> int:
    for path in args.files:
        if not path.is_file():
            raise ClientError(f"no such file: {path}")
    items = [Submission(path, path.name) for path in args.files] or [
        Submission(None, f"{args.type} (no file)")]
    # --wait: follow every job to its end; --wait N: the server holds each answer up to N s
    # (Prefer: wait=N) and the job is shown as that left it.
    wait = (args.wait and args.wait_seconds is None) or args.out is not None
    folders = output_folders(items, args.out or Path("."))
    downloaded: dict[int, list[Path]] = {}
    slots = asyncio.Semaphore(args.parallel)

    with progress_bars(enabled=wait) as progress:
        async def one(index: int, item: Submission) -> None:
            LABEL.set(item.label)  # this task's own: its retries name its file
            async with slots:  # at most --parallel uploads and streams at once
                task = progress.add_task(item.label, total=None, amount="")
                try:
                    # The library sends an Idempotency-Key and keeps it across its retries:
                    # a retry after a lost answer gets this job back, never a second one.
                    item.job = await client.submit(args.type, item.path,
                                                   priority=args.priority,
                                                   wait=args.wait_seconds, **options)
                    if not wait:
                        item.waited = args.wait_seconds
                        return
                    item.job = await follow(client, item.job.id, progress, task, item.label)
                    if item.job.succeeded and args.out is not None:
                        downloaded[index] = await client.download(item.job, folders[index])
                except (ClientError, OSError) as error:
                    item.error = str(error) or type(error).__name__
                    progress.update(task, description=f"{item.label} [red]error")

        await asyncio.gather(*(one(i, item) for i, item in enumerate(items)))
    results = [report(item, downloaded.get(i)) for i, item in enumerate(items)]
    return 0 if all(results) else 1


def progress_bars(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.fields[amount]}"), TimeElapsedColumn(),
                    console=err, disable=not enabled)


# ---- one job by id ----

async def run_wait(client: AsyncClient, args: argparse.Namespace) -> int:
    item = Submission(None, args.id[:8])
    await client.get(args.id)  # a clear 404 before any stream
    with progress_bars(enabled=True) as progress:
        task = progress.add_task(item.label, total=None, amount="")
        item.job = await follow(client, args.id, progress, task, item.label)
    files = None
    if args.out is not None and item.job.succeeded:
        files = await client.download(item.job, args.out)
    return 0 if report(item, files) else 1


async def run_download(client: AsyncClient, args: argparse.Namespace) -> int:
    job = await client.get(args.id)
    if not job.succeeded:
        reason = f": {job.error}" if job.error else ""
        raise ClientError(f"job {args.id} is {job.status}{reason}; only a succeeded job has "
                          "files to download")
    files = await client.download(job, args.out)
    if not files:
        out.print_json(data=job.result.data)
    for path in files:
        out.print(str(path), highlight=False)
    return 0


async def run_status(client: AsyncClient, args: argparse.Namespace) -> int:
    """The job as JSON on stdout; its attempts, retries and estimated start, when the server
    tells them, as lines on stderr (so the JSON stays the output)."""
    job = await client.get(args.id)
    out.print_json(data=job.raw)
    for line in status_lines(job, datetime.now(timezone.utc)):
        err.print(line, highlight=False)
    return 0


def status_lines(job: Job, now: datetime) -> list[str]:
    lines = []
    if job.max_attempts is not None:
        lines.append(f"attempt {job.attempt} of {job.max_attempts}")
    if job.next_attempt_at is not None:
        due = (job.next_attempt_at - now).total_seconds()
        lines.append(f"next attempt at {job.next_attempt_at.isoformat()} "
                     f"(in {max(0.0, due):.0f} s)")
    for earlier in job.earlier_errors:
        when = f" at {earlier.finished_at.isoformat()}" if earlier.finished_at else ""
        lines.append(f"attempt {earlier.attempt} failed{when}: {earlier.error}")
    if job.status == "queued" and job.estimated_start_seconds is not None:
        place = f", position {job.queue_position}" if job.queue_position else ""
        lines.append(f"estimated start in {job.estimated_start_seconds:g} s{place}")
    return lines


async def run_retry(client: AsyncClient, args: argparse.Namespace) -> int:
    """POST /jobs/{id}/retry: a failed job runs again, on its upload."""
    job = await client.retry(args.id)
    out.print(f"{job.id} {job.status}", highlight=False)
    return 0


async def run_cancel(client: AsyncClient, args: argparse.Namespace) -> int:
    """DELETE /jobs/{id}: cancels an unfinished job, deletes a finished one."""
    job = await client.get(args.id)
    job = await (client.delete(job) if job.finished else client.cancel(job))
    out.print(f"{job.id} {job.status}", highlight=False)
    return 0


async def run_list(client: AsyncClient, args: argparse.Namespace) -> int:
    jobs = await client.jobs(status=args.status, job_type=args.type, limit=args.limit)
    table = Table(box=None)
    # An id is what a reader copies: never cut short, however narrow the terminal or pipe
    # (rich shortens the other columns instead).
    table.add_column("id", no_wrap=True, min_width=36)
    for column in ("type", "status", "progress", "age"):
        table.add_column(column, no_wrap=True)
    now = time.time()
    for job in jobs:
        done, total, unit = job.progress.done, job.progress.total, job.progress.unit
        created = job.created_at.timestamp() if job.created_at else now
        table.add_row(job.id, job.job_type, job.status,
                      f"{done:g}/{total:g} {unit}" if total else "", age(now - created))
    out.print(table)
    return 0


def age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f} {unit}"
    return f"{seconds:.0f} s"


# ---- command line ----

# The flags of `submit` itself; any other --name after `submit` is a job option.
SUBMIT_FLAGS = {"--type", "--wait", "--out", "--parallel", "--retry-for", "--priority", "--help",
                "--url", "--api-key"}
# Names a job option cannot have: the library's own arguments of submit().
NOT_OPTIONS = {"file", "idempotency_key", "wait", "priority"}
# `submit --wait N`: a number of seconds (a FILE of that name aside).
SECONDS = re.compile(r"\d+(\.\d*)?|\.\d+")
# Commands that are programs of their own, given the rest of the command line.
PROGRAMS = {"serve": "run the server (jobqueue serve --help: its flags)",
            "worker": "run a worker process of the distributed mode (jobqueue worker --help)"}


def split_options(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Take the job options out of a `submit` command line: `--dpi 100 --width=640` →
    {"dpi": "100", "width": "640"}; everything else is left for argparse."""
    if "submit" not in argv:
        return argv, {}
    start = argv.index("submit") + 1
    kept, options, rest = argv[:start], {}, argv[start:]
    while rest:
        arg = rest.pop(0)
        name, equals, value = arg.partition("=")
        if name == "--wait":  # --wait, or --wait N / --wait=N: see parser()
            if not equals and rest and SECONDS.fullmatch(rest[0]) and not Path(rest[0]).exists():
                value, equals = rest.pop(0), "="
            kept.extend(["--wait", f"--wait-seconds={value}"] if equals else ["--wait"])
            continue
        if not arg.startswith("--") or name in SUBMIT_FLAGS or arg == "--":
            kept.append(arg)
            continue
        if name[2:] in NOT_OPTIONS:
            parser().error(f"{name} is not a job option")
        if not equals:
            if not rest:
                parser().error(f"option {arg} needs a value")
            value = rest.pop(0)
        options[name[2:]] = value
    return kept, options


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        prog="jobqueue",
        description="Submit jobs to a jobqueue server, follow them and download their results; "
                    "or run the server (serve) or a worker (worker).",
        epilog="Any other --name value pair after `submit` is a job option, e.g. --dpi 150 "
               "for pdf2image or --width 1280 for video.")
    main.add_argument("--url", default=os.environ.get("JOBQUEUE_URL", DEFAULT_URL),
                      help=f"server address (default: $JOBQUEUE_URL, else {DEFAULT_URL})")
    main.add_argument("--api-key", default=os.environ.get("JOBQUEUE_API_KEY"),
                      help="sent as X-API-Key, for a server with JOBQUEUE_API_KEYS "
                           "(default: $JOBQUEUE_API_KEY)")
    commands = main.add_subparsers(dest="command", required=True)

    submit = commands.add_parser("submit", help="submit files (or none: the kind's sample)")
    submit.add_argument("files", nargs="*", type=Path, metavar="FILE")
    submit.add_argument("--type", required=True, help="job kind: message, pdf2image, video …")
    submit.add_argument("--wait", action="store_true",
                        help="follow each job with a progress bar until it has finished; "
                             "--wait N: have the server answer once the job has ended or N "
                             "seconds have passed (Prefer: wait=N), and print how it ended or "
                             "its id")
    # --wait N arrives here (split_options): a number of seconds for Prefer: wait.
    submit.add_argument("--wait-seconds", type=float, help=argparse.SUPPRESS)
    submit.add_argument("--priority", type=int, metavar="N",
                        help="-10 to 10 (default 0): higher runs first within the kind")
    submit.add_argument("--out", type=Path,
                        help="download each job's files into OUT/<file stem>/ (implies --wait)")
    submit.add_argument("--parallel", type=int, default=4,
                        help="uploads at once (default %(default)s); all jobs are followed")
    submit.add_argument("--retry-for", type=float, default=600, metavar="SECONDS",
                        help="keep retrying a 503 or 429 this long (default %(default)s)")

    for name, text in (("status", "show a job as JSON (its attempts and estimated start on "
                                  "stderr)"),
                       ("cancel", "cancel or delete a job"),
                       ("retry", "run a failed job again, on its upload")):
        commands.add_parser(name, help=text).add_argument("id")
    wait = commands.add_parser("wait", help="follow a job until it has finished")
    wait.add_argument("id")
    wait.add_argument("--out", type=Path, help="then download its files into OUT")
    download = commands.add_parser("download", help="download a succeeded job's files")
    download.add_argument("id")
    download.add_argument("--out", type=Path, required=True)
    listing = commands.add_parser("list", help="list jobs, newest first")
    listing.add_argument("--status", choices=["queued", "running", *sorted(FINISHED)])
    listing.add_argument("--type", help="only jobs of this kind")
    listing.add_argument("--limit", type=int, default=20)
    for name, text in PROGRAMS.items():  # listed here; main() hands them their arguments
        commands.add_parser(name, help=text, add_help=False)
    return main


COMMANDS = {"wait": run_wait, "download": run_download, "status": run_status,
            "cancel": run_cancel, "retry": run_retry, "list": run_list}


async def run(args: argparse.Namespace, options: dict[str, str]) -> int:
    # submit --retry-for caps both a single Retry-After and all of a job's retries.
    retry_for = getattr(args, "retry_for", 600)
    async with AsyncClient(args.url, api_key=args.api_key, max_retry_seconds=retry_for,
                           max_retry_wait=retry_for, on_retry=announce) as client:
        try:
            if args.command == "submit":
                return await run_submit(client, args, options)
            return await COMMANDS[args.command](client, args)
        except ClientError as error:
            err.print(f"[red]error:[/] {error}", highlight=False)
        return 1


def run_program(name: str, argv: list[str]) -> int:
    """`jobqueue serve` and `jobqueue worker`: loaded only now, so that the client commands
    never import the server. Their usage lines say `jobqueue serve`, `jobqueue worker`."""
    program, sys.argv[0] = sys.argv[0], f"jobqueue {name}"
    try:
        if name == "serve":
            from jobqueue import server

            return server.main(argv) or 0
        from jobqueue import worker

        return worker.main(argv) or 0
    finally:
        sys.argv[0] = program


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PROGRAMS:
        return run_program(argv[0], argv[1:])
    argv, options = split_options(argv)
    args = parser().parse_args(argv)
    if args.command in PROGRAMS:  # after client options, which are not theirs
        parser().error(f"{args.command} comes first: jobqueue {args.command} [its flags]")
    if args.command == "submit" and args.parallel < 1:
        parser().error("--parallel must be at least 1")
    if args.command == "submit" and args.wait_seconds is not None and not (
            0 <= args.wait_seconds < float("inf")):
        parser().error("--wait N must be a number of seconds, 0 or more")
    return asyncio.run(run(args, options))


if __name__ == "__main__":
    sys.exit(main())
