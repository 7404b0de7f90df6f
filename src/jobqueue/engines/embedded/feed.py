"""The change feed behind `GET /events`: which jobs changed since a listener last looked."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


class Watched(Protocol):
    """What the feed needs of a job (the engine's `Job`): whose it is, its id, its record."""

    id: str
    owner: str

    def record(self) -> Any: ...


class PendingChanges:
    """One `/events` stream's pending changes; many changes to a job collapse into one."""

    def __init__(self, owner: str = "") -> None:
        self.owner = owner  # only this API key's jobs
        self.changed: dict[str, Watched] = {}
        self.removed: set[str] = set()
        self.wake = asyncio.Event()

    async def next_batch(self) -> tuple[list[Watched], list[str]]:
        """Wait for at least one change, then hand over everything pending."""
        await self.wake.wait()
        self.wake.clear()
        changed, self.changed = list(self.changed.values()), {}
        removed, self.removed = sorted(self.removed), set()
        return changed, removed


class Feed:
    """Fans job changes out to every `/events` listener. Used only on the event loop."""

    def __init__(self) -> None:
        self._listeners: set[PendingChanges] = set()

    def listen(self, owner: str = "") -> PendingChanges:
        listener = PendingChanges(owner)
        self._listeners.add(listener)
        return listener

    def unlisten(self, listener: PendingChanges) -> None:
        self._listeners.discard(listener)

    @property
    def listening(self) -> bool:
        return bool(self._listeners)

    def job_changed(self, job: Watched) -> None:
        for listener in self._listeners:
            if listener.owner == job.owner:
                listener.changed[job.id] = job
                listener.wake.set()

    def job_removed(self, job_id: str, owner: str) -> None:
        for listener in self._listeners:
            if listener.owner != owner:
                continue
            listener.changed.pop(job_id, None)
            listener.removed.add(job_id)
            listener.wake.set()
