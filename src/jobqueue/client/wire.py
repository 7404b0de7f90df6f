"""What Client and AsyncClient share, none of it doing I/O: request bodies, the retry rules and
their bookkeeping, and reading answers."""

from __future__ import annotations

import email.utils
import math
import os
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Union
from urllib.parse import unquote, urlsplit

import httpx

from jobqueue.client.errors import (
    ClientError,
    JobCancelled,
    JobFailed,
    Refused,
    RetriesExhausted,
    Unreachable,
)
from jobqueue.client.models import CANCELLED, FAILED, Job, Retry

DEFAULT_URL = "http://127.0.0.1:8000"
# Answers that mean "not now": waited out as their Retry-After says, then sent again.
RETRY_STATUSES = frozenset({429, 503})
# A 503 or 429 without a Retry-After is sent again after this long.
DEFAULT_RETRY_AFTER = 1.0
# The shortest wait before a 503 or 429 is sent again, whatever its Retry-After says (0, or a
# date already passed): never a busy loop.
MIN_RETRY_WAIT = 0.1
# Waits between resends after a network error: 0.5 s, 1 s, 2 s, ... at most this.
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 8.0
# Network errors that mean the request never reached the server, so that even a request
# that is not safe to repeat (POST /put, DELETE) may be sent again.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)

# An upload: a path, the bytes themselves, or an open binary file.
Upload = Union[str, "os.PathLike[str]", bytes, IO[bytes]]
JobRef = Union[Job, str]


def body_options(options: Mapping[str, Any], priority: int | None) -> dict[str, Any]:
    """A job's fields: the kind's options, and `priority` when one is asked for."""
    if priority is None:
        return dict(options)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority must be an integer (-10 to 10): {priority!r}")
    return {**options, "priority": priority}


def job_id(job: JobRef) -> str:
    return job.id if isinstance(job, Job) else job


def make_key(given: str | None) -> str:
    """The Idempotency-Key of one submit: the caller's, or a new uuid4."""
    return given if given is not None else str(uuid.uuid4())


API_KEY_HEADER = "X-API-Key"


def headers_for(api_key: str | None) -> dict[str, str]:
    return {API_KEY_HEADER: api_key} if api_key else {}


DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: httpx.URL) -> tuple[str, str, int | None]:
    """A URL's scheme, host and port (the default port made explicit)."""
    return url.scheme, url.host, url.port or DEFAULT_PORTS.get(url.scheme)


def keep_key_at_home(request: httpx.Request, base_url: httpx.URL) -> None:
    """Take the API key off a request to anywhere but the server's own origin (an output
    file's absolute link may name another host)."""
    if origin(request.url) != origin(base_url):
        request.headers.pop(API_KEY_HEADER, None)


# ---- request bodies ----

def form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class Body:
    """The body of POST /put or POST /jobs, made again for each attempt: JSON without a file,
    multipart/form-data with one (a path is opened anew, a seekable file rewound)."""

    def __init__(self, job_type: str, file: Upload | None, options: Mapping[str, Any]):
        self.fields = {**options, "jobType": job_type}
        self.file = file
        self._start: int | None = None
        self._sent = False
        if file is not None and hasattr(file, "read"):
            try:
                self._start = file.tell() if file.seekable() else None
            except OSError:
                self._start = None

    @property
    def resendable(self) -> bool:
        """False once a file that cannot be rewound has been sent."""
        return not (self._sent and hasattr(self.file, "read") and self._start is None)

    def open(self, stack: ExitStack) -> dict[str, Any]:
        """Keyword arguments for httpx's build_request; files opened here are closed by
        `stack`."""
        self._sent = True
        if self.file is None:
            return {"json": self.fields}
        data = {name: form_value(value) for name, value in self.fields.items()}
        file = self.file
        if isinstance(file, (bytes, bytearray)):
            upload: Any = bytes(file)
            name = "upload"
        elif hasattr(file, "read"):
            if self._start is not None:
                file.seek(self._start)
            upload = file
            name = Path(str(getattr(file, "name", "upload"))).name or "upload"
        else:
            path = Path(file)
            upload = stack.enter_context(path.open("rb"))
            name = path.name
        return {"data": data, "files": {"file": (name, upload, "application/octet-stream")}}


# ---- Prefer (RFC 7240) ----

PREFER_HEADER = "Prefer"


def seconds_text(seconds: float, name: str) -> str:
    """A number of seconds as a Prefer header's `wait=` takes it (a whole number as one);
    ValueError for a negative or endless one, naming the argument."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
            or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{name} must be a number of seconds, 0 or more: {seconds!r}")
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


def prefer_wait(seconds: float | None) -> dict[str, str]:
    """POST /jobs' header for `submit(wait=N)`: `Prefer: wait=N` (none without a wait)."""
    if seconds is None:
        return {}
    return {PREFER_HEADER: f"wait={seconds_text(seconds, 'wait')}"}


def prefer_async(seconds: float | None) -> dict[str, str]:
    """POST /put's header for `put(respond_async_after=N)`: `Prefer: respond-async, wait=N`."""
    if seconds is None:
        return {}
    return {PREFER_HEADER: f"respond-async, wait={seconds_text(seconds, 'respond_async_after')}"}


def request_timeout(base: httpx.Timeout, seconds: float | None) -> httpx.Timeout:
    """The timeout of a request the server may hold `seconds` (Prefer: wait): the client's,
    its read longer by that much."""
    if seconds is None or base.read is None:
        return base
    return httpx.Timeout(connect=base.connect, read=base.read + seconds, write=base.write,
                         pool=base.pool)


# ---- retries ----

def retry_after(response: httpx.Response) -> float | None:
    """The answer's Retry-After in seconds (a number or an HTTP date), None without one."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class Policy:
    """How a client retries (its constructor's arguments)."""

    max_retry_seconds: float
    max_retry_wait: float
    network_retries: int
    on_retry: Callable[[Retry], Any] | None


class Attempts:
    """The retries of one call: when to wait and send again, and when to give up.

    A 503 or 429 is waited out for as long as its Retry-After says (never less, and at least
    MIN_RETRY_WAIT: a Retry-After of 0 makes no busy loop), unless that is longer than
    `max_retry_wait` or would end past `max_retry_seconds` from the call's start: then
    RetriesExhausted. A network error is retried `network_retries` times in a row
    at most, 0.5 s, 1 s, 2 s … apart, and only when sending again is safe (`resendable`):
    otherwise, or past the caps, Unreachable."""

    def __init__(self, policy: Policy, method: str, url: str, key: str | None = None):
        self.policy = policy
        self.method = method
        self.url = url
        self.key = key
        self.attempts = 0
        self.network_failures = 0
        self.started = time.monotonic()

    def sending(self) -> None:
        self.attempts += 1

    def answered(self) -> None:
        self.network_failures = 0

    def _fits(self, wait: float) -> bool:
        return time.monotonic() - self.started + wait <= self.policy.max_retry_seconds

    def after_refusal(self, response: httpx.Response) -> Retry | None:
        """What to do about an answer: None to take it as it is, a Retry to wait and resend;
        RetriesExhausted when it is a 503 or 429 the caps do not let be waited out. An answer
        with a Location is never retried: it names a job that exists (a /put whose job ran
        and ended, Unavailable too, is its status with the job's Location), so sending the
        request again would run that job again."""
        if response.status_code not in RETRY_STATUSES or "Location" in response.headers:
            return None
        asked = retry_after(response)
        wait = DEFAULT_RETRY_AFTER if asked is None else max(MIN_RETRY_WAIT, asked)
        refusal = Refused.of(response)
        if wait > self.policy.max_retry_wait or not self._fits(wait):
            raise RetriesExhausted(refusal.status, refusal.detail, response, self.attempts)
        return Retry(self.method, self.url, self.attempts, response.status_code,
                     refusal.message, wait, asked, self.key)

    def after_network_error(self, error: httpx.TransportError, resendable: bool) -> Retry:
        """A Retry to wait and resend after a request got no answer, or Unreachable."""
        self.network_failures += 1
        wait = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.network_failures - 1))
        if (not resendable or self.network_failures > self.policy.network_retries
                or not self._fits(wait)):
            raise unreachable(self.url, error) from error
        return Retry(self.method, self.url, self.attempts, None, describe(error), wait, None,
                     self.key)


def describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


def unreachable(url: str, error: BaseException) -> Unreachable:
    return Unreachable(f"cannot reach {url}: {describe(error)}")


# ---- answers ----

def check(response: httpx.Response, *ok: int) -> httpx.Response:
    """The answer if its status is one of `ok` (200 by default), else Refused."""
    if response.status_code not in (ok or (200,)):
        raise Refused.of(response)
    return response


def file_name(url: str) -> str:
    """The name to save an output file's link under: its last path segment, refused when it
    could step out of the folder or mean something else than a plain name to a file system
    (a slash or backslash, `..`, a leading dot, a colon: a Windows drive or stream, a
    control character such as NUL)."""
    name = unquote(PurePosixPath(urlsplit(url).path).name)
    if (not name or name.startswith(".") or ".." in name
            or any(char in name for char in "/\\:") or any(ord(char) < 32 for char in name)):
        raise ClientError(f"the server sent an unusable file name in {url!r}")
    return name


def file_names(urls: list[str]) -> list[tuple[str, str]]:
    """Each output file's link with the name it is saved under (file_name), checked all
    before anything is written: ClientError for an unusable name, or for two links of one
    name (compared without case, as a Windows or macOS folder does), which would overwrite
    each other."""
    named = [(url, file_name(url)) for url in urls]
    seen: dict[str, str] = {}
    for url, name in named:
        if name.casefold() in seen:
            raise ClientError(f"the server sent two files named {name!r}: "
                              f"{seen[name.casefold()]!r} and {url!r}")
        seen[name.casefold()] = url
    return named


# How often wait() asks for the job when it cannot follow its event stream: from the first
# to the longest interval, doubling.
POLL_FIRST, POLL_MAX = 0.2, 2.0


def ended(job: Job) -> Job:
    """The job if it succeeded; JobFailed or JobCancelled if it ended otherwise."""
    if job.status == FAILED:
        raise JobFailed(job)
    if job.status == CANCELLED:
        raise JobCancelled(job)
    return job


def not_downloadable(job: Job) -> ClientError:
    return ClientError(f"job {job.id} is {job.status}; only a succeeded job has files to "
                       "download")
