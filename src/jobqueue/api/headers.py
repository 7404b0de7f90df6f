"""Security headers, which api/edge.py adds: `nosniff` on every response, a
Content-Security-Policy on HTML pages.

The dashboard has no inline script or style, so its policy allows only the server's own files.
FastAPI's /docs and /redoc pages load Swagger UI / ReDoc from a CDN and start it with one inline
script; their policy allows that CDN and that exact script (by its hash), nothing else inline.
"""

from __future__ import annotations

import base64
import hashlib
import re

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
               "frame-ancestors 'none'")
CDN = "https://cdn.jsdelivr.net"
DOCS_POLICY = ("default-src 'self'; script-src 'self' {CDN} {hashes}; "
               "style-src 'self' {CDN} 'unsafe-inline'; img-src 'self' data: https:; "
               "worker-src 'self' blob:; connect-src 'self'; object-src 'none'; "
               "base-uri 'none'; frame-ancestors 'none'")
DOCS_PATHS = {"/docs", "/redoc"}
INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.S)


def docs_policy(html: bytes) -> str:
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in INLINE_SCRIPT.findall(html))
    return DOCS_POLICY.format(CDN=CDN, hashes=hashes)


NOSNIFF = (b"x-content-type-options", b"nosniff")
PAGE_HEADERS = [(b"content-security-policy", PAGE_POLICY.encode()), (b"x-frame-options", b"DENY"),
                (b"referrer-policy", b"no-referrer")]


def add_security_headers(start: Message) -> None:
    """`nosniff` on an answer's head (`http.response.start`), and the page policy on an HTML
    page that has no policy of its own yet (the docs pages get theirs from send_docs_page)."""
    headers = start["headers"] = list(start.get("headers", ()))
    html = has_policy = False
    for name, value in headers:
        if name.lower() == b"content-type":
            html = value.startswith(b"text/html")
        elif name.lower() == b"content-security-policy":
            has_policy = True
    headers.append(NOSNIFF)
    if html and not has_policy:
        headers.extend(PAGE_HEADERS)


async def send_docs_page(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Hold the (small) docs page until its scripts are known, then send it with them."""
    start: Message | None = None
    body = b""

    async def hold(message: Message) -> None:
        nonlocal start, body
        if message["type"] == "http.response.start":
            start = message
            return
        body += message.get("body", b"")
        if message.get("more_body"):
            return
        headers = MutableHeaders(scope=start)
        headers["Content-Security-Policy"] = docs_policy(body)
        headers["X-Frame-Options"] = "DENY"
        await send(start)
        await send({"type": "http.response.body", "body": body})

    await app(scope, receive, hold)
