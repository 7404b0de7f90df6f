"""The `Prefer` request header (RFC 7240) as the job routes read it: `respond-async` and
`wait=N`. Preferences the server does not know are ignored, as the RFC says; so is a `wait`
that is no number of seconds."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastapi import Request

HEADER = "Prefer"
APPLIED = "Preference-Applied"


@dataclass(frozen=True)
class Preferences:
    respond_async: bool = False
    wait: float | None = None  # seconds, when asked for


def preferences(request: Request) -> Preferences:
    respond_async, wait = False, None
    for header in request.headers.getlist(HEADER):
        for preference in header.split(","):
            name, _, value = preference.split(";")[0].strip().partition("=")
            name, value = name.strip().lower(), value.strip().strip('"')
            if name == "respond-async":
                respond_async = True
            elif name == "wait":
                try:
                    seconds = float(value)
                except ValueError:
                    continue
                if math.isfinite(seconds) and seconds >= 0:
                    wait = seconds
    return Preferences(respond_async, wait)
