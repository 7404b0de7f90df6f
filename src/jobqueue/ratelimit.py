"""Per-client rate limit on job submission, through slowapi.

slowapi's decorator needs its Limiter when the routes are defined, before `create_app` has
settings, so the limiter is module-level and `configure` gives it the app's limit.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from slowapi import Limiter
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address



def client_key(request: Request) -> str:
    """Whom a limit counts: the API key when the server has keys (`require_key` ran before
    this), otherwise the client's address."""
    owner = getattr(request.state, "owner", "")
    return f"key:{owner}" if owner else get_remote_address(request)


# No rate-limit headers on answers within the limit (slowapi would add Retry-After even to a
# 202); a 429 gets them from rate_limited below.
limiter = Limiter(key_func=client_key, headers_enabled=False)
_submit_limit = "60/minute"


def submit_limit() -> str:
    """The limit on job submissions per client (`JOBQUEUE_RATE_LIMIT`); slowapi asks per request."""
    return _submit_limit


def configure(app: FastAPI, rate_limit: str) -> None:
    global _submit_limit
    _submit_limit = rate_limit
    limiter.reset()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, rate_limited)


def rate_limited(request: Request, exc: RateLimitExceeded) -> JSONResponse:
    response = JSONResponse(
        {"detail": f"Rate limit exceeded: {exc.detail} per client (per API key when the "
                   "server has keys). "
                   "Wait the number of seconds in the Retry-After header, then try again."},
        status_code=429,
    )
    # Retry-After and X-RateLimit-Limit/-Remaining/-Reset, as slowapi's own headers say them.
    limit, keys = request.state.view_rate_limit
    reset_at, remaining = limiter.limiter.get_window_stats(limit, *keys)
    response.headers["Retry-After"] = str(max(1, int(reset_at + 1 - time.time())))
    response.headers["X-RateLimit-Limit"] = str(limit.amount)
    response.headers["X-RateLimit-Remaining"] = str(remaining)
    response.headers["X-RateLimit-Reset"] = str(int(reset_at + 1))
    return response
