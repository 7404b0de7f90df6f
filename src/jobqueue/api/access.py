"""Optional API keys (JOBQUEUE_API_KEYS): who may call, and whose jobs each caller sees.

Each key is its own tenant: its jobs are stored under `owner_of(key)` (a hash, never the key)
and another key's job ids answer 404. Keys travel in the `X-API-Key` header. A browser cannot
put a header on <img src> or EventSource requests, so the dashboard trades its key for an
access token (`POST /access-token`) and adds it to those URLs as `?access_token=`: signed,
read-only (GET), for one owner, and expiring.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from fastapi import APIRouter, Request, Security
from fastapi.security import APIKeyHeader
from limits import parse
from slowapi.util import get_remote_address

from jobqueue.api.ratelimit import wrong_keys as _wrong_keys
from jobqueue.api.schemas import AccessToken, error_responses
from jobqueue.errors import NotAuthenticated, RateLimited

HEADER = "X-API-Key"
TOKEN_PARAMETER = "access_token"
TOKEN_SECONDS = 12 * 3600

# Wrong keys (or tokens) one address may send before it is refused for the rest of the window,
# right ones included, so keys cannot be guessed by trying many. Counted in
# JOBQUEUE_RATE_LIMIT_STORAGE when set, so that every replica refuses the address.
WRONG_KEY_LIMIT = parse("20/minute")

api_key_header = APIKeyHeader(
    name=HEADER, auto_error=False,
    description="One of JOBQUEUE_API_KEYS; needed only when the server has keys set.")


def owner_of(key: str) -> str:
    """The name a key's jobs are stored under: a hash, so the store never holds a key."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def is_valid(presented: str, keys: list[str]) -> bool:
    """Compare hashes against every key in constant time: timing tells nothing of any key,
    not even its length."""
    presented_hash = hashlib.sha256(presented.encode()).digest()
    valid = False
    for key in keys:
        valid |= hmac.compare_digest(presented_hash, hashlib.sha256(key.encode()).digest())
    return valid


def _token_secret(keys: list[str]) -> bytes:
    # Derived from the keys: tokens outlive a restart, and changing the keys revokes them all.
    return hashlib.sha256("\0".join(["jobqueue access token", *sorted(keys)]).encode()).digest()


def make_token(owner: str, keys: list[str], now: float | None = None) -> str:
    payload = f"{owner}.{int((now or time.time()) + TOKEN_SECONDS)}"
    signature = hmac.new(_token_secret(keys), payload.encode(), hashlib.sha256).hexdigest()
    return f"{payload}.{signature}"


def token_owner(token: str, keys: list[str]) -> str | None:
    """The owner a token was made for, or None when it is forged, garbled or expired."""
    owner, _, rest = token.partition(".")
    expires, _, signature = rest.partition(".")
    expected = hmac.new(_token_secret(keys), f"{owner}.{expires}".encode(),
                        hashlib.sha256).hexdigest()
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        return None
    return owner if expires.isdigit() and int(expires) > time.time() else None


async def require_key(request: Request, header: str | None = Security(api_key_header)) -> str:
    """Dependency of every route that touches jobs: the caller's owner name, or
    NotAuthenticated (401); RateLimited (429) for an address that sent too many wrong keys."""
    keys = request.app.state.settings.api_key_list
    owner = ""
    if keys:
        address = get_remote_address(request)
        if not _wrong_keys.test(WRONG_KEY_LIMIT, "wrong key", address):
            retry = int(_wrong_keys.get_window_stats(WRONG_KEY_LIMIT, "wrong key", address)
                        .reset_time - time.time()) + 1
            request.app.state.metrics.rate_limited.labels("wrong_key").inc()
            raise RateLimited(f"Too many wrong API keys from this address; wait {retry} s.",
                              retry)
        token = request.query_params.get(TOKEN_PARAMETER) if request.method == "GET" else None
        if header:
            owner = owner_of(header) if is_valid(header, keys) else ""
            problem = f"The {HEADER} is not one of this server's keys."
        elif token:
            owner = token_owner(token, keys) or ""
            problem = "The access_token is not valid or has expired; get a new one."
        else:
            problem = (f"This server needs an API key: send one of its keys in the {HEADER} "
                       "header.")
        if not owner:
            if header or token:  # a missing key is a mistake; a wrong one may be a guess
                _wrong_keys.hit(WRONG_KEY_LIMIT, "wrong key", address)
            raise NotAuthenticated(problem)  # with WWW-Authenticate: X-API-Key
    request.state.owner = owner
    return owner


def owner(request: Request) -> str:
    """The owner name `require_key` found for this request."""
    # request.state keeps its attributes in the scope's "state" (as uvicorn passes it): read
    # there, a missing owner is no AttributeError raised and caught on every request.
    return (request.scope.get("state") or {}).get("owner", "")


router = APIRouter(tags=["server"])


@router.post("/access-token", response_model=AccessToken, responses=error_responses(401),
             summary="Trade the X-API-Key for a token for URLs that cannot carry headers",
             description="For <img src> and EventSource: add `?access_token=<token>` to GET "
                         "requests. It reads the key's jobs only, and expires.")
async def access_token(request: Request) -> AccessToken:
    keys = request.app.state.settings.api_key_list
    if not keys:
        return AccessToken(token="", expires_in=0)
    # require_key has seen a key in the header: tokens count on GET requests only.
    return AccessToken(token=make_token(owner(request), keys), expires_in=TOKEN_SECONDS)
