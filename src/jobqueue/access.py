"""Optional API keys (JOBQUEUE_API_KEYS): who may call, and whose jobs each caller sees.

Each key is its own tenant: its jobs are stored with `owner_of(key)` (a hash, never the key)
and another key's job ids answer 404. Keys arrive in the `X-API-Key` header; GET requests may
carry one in the `jobqueue_api_key` cookie instead, which is how the dashboard's <img> and
EventSource requests, which cannot set headers, get through.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader

HEADER = "X-API-Key"
COOKIE = "jobqueue_api_key"

api_key_header = APIKeyHeader(
    name=HEADER, auto_error=False,
    description="One of JOBQUEUE_API_KEYS; needed only when the server has keys set.")


def owner_of(key: str) -> str:
    """The name a key's jobs are stored under: a hash, so the store never holds a key."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def is_valid(presented: str, keys: list[str]) -> bool:
    """Compare against every key in constant time, so timing tells nothing about any of them."""
    valid = False
    for key in keys:
        valid |= hmac.compare_digest(presented.encode(), key.encode())
    return valid


async def require_key(request: Request, header: str | None = Security(api_key_header)) -> str:
    """Dependency of every route that touches jobs: the caller's owner name, or 401."""
    keys = request.app.state.settings.api_key_list
    if not keys:
        request.state.owner = ""
        return ""
    presented = header or (request.cookies.get(COOKIE) if request.method == "GET" else None)
    if not presented or not is_valid(presented, keys):
        raise HTTPException(401, f"This server needs an API key: send one of its keys in the "
                                 f"{HEADER} header." if not presented else
                                 f"The {HEADER} is not one of this server's keys.",
                            headers={"WWW-Authenticate": HEADER})
    request.state.owner = owner_of(presented)
    return request.state.owner


def owner(request: Request) -> str:
    """The owner name `require_key` found for this request."""
    return getattr(request.state, "owner", "")
