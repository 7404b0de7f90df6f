"""AsyncClient: the jobqueue API from asyncio code, line for line the Client of sync.py with
await."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import httpx
from httpx_sse import EventSource

from jobqueue.client.errors import JobCancelled, JobFailed, Refused, Unreachable
from jobqueue.client.models import CANCELLED, FAILED, Event, Job, Result, Retry
from jobqueue.client.wire import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    DEFAULT_URL,
    NOT_SENT,
    POLL_FIRST,
    POLL_MAX,
    RETRY_STATUSES,
    Attempts,
    Body,
    JobRef,
    Policy,
    Upload,
    body_options,
    check,
    ended,
    file_names,
    headers_for,
    job_id,
    keep_key_at_home,
    make_key,
    not_downloadable,
    prefer_async,
    prefer_wait,
    request_timeout,
)


class AsyncClient:
    """The jobqueue API over HTTP (httpx), from asyncio code: Client's methods, awaited
    (events() is an async iterator).

    `url` is the server's address, `api_key` is sent as X-API-Key, `timeout` bounds each
    request (put() and the event streams wait for their job as long as it takes). A 503 or
    429 is sent again after its Retry-After, unless that is over `max_retry_wait` seconds or
    would end past `max_retry_seconds` from the call's start (then RetriesExhausted); a
    request that got no answer is sent again up to `network_retries` times in a row when that
    is safe. `on_retry(Retry)` is called before each wait (and awaited if it returns an
    awaitable). `transport` is httpx's (tests pass a mock or a wrapper). Use it as an async
    context manager, or call aclose()."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout: float = 60.0, max_retry_seconds: float = 600.0,
                 max_retry_wait: float = 300.0, network_retries: int = 3,
                 on_retry: Callable[[Retry], Any] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.url = url
        self._policy = Policy(max_retry_seconds, max_retry_wait, network_retries, on_retry)
        self._timeout = httpx.Timeout(timeout)
        self._waiting = httpx.Timeout(timeout, read=None)  # for /put and event streams
        self._http = httpx.AsyncClient(base_url=url, headers=headers_for(api_key),
                                       timeout=self._timeout, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- jobs ----

    async def put(self, job_type: str = "message", file: Upload | None = None, *,
            priority: int | None = None, respond_async_after: float | None = None,
            **options: Any) -> Result | Job:
        """POST /put: run a job and wait for its result. `file` is the input (a path, bytes or
        an open binary file; None: the kind's sample, or none for message); `options` are the
        kind's (dpi=150, width=1280, seconds=2, data="hi"); `priority` (-10 to 10) runs it
        before the kind's lower ones. JobFailed when the job ran and failed (on a server that
        names the job in its answer), Refused for any other error.

        `respond_async_after=N` sends `Prefer: respond-async, wait=N`: a job not ended after N
        seconds is answered 202 and returned as a Job (queued or running, kept like one of
        submit(): wait() for it, download() its files); one that ended sooner is its Result
        (or error) as without it."""
        body = Body(job_type, file, body_options(options, priority))
        response = await self._send("POST", "/put", body=body, resendable=False,
                                    headers=prefer_async(respond_async_after),
                                    timeout=self._waiting)
        if response.status_code == 200:
            return Result.from_put(response.json())
        if response.status_code == 202 and respond_async_after is not None:
            return Job.from_json(response.json())  # running on: a kept job
        raise await self._put_error(response)

    async def _put_error(self, response: httpx.Response) -> Exception:
        refused = Refused.of(response)
        location = response.headers.get("Location")
        if location and response.status_code >= 400:
            try:
                job = await self.get(PurePosixPath(urlsplit(location).path).name)
            except (Refused, Unreachable):
                return refused
            if job.status in (FAILED, CANCELLED):
                return (JobFailed if job.status == FAILED else JobCancelled)(job)
        return refused

    async def submit(self, job_type: str = "message", file: Upload | None = None, *,
               idempotency_key: str | None = None, priority: int | None = None,
               wait: float | None = None, **options: Any) -> Job:
        """POST /jobs: queue a job and return it at once (status queued, with its links).
        Every submit carries an Idempotency-Key (`idempotency_key`, else a new uuid4) and its
        retries the same one, so a retried submit never makes a second job. `priority` (-10 to
        10) runs it before the kind's lower ones.

        `wait=N` sends `Prefer: wait=N`: the server holds the answer up to N seconds (at most
        the kind's timeout) and a job that ended meanwhile comes back finished, with its result
        or error, and without links; a failed or cancelled one is returned too, not raised
        (wait() raises). One that has not ended comes back as without `wait`."""
        key = make_key(idempotency_key)
        response = await self._send("POST", "/jobs",
                                    body=Body(job_type, file, body_options(options, priority)),
                                    headers={"Idempotency-Key": key, **prefer_wait(wait)},
                                    timeout=request_timeout(self._timeout, wait), key=key)
        return Job.from_json(check(response, 200, 202).json())

    async def retry(self, job: JobRef) -> Job:
        """POST /jobs/{id}/retry: run a failed job again, on its upload, as a new attempt; the
        job, queued, with its links. Refused 409 for a job that has not failed, 410 once its
        upload is gone (JOBQUEUE_RESULT_TTL), 404 for an unknown one."""
        response = await self._send("POST", f"/jobs/{job_id(job)}/retry", resendable=False)
        return Job.from_json(check(response, 202).json())

    async def get(self, job: JobRef) -> Job:
        """GET /jobs/{id}: the job now."""
        return Job.from_json(check(await self._send("GET", f"/jobs/{job_id(job)}")).json())

    async def jobs(self, status: str | None = None, job_type: str | None = None, limit: int = 20,
             offset: int = 0) -> list[Job]:
        """GET /jobs: the caller's jobs, newest first (a result has its files, not its data)."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        if job_type:
            params["jobType"] = job_type
        answer = check(await self._send("GET", "/jobs", params=params)).json()
        return [Job.from_json(item) for item in answer["items"]]

    def events(self, job: JobRef) -> AsyncIterator[Event]:
        """GET /jobs/{id}/events: an Event per change of the job, from its state now to its
        final one. A stream that breaks before the end is opened again (a repeat of the last
        state is skipped)."""
        return self._events(job_id(job), retry_refusals=True)

    async def wait(self, job: JobRef) -> Job:
        """Until the job has finished: the succeeded job, or JobFailed / JobCancelled. Follows
        the event stream; when the server has no stream to spare (503) or the stream keeps
        breaking, asks GET /jobs/{id} instead."""
        return ended(await self._follow(job_id(job)))

    async def cancel(self, job: JobRef) -> Job:
        """Stop an unfinished job: a queued one never starts, a running one is stopped; the
        job as DELETE /jobs/{id} answers it (cancelled, or still running when it takes the
        server more than 5 s to stop it). A finished job is left alone and returned as it is.
        (The API has one route for both: DELETE on a finished job deletes it, so a job that
        finishes between this call's look and its DELETE is deleted.)"""
        current = await self.get(job)
        if current.finished:
            return current
        return Job.from_json(check(await self._send("DELETE", f"/jobs/{current.id}",
                                                    resendable=False)).json())

    async def delete(self, job: JobRef) -> Job:
        """Delete a job and its files; an unfinished one is cancelled first (DELETE /jobs/{id}
        cancels an unfinished job and deletes a finished one: this sends it until the job is
        gone). Returns the job as it ended."""
        ident = job_id(job)
        last = Job.from_json(check(await self._send("DELETE", f"/jobs/{ident}",
                                                    resendable=False)).json())
        try:
            last = await self.get(ident)
        except Refused as error:
            if error.status == 404:  # that DELETE deleted it
                return last
            raise
        if not last.finished:  # still stopping
            last = await self._follow(ident)
        try:
            check(await self._send("DELETE", f"/jobs/{ident}", resendable=False))
        except Refused as error:
            if error.status != 404:  # 404: deleted meanwhile, by someone else
                raise
        return last

    async def download(self, job: JobRef | Result, folder: str | Path) -> list[Path]:
        """Save a succeeded job's output files into `folder` (made if needed), one file per
        link (PNG pages, the mp4), each written to <name>.part and renamed once whole. A job
        without files (message) makes no folder and returns []. JobFailed / JobCancelled for a
        job that ended so, ClientError for one not finished yet."""
        if isinstance(job, Result):
            files = job.files
        else:
            current = job
            if not (isinstance(job, Job) and job.result is not None):
                current = await self.get(job)
            if not current.succeeded:
                if current.finished:
                    ended(current)
                raise not_downloadable(current)
            files = current.result.files
        folder = Path(folder)
        saved = []
        for url, name in file_names(files):  # all checked before anything is written
            target = folder / name
            folder.mkdir(parents=True, exist_ok=True)
            await self._save(url, target)
            saved.append(target)
        return saved

    # ---- HTTP ----

    async def _save(self, url: str, target: Path) -> None:
        # A link is resolved against the server's address as a browser would, so a server
        # mounted under a prefix (whose links carry it) is not given it twice. The API key
        # goes only to the server's own origin (_send).
        absolute = str(self._http.base_url.join(url))
        part = target.with_name(target.name + ".part")
        attempts = Attempts(self._policy, "GET", absolute)
        try:
            while True:
                response = check(await self._send("GET", absolute, stream=True))
                try:
                    with part.open("wb") as out:
                        async for chunk in response.aiter_bytes():
                            out.write(chunk)
                    break
                except httpx.TransportError as error:  # cut off: GET it again
                    retry = attempts.after_network_error(error, resendable=True)
                finally:
                    await response.aclose()
                await self._retrying(retry)
            part.replace(target)
        finally:
            part.unlink(missing_ok=True)

    async def _follow(self, ident: str) -> Job:
        """The job's final state: from its event stream, else by asking for it."""
        last = None
        try:
            async for event in self._events(ident, retry_refusals=False):
                last = event.job
            return last  # the stream ends after the final state
        except Refused as error:
            if error.status not in RETRY_STATUSES:
                raise
        except Unreachable:
            pass
        interval = POLL_FIRST
        while not (last := await self.get(ident)).finished:
            await asyncio.sleep(interval)
            interval = min(POLL_MAX, interval * 2)
        return last

    async def _events(self, ident: str, retry_refusals: bool) -> AsyncIterator[Event]:
        path = f"/jobs/{ident}/events"
        last: Job | None = None
        breaks = 0
        while True:
            response = check(await self._send("GET", path, stream=True,
                                              timeout=self._waiting,
                                              retry_refusals=retry_refusals))
            try:
                async for sse in EventSource(response).aiter_sse():
                    if not sse.data:
                        continue
                    job = Job.from_json(json.loads(sse.data))
                    breaks = 0
                    if last is not None and job.raw == last.raw:
                        continue  # the state it had when the stream broke
                    last = job
                    yield Event(job)
                    if job.finished:
                        return
                problem = "the event stream ended before the job finished"
            except httpx.TransportError as error:
                problem = str(error) or type(error).__name__
            finally:
                await response.aclose()
            breaks += 1
            wait = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (breaks - 1))
            if breaks > self._policy.network_retries:
                raise Unreachable(f"cannot follow job {ident}: {problem}")
            await self._retrying(Retry("GET", str(self._http.base_url.join(path)), breaks,
                                       None, problem, wait))

    async def _send(self, method: str, url: str, *, body: Body | None = None,
              resendable: bool = True, retry_refusals: bool = True, stream: bool = False,
              key: str | None = None, **request: Any) -> httpx.Response:
        """Send a request, retrying as Attempts says. `resendable`: the request may be sent
        again after a network error even when it may have reached the server (GET, and
        POST /jobs with its Idempotency-Key); otherwise only when it never got there. An
        error answer is returned read, even when streamed; one with a Location is never
        sent again (Attempts.after_refusal). The API key is sent to the server's origin
        only."""
        attempts = Attempts(self._policy, method, str(self._http.base_url.join(url)), key)
        while True:
            with ExitStack() as files:
                built = self._http.build_request(method, url, **request,
                                                 **(body.open(files) if body else {}))
                keep_key_at_home(built, self._http.base_url)
                attempts.sending()
                try:
                    response = await self._http.send(built, stream=stream)
                    if response.status_code >= 400:
                        try:
                            await response.aread()
                        finally:
                            await response.aclose()
                except httpx.TransportError as error:
                    safe = ((resendable or isinstance(error, NOT_SENT))
                            and (body is None or body.resendable))
                    retry = attempts.after_network_error(error, safe)
                else:
                    attempts.answered()
                    retry = attempts.after_refusal(response) if retry_refusals else None
                    if retry is None:
                        return response
            await self._retrying(retry)

    async def _retrying(self, retry: Retry) -> None:
        if self._policy.on_retry is not None:
            told = self._policy.on_retry(retry)
            if inspect.isawaitable(told):
                await told
        await asyncio.sleep(retry.wait)
