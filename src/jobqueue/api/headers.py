"""Security headers: `nosniff` on every response, a Content-Security-Policy on HTML pages.

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


class SecurityHeaders:
    """Pure ASGI middleware (no buffering of other responses, so streams stay streams)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] in DOCS_PATHS:
            await self._docs(scope, receive, send)
            return

        async def add_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                if headers.get("content-type", "").startswith("text/html"):
                    headers["Content-Security-Policy"] = PAGE_POLICY
                    headers["X-Frame-Options"] = "DENY"
                    headers["Referrer-Policy"] = "no-referrer"
            await send(message)

        await self.app(scope, receive, add_headers)

    async def _docs(self, scope: Scope, receive: Receive, send: Send) -> None:
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
            headers["X-Content-Type-Options"] = "nosniff"
            headers["Content-Security-Policy"] = docs_policy(body)
            headers["X-Frame-Options"] = "DENY"
            await send(start)
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, hold)
