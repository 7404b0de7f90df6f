"""Counted slots for what holds a connection open: uploads and event streams.

Past the limit a client gets 503 with Retry-After instead of a slot, so a flood of slow uploads
or idle streams cannot take the server's memory, file descriptors and event loop for itself.
Used only on the event loop, so a plain counter will do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from jobqueue.errors import Busy

RETRY_AFTER_SECONDS = 5


class ConnectionSlots:
    def __init__(self, limit: int, what: str, setting: str):
        self.limit = limit
        self.what = what  # "uploads", "event streams"
        self.setting = setting
        self.used = 0
        self.holders: set[str] = set()  # what slot() was given: the jobs being uploaded

    @contextmanager
    def slot(self, holder: str | None = None) -> Iterator[None]:
        if self.used >= self.limit:
            raise Busy(f"{self.limit} {self.what} are open, the most {self.setting} allows; "
                       f"retry in {RETRY_AFTER_SECONDS} s.", RETRY_AFTER_SECONDS)
        self.used += 1
        if holder:
            self.holders.add(holder)
        try:
            yield
        finally:
            self.used -= 1
            self.holders.discard(holder)
