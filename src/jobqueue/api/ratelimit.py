"""Per-client rate limit on job submission, through slowapi's pieces: the routes call
`check_submission`, which counts with the `limits` strategy slowapi is built on and raises
slowapi's RateLimitExceeded; `configure` gives it the app's limit and storage.

The counters live in this process unless JOBQUEUE_RATE_LIMIT_STORAGE names a shared storage
(redis://...): then every API replica counts against the same limit, the wrong-key lockout of
api/access.py included. While that storage cannot be reached, each replica counts alone again
(slowapi's in-memory fallback) rather than refusing or failing requests.
"""

from __future__ import annotations

import logging
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from limits import RateLimitItem, parse_many, storage, strategies
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address
from slowapi.wrappers import Limit

log = logging.getLogger(__name__)

# A shared storage that does not answer within this long is taken as down.
STORAGE_TIMEOUT_SECONDS = 0.5
# After a failure, the shared storage is left alone this long (its calls block the loop for up
# to STORAGE_TIMEOUT_SECONDS while it is down).
RETRY_STORAGE_SECONDS = 5.0


def client_key(request: Request) -> str:
    """Whom a limit counts: the API key when the server has keys (`require_key` ran before
    this), otherwise the client's address."""
    owner = (request.scope.get("state") or {}).get("owner", "")  # access.owner (it imports us)
    return f"key:{owner}" if owner else get_remote_address(request)


class MemoryCounts(storage.MemoryStorage):
    """limits' in-process storage, dropping expired counters once a second rather than
    starting a new timer thread 10 ms after every hit (limits 5.8), which under load competes
    with the event loop for the interpreter. A counter past its window is reset when it is
    next read either way; the sweep only frees the memory of clients that stopped coming."""

    SWEEP_SECONDS = 1.0

    # Overrides MemoryStorage's private __schedule_expiry (name-mangled), which incr() calls.
    def _MemoryStorage__schedule_expiry(self) -> None:
        if not self.timer.is_alive():
            self.timer = threading.Timer(self.SWEEP_SECONDS, self._MemoryStorage__expire_events)
            self.timer.daemon = True
            self.timer.start()


class Counter:
    """A fixed-window counter in the configured storage, counting in this process while that
    storage cannot be reached (the wrong-key lockout uses it)."""

    def __init__(self) -> None:
        self.local = strategies.FixedWindowRateLimiter(MemoryCounts())
        self.shared: strategies.FixedWindowRateLimiter | None = None
        self.down_until = 0.0

    def _call(self, method: str, *args):
        if self.shared is not None and time.monotonic() >= self.down_until:
            try:
                return getattr(self.shared, method)(*args)
            except Exception as error:  # the storage is down: count here meanwhile
                self.down_until = time.monotonic() + RETRY_STORAGE_SECONDS
                log.warning("rate-limit storage unreachable (%s); counting in this process",
                            error)
        return getattr(self.local, method)(*args)

    def test(self, item: RateLimitItem, *identifiers: str) -> bool:
        return self._call("test", item, *identifiers)

    def hit(self, item: RateLimitItem, *identifiers: str) -> bool:
        return self._call("hit", item, *identifiers)

    def get_window_stats(self, item: RateLimitItem, *identifiers: str):
        return self._call("get_window_stats", item, *identifiers)


wrong_keys = Counter()
# Job submissions per client and URL, as slowapi counted them (its key_style "url"): `/put` and
# POST /jobs each, and each job's POST /jobs/{id}/retry apart from every other job's.
submissions = Counter()
_submit_limits: tuple[RateLimitItem, ...] = tuple(parse_many("60/minute"))


def check_submission(request: Request) -> None:
    """Count a submission against JOBQUEUE_RATE_LIMIT, per client and URL path:
    RateLimitExceeded (429) past it.

    slowapi's decorator did this on every call by parsing the limit string again and
    inspecting the signatures of the endpoint and of the key function, about a tenth of a
    no-op /put's time on the event loop. The limit is parsed once (`configure`) and counted
    here through the same `limits` strategy slowapi uses, under the same path it counted by
    (the scope's, so each job's retry URL has a budget of its own), with slowapi's
    exception."""
    key = client_key(request)
    route = request.scope["path"]
    for item in _submit_limits:
        if not submissions.hit(item, key, route):
            request.state.view_rate_limit = (item, (key, route))
            raise RateLimitExceeded(Limit(item, client_key, route, per_method=False,
                                          methods=None, error_message=None, exempt_when=None,
                                          cost=1, override_defaults=False))


def _shared_storage(uri: str) -> storage.Storage:
    options = ({"socket_timeout": STORAGE_TIMEOUT_SECONDS,
                "socket_connect_timeout": STORAGE_TIMEOUT_SECONDS}
               if uri.startswith(("redis://", "rediss://", "redis+unix://")) else {})
    return storage.storage_from_string(uri, **options)


def configure(app: FastAPI, rate_limit: str, storage_uri: str = "") -> None:
    global _submit_limits
    _submit_limits = tuple(parse_many(rate_limit))
    shared = (strategies.FixedWindowRateLimiter(_shared_storage(storage_uri))
              if storage_uri else None)
    for counter in (submissions, wrong_keys):  # a fresh count for each app
        counter.local = strategies.FixedWindowRateLimiter(MemoryCounts())
        counter.shared, counter.down_until = shared, 0.0
    app.add_exception_handler(RateLimitExceeded, rate_limited)


def rate_limited(request: Request, exc: RateLimitExceeded) -> JSONResponse:
    request.app.state.metrics.rate_limited.labels("submit").inc()
    response = JSONResponse(
        {"detail": f"Rate limit exceeded: {exc.detail} per client (per API key when the "
                   "server has keys). "
                   "Wait the number of seconds in the Retry-After header, then try again."},
        status_code=429,
    )
    # Retry-After and X-RateLimit-Limit/-Remaining/-Reset, as slowapi's own headers say them.
    limit, keys = request.state.view_rate_limit
    try:
        reset_at, remaining = submissions.get_window_stats(limit, *keys)
    except Exception:  # the shared storage went away just now
        reset_at, remaining = time.time() + limit.get_expiry(), 0
    response.headers["Retry-After"] = str(max(1, int(reset_at + 1 - time.time())))
    response.headers["X-RateLimit-Limit"] = str(limit.amount)
    response.headers["X-RateLimit-Remaining"] = str(remaining)
    response.headers["X-RateLimit-Reset"] = str(int(reset_at + 1))
    return response
