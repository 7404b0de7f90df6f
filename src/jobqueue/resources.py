"""A kind's resource in one process: what its `setup(settings)` returned (a model, a client),
made once per process that runs the kind's jobs, handed to each of its jobs as `job.resource`,
and given to its `teardown` at shutdown. The same in both engines: the embedded server's pool
of a kind and a distributed worker's runner each hold one `Resource` per kind.

    loading ──setup returns──> ready ──shutdown──> teardown(resource)
       │                         ^
       └──setup raises──> failed ┘ (tried again after 1 s, 2 s, 4 s, … at most 60 s)

Setup runs on a thread of its own as the process starts, so the server answers meanwhile.
While the kind is not ready its jobs wait in its queue (no worker slot of it takes one); once
failed, new submissions of it are refused (`SetupFailed`, 503) until a try succeeds. A kind
without `setup` is ready at once, its resource None.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from jobqueue.errors import SetupFailed
from jobqueue.jobs import JobKind

if TYPE_CHECKING:
    from jobqueue.settings import Settings

log = logging.getLogger(__name__)

# After a failed setup the next try comes this long after, doubling up to the most.
SETUP_FIRST_RETRY_SECONDS = 1.0
SETUP_MAX_RETRY_SECONDS = 60.0
# How long a shutdown waits for a kind's teardown before it goes on without it.
TEARDOWN_SECONDS = 10.0


class State(str, Enum):
    READY = "ready"
    LOADING = "loading"
    FAILED = "failed"


@dataclass(frozen=True)
class Status:
    """A kind's resource as /health shows it; `error` (the setup's type and message) and
    `retry_in` (seconds to the next try) only when failed."""

    state: State
    error: str | None = None
    retry_in: float | None = None

    def refusal(self, kind: str) -> SetupFailed:
        """The 503 for a new job of a failed kind: Retry-After the time to the next try (1 s
        while one is under way)."""
        return SetupFailed(kind, self.error or "", max(1, math.ceil(self.retry_in or 0)))

    def shown(self) -> dict[str, str]:
        """For a queue entry of /health: its state, and the error when failed."""
        if self.error:
            return {"state": self.state.value, "error": self.error}
        return {"state": self.state.value}

    def beat(self) -> dict[str, Any]:
        """For a worker's heartbeat (engines/postgres): the same, and when it tries again."""
        if self.retry_in is None:
            return self.shown()
        return {**self.shown(), "retryIn": round(self.retry_in, 3)}


# The status of a resource that is ready or loading, made once.
SETTLED = {State.READY: Status(State.READY), State.LOADING: Status(State.LOADING)}

# /health is open to anyone: the message is cut there (the log has it all).
MAX_ERROR_CHARS = 300


def describe(error: BaseException) -> str:
    """An error as its kind's status names it: its type and message, cut short."""
    message = " ".join(str(error).split())
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS - 1] + "…"
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


class Resource:
    """One kind's resource in this process: `start` runs its setup on a thread (and again
    while it fails), `wait_ready` holds a worker slot until it is ready, `close` then
    `teardown` end it at shutdown. Thread-safe; `on_change` is called (from the setup thread)
    whenever its state changes."""

    def __init__(self, kind: JobKind, settings: Settings | None,
                 on_change: Callable[[], None] | None = None):
        self.kind = kind
        self.settings = settings
        self.on_change = on_change
        self._changed = threading.Condition()
        self._state = State.READY if kind.setup is None else State.LOADING
        self._value: Any = None
        self._error: str | None = None
        self._next_try = 0.0  # time.monotonic() of the next try, while failed
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._torn_down = False

    @property
    def name(self) -> str:
        return self.kind.name

    @property
    def value(self) -> Any:
        """What setup returned (None without a setup, or before it has)."""
        return self._value

    @property
    def ready(self) -> bool:
        return self._state is State.READY

    def status(self) -> Status:
        state = self._state  # read once: /health asks on every call, without the lock
        if state is not State.FAILED:
            return SETTLED[state]
        with self._changed:
            if self._state is not State.FAILED:
                return SETTLED[self._state]
            return Status(self._state, self._error, max(0.0, self._next_try - time.monotonic()))

    def start(self) -> None:
        """Run the setup on a thread of its own (once; later calls do nothing)."""
        with self._changed:
            if self.kind.setup is None or self._thread is not None or self._closed.is_set():
                return
            self._thread = threading.Thread(target=self._load, name=f"{self.name}-setup",
                                            daemon=True)
        self._thread.start()

    def check(self) -> None:
        """SetupFailed (503) while the last try of the setup failed."""
        status = self.status()
        if status.state is State.FAILED:
            raise status.refusal(self.name)

    def wait_ready(self) -> bool:
        """Block until the resource is ready (True) or the process shuts down first (False)."""
        with self._changed:
            self._changed.wait_for(lambda: self._state is State.READY or self._closed.is_set())
            return self._state is State.READY

    def close(self) -> None:
        """Shutdown begins: no more tries, and whoever waits in `wait_ready` stops waiting."""
        with self._changed:
            self._closed.set()
            self._changed.notify_all()

    def teardown(self) -> None:
        """Once the kind's workers have stopped: `teardown(resource)` on a thread, waited for
        TEARDOWN_SECONDS at most; its error is logged, never raised. A setup still under way
        is not waited for: it tears down what it made itself when it returns."""
        self.close()
        with self._changed:
            if self._state is not State.READY or self._torn_down:
                return
            self._torn_down = True
        thread = threading.Thread(target=self._teardown, args=(self._value,),
                                  name=f"{self.name}-teardown", daemon=True)
        thread.start()
        thread.join(TEARDOWN_SECONDS)
        if thread.is_alive():
            log.warning("%s: teardown still runs after %g s; shutting down without it",
                        self.name, TEARDOWN_SECONDS)

    # ---- inside ----

    def _load(self) -> None:
        """The setup thread: try until it succeeds or the process shuts down."""
        delay = SETUP_FIRST_RETRY_SECONDS
        while not self._closed.is_set():
            started = time.monotonic()
            log.info("%s: setup started", self.name)
            try:
                value = self.kind.setup(self.settings)
            except BaseException as error:  # a failed setup must never end its retries
                with self._changed:
                    again = self._error == describe(error)
                    self._state, self._error = State.FAILED, describe(error)
                    self._next_try = time.monotonic() + delay
                # Its traceback once, not at every try that fails the same way.
                log.error("%s: setup failed after %.1f s%s; its jobs wait, new ones get 503; "
                          "trying again in %g s", self.name, time.monotonic() - started,
                          f" ({self._error}) again" if again else "", delay,
                          exc_info=None if again else error)
                self._tell()
                if self._closed.wait(delay):
                    return
                delay = min(2 * delay, SETUP_MAX_RETRY_SECONDS)
                continue
            with self._changed:
                closed = self._closed.is_set()
                if not closed:
                    self._state, self._value, self._error = State.READY, value, None
                    self._changed.notify_all()
            if closed:  # the shutdown came meanwhile, and did not wait: undo it here
                log.info("%s: setup returned after the shutdown began; tearing it down",
                         self.name)
                self._teardown(value)
                return
            log.info("%s: ready after %.1f s", self.name, time.monotonic() - started)
            self._tell()
            return

    def _teardown(self, value: Any) -> None:
        if self.kind.teardown is None:
            return
        try:
            self.kind.teardown(value)
        except BaseException:  # logged, never raised: the shutdown goes on
            log.exception("%s: teardown failed", self.name)
        else:
            log.info("%s: torn down", self.name)

    def _tell(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # a listener's bug must not stop the setup's retries
                log.exception("%s: telling of its new state failed", self.name)
