"""`python -m jobqueue.client`: submit files, follow their progress, download the results.

Talks to a running server over HTTP only (httpx, httpx-sse and rich; nothing of the server is
imported). Exit code 0 when everything asked for worked, 1 when a job failed or the server
refused a request, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import httpx
from httpx_sse import aconnect_sse
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

DEFAULT_URL = "http://127.0.0.1:8000"
FINISHED = {"succeeded", "failed", "cancelled"}
# Answers that mean "not now": the client waits as Retry-After says and sends again.
RETRY_STATUSES = {429, 503}
# Reconnects of an event stream that broke before its job finished (a server restart).
STREAM_RETRIES = 5

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class Refused(Exception):
    """The server answered with an error; the message is its `detail`."""


def detail_of(response: httpx.Response) -> str:
    try:
        detail = response.json()["detail"]
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.reason_phrase}"
    if isinstance(detail, list):  # validation errors: where and what
        detail = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in detail)
    return f"{response.status_code}: {detail}"


def check(response: httpx.Response, *ok: int) -> httpx.Response:
    if response.status_code not in (ok or (200,)):
        raise Refused(detail_of(response))
    return response


async def check_stream(response: httpx.Response) -> None:
    """`check` for a streamed response, whose error body must be read first."""
    if response.status_code != 200:
        await response.aread()
        raise Refused(detail_of(response))


def retry_after(response: httpx.Response) -> float:
    try:
        return max(0.5, float(response.headers.get("Retry-After", 1)))
    except ValueError:
        return 1.0


# ---- submitting ----

@dataclass
class Submission:
    """One job this run submits: its input file (None for the bundled sample or no file)."""

    path: Path | None
    label: str
    # Sent as Idempotency-Key: a retry after a lost answer gets this job back, not a second.
    idempotency_key: str = field(default_factory=lambda: str(uuid.uuid4()))
    job_id: str | None = None
    view: dict = field(default_factory=dict)
    error: str | None = None


async def submit(client: httpx.AsyncClient, kind: str, options: dict[str, str],
                 item: Submission, retry_for: float) -> None:
    """POST /jobs until it is accepted; 503 and 429 wait as Retry-After says, a lost
    connection a second (the same Idempotency-Key: never two jobs for one file)."""
    deadline = time.monotonic() + retry_for
    headers = {"Idempotency-Key": item.idempotency_key}
    while True:
        try:
            if item.path is None:
                response = await client.post("/jobs", json={"jobType": kind, **options},
                                             headers=headers)
            else:
                with item.path.open("rb") as upload:
                    response = await client.post(
                        "/jobs", data={"jobType": kind, **options}, headers=headers,
                        files={"file": (item.path.name, upload, "application/octet-stream")})
        except httpx.TransportError as error:
            if time.monotonic() + 1 >= deadline:
                raise
            err.print(f"[yellow]{item.label}: {error or type(error).__name__}; retrying in 1 s")
            await asyncio.sleep(1)
            continue
        wait = retry_after(response)
        if response.status_code in RETRY_STATUSES and time.monotonic() + wait < deadline:
            err.print(f"[yellow]{item.label}: {detail_of(response)}; retrying in {wait:g} s")
            await asyncio.sleep(wait)
            continue
        item.job_id = check(response, 202).json()["id"]
        return


async def follow(client: httpx.AsyncClient, job_id: str, progress: Progress,
                 task: TaskID, label: str) -> dict:
    """Follow the job's event stream, moving its progress bar; returns its final state."""
    view: dict = {}
    for attempt in range(STREAM_RETRIES + 1):
        try:
            async with aconnect_sse(client, "GET", f"/jobs/{job_id}/events",
                                    timeout=httpx.Timeout(30, read=None)) as events:
                await check_stream(events.response)
                async for event in events.aiter_sse():
                    view = event.json()
                    done, total = view["progress"]["done"], view["progress"]["total"]
                    if view["status"] == "succeeded":
                        done = total = total or 1
                    unit = view["progress"]["unit"]
                    progress.update(task, completed=done, total=total or None,
                                    description=f"{label} [dim]{view['status']}",
                                    amount=f"{done:g}/{total:g} {unit}" if total else "")
                    if view["status"] in FINISHED:
                        return view
        except httpx.TransportError:
            if attempt == STREAM_RETRIES:
                raise
            await asyncio.sleep(1 + attempt)
    raise Refused(f"the event stream of job {job_id} ended before the job finished")


async def download(client: httpx.AsyncClient, view: dict, folder: Path) -> list[Path]:
    """Save a succeeded job's output files into `folder`, one by one (PNG pages, the mp4);
    a job without files (message) makes no folder."""
    saved = []
    for url in view["result"]["files"]:
        folder.mkdir(parents=True, exist_ok=True)
        name = PurePosixPath(urlparse(url).path).name
        if not name or name.startswith("."):
            raise Refused(f"the server sent an unusable file name in {url!r}")
        target = folder / name
        # A path (the server's links are, unless JOBQUEUE_PUBLIC_URL is set) is resolved
        # against the server's address, as a browser would.
        async with client.stream("GET", client.base_url.join(url)) as response:
            await check_stream(response)
            with target.open("wb") as file:
                async for chunk in response.aiter_bytes():
                    file.write(chunk)
        saved.append(target)
    return saved


def report(item: Submission, files: list[Path] | None) -> bool:
    """One line per job on stdout; True when it succeeded."""
    if item.error:
        err.print(f"[red]✘ {item.label}: {item.error}")
        return False
    status = item.view.get("status", "queued")
    if status == "succeeded":
        count = f"{len(files)} file{'s' if len(files) > 1 else ''}" if files else ""
        where = f" → {files[0].parent}/ ({count})" if files else ""
        data = "" if files else f" {json.dumps(item.view['result']['data'])}"
        out.print(f"[green]✔[/] {item.label}: {item.job_id} succeeded{where}{data}",
                  highlight=False)
        return True
    if status in FINISHED:
        reason = f": {item.view['error']}" if item.view.get("error") else ""
        err.print(f"[red]✘ {item.label}: {item.job_id} {status}{reason}", highlight=False)
        return False
    out.print(f"{item.job_id}  {item.label}", highlight=False)  # submitted, not waited for
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


async def run_submit(client: httpx.AsyncClient, args: argparse.Namespace,
                     options: dict[str, str]) -> int:
    for path in args.files:
        if not path.is_file():
            raise Refused(f"no such file: {path}")
    items = [Submission(path, path.name) for path in args.files] or [
        Submission(None, f"{args.type} (no file)")]
    wait = args.wait or args.out is not None
    folders = output_folders(items, args.out or Path("."))
    downloaded: dict[int, list[Path]] = {}
    slots = asyncio.Semaphore(args.parallel)

    with progress_bars(enabled=wait) as progress:
        async def one(index: int, item: Submission) -> None:
            async with slots:  # at most --parallel uploads and streams at once
                task = progress.add_task(item.label, total=None, amount="")
                try:
                    await submit(client, args.type, options, item, args.retry_for)
                    if not wait:
                        return
                    item.view = await follow(client, item.job_id, progress, task, item.label)
                    if item.view["status"] == "succeeded" and args.out is not None:
                        downloaded[index] = await download(client, item.view, folders[index])
                except (Refused, httpx.HTTPError, OSError) as error:
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

async def run_wait(client: httpx.AsyncClient, args: argparse.Namespace) -> int:
    item = Submission(None, args.id[:8], job_id=args.id)
    check(await client.get(f"/jobs/{args.id}"))  # a clear 404 before any stream
    with progress_bars(enabled=True) as progress:
        task = progress.add_task(item.label, total=None, amount="")
        item.view = await follow(client, args.id, progress, task, item.label)
    files = None
    if args.out is not None and item.view["status"] == "succeeded":
        files = await download(client, item.view, args.out)
    return 0 if report(item, files) else 1


async def run_download(client: httpx.AsyncClient, args: argparse.Namespace) -> int:
    view = check(await client.get(f"/jobs/{args.id}")).json()
    if view["status"] != "succeeded":
        reason = f": {view['error']}" if view.get("error") else ""
        raise Refused(f"job {args.id} is {view['status']}{reason}; only a succeeded job has "
                      "files to download")
    files = await download(client, view, args.out)
    if not files:
        out.print_json(data=view["result"]["data"])
    for path in files:
        out.print(str(path), highlight=False)
    return 0


async def run_status(client: httpx.AsyncClient, args: argparse.Namespace) -> int:
    out.print_json(data=check(await client.get(f"/jobs/{args.id}")).json())
    return 0


async def run_cancel(client: httpx.AsyncClient, args: argparse.Namespace) -> int:
    view = check(await client.delete(f"/jobs/{args.id}")).json()
    out.print(f"{view['id']} {view['status']}", highlight=False)
    return 0


async def run_list(client: httpx.AsyncClient, args: argparse.Namespace) -> int:
    query = {"limit": args.limit}
    if args.status:
        query["status"] = args.status
    if args.type:
        query["jobType"] = args.type
    items = check(await client.get("/jobs", params=query)).json()["items"]
    table = Table(box=None)
    # An id is what a reader copies: never cut short, however narrow the terminal or pipe
    # (rich shortens the other columns instead).
    table.add_column("id", no_wrap=True, min_width=36)
    for column in ("type", "status", "progress", "age"):
        table.add_column(column, no_wrap=True)
    now = time.time()
    for view in items:
        done, total, unit = (view["progress"][key] for key in ("done", "total", "unit"))
        created = datetime.fromisoformat(view["createdAt"]).timestamp()
        table.add_row(view["id"], view["jobType"], view["status"],
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
SUBMIT_FLAGS = {"--type", "--wait", "--out", "--parallel", "--retry-for", "--help", "--url",
                "--api-key"}


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
        if not arg.startswith("--") or name in SUBMIT_FLAGS or arg == "--":
            kept.append(arg)
            continue
        if not equals:
            if not rest:
                parser().error(f"option {arg} needs a value")
            value = rest.pop(0)
        options[name[2:]] = value
    return kept, options


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        prog="python -m jobqueue.client",
        description="Submit jobs to a jobqueue server, follow them and download their results.",
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
                        help="follow each job with a progress bar until it has finished")
    submit.add_argument("--out", type=Path,
                        help="download each job's files into OUT/<file stem>/ (implies --wait)")
    submit.add_argument("--parallel", type=int, default=4,
                        help="uploads at once (default %(default)s); all jobs are followed")
    submit.add_argument("--retry-for", type=float, default=600, metavar="SECONDS",
                        help="keep retrying a 503 or 429 this long (default %(default)s)")

    for name, text in (("status", "show a job as JSON"), ("cancel", "cancel or delete a job")):
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
    return main


COMMANDS = {"wait": run_wait, "download": run_download, "status": run_status,
            "cancel": run_cancel, "list": run_list}


async def run(args: argparse.Namespace, options: dict[str, str]) -> int:
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, timeout=httpx.Timeout(60),
                                 headers=headers) as client:
        try:
            if args.command == "submit":
                return await run_submit(client, args, options)
            return await COMMANDS[args.command](client, args)
        except Refused as error:
            err.print(f"[red]error:[/] {error}", highlight=False)
        except httpx.TransportError as error:
            err.print(f"[red]error:[/] cannot reach {args.url}: {error or type(error).__name__}",
                      highlight=False)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv, options = split_options(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.command == "submit" and args.parallel < 1:
        parser().error("--parallel must be at least 1")
    return asyncio.run(run(args, options))


if __name__ == "__main__":
    sys.exit(main())
