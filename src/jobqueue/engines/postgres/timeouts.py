"""Time-outs of the distributed engine's PostgreSQL connections, so that no caller waits on the
database without a bound, whether it is down, slow or frozen.

A frozen server (SIGSTOP, a hung host whose kernel still answers) keeps every TCP connection
open and answers nothing: neither its own `statement_timeout` nor TCP keepalives can fire then,
and cancelling an asyncio task only makes psycopg send a cancel request, which waits too (up to
10 s in psycopg 3.3). So each use of a connection has a client-side deadline of its own: when it
passes, the connection's socket is shut down, the query fails at once with OperationalError,
and the pool, which sees a broken connection, throws it away instead of lending it again. The
pool's check of an idle connection has the same bound. A connection given back less than
FRESH_SECONDS ago is lent unchecked: it just worked, and a check is a round trip of its own
(one in three of a tiny job's); if it broke meanwhile, its first use fails as a check would
have, and the pool throws it away then.

psycopg_pool's reconnection back-off doubles (1, 2, 4, 8, 16 s...), so after an outage of a
minute the first new connection could come a minute after the server is back; here it is
capped at RECONNECT_DELAY_MAX_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import weakref
from collections.abc import AsyncIterator, Iterator

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool
from psycopg_pool.base import AttemptWithBackoff

# libpq's connect_timeout (whole seconds, at least 2): the TCP connect and the start-up.
CONNECT_SECONDS = 2
# The pool's check of an idle connection before lending it.
CHECK_SECONDS = 1.0
# A connection given back to the pool this recently is lent again without a check.
FRESH_SECONDS = 1.0
RECONNECT_DELAY_MAX_SECONDS = 1.0
# TCP keepalives: a peer that vanished (a host down, a cable cut) is noticed within ~15 s even
# on a connection that waits for nothing, such as the one that LISTENs.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
              "keepalives_count": 3}


def conninfo(url: str, statement_seconds: float | None = None) -> str:
    """`url` with the connect time-out, keepalives and (if given) a server-side
    statement_timeout, keeping the URL's own `options` (its settings win)."""
    params: dict[str, object] = {"connect_timeout": CONNECT_SECONDS, **KEEPALIVES}
    params.update({key: value for key, value in conninfo_to_dict(url).items()
                   if key in params})
    if statement_seconds is not None:
        options = conninfo_to_dict(url).get("options") or ""
        if "statement_timeout" not in options:
            params["options"] = (f"-c statement_timeout={int(statement_seconds * 1000)} "
                                 f"{options}").strip()
    return make_conninfo(url, **params)


def shut(conn: psycopg.BaseConnection) -> None:
    """Shut the connection's socket down: whatever waits on it fails at once, and the
    connection is broken for good (no cancel request, which a frozen server never answers)."""
    with contextlib.suppress(Exception):
        fd = conn.pgconn.socket
        with socket.socket(fileno=socket.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)


class Expired(psycopg.OperationalError):
    pass


def _expired(seconds: float) -> Expired:
    return Expired(f"PostgreSQL did not answer within {seconds:g} s")


@contextlib.contextmanager
def deadline(conn: psycopg.AsyncConnection, seconds: float) -> Iterator[None]:
    """Bound the work on `conn` (in the running event loop) to `seconds`."""
    fired = False

    def expire() -> None:
        nonlocal fired
        fired = True
        shut(conn)

    timer = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        yield
    except psycopg.Error as error:
        if fired:
            raise _expired(seconds) from error
        raise
    finally:
        timer.cancel()  # before the connection goes back to the pool: same loop, no race
    if fired:  # the work ended in the very moment: the connection is broken all the same
        raise _expired(seconds)


async def _autocommit(conn: psycopg.AsyncConnection) -> None:
    await conn.set_autocommit(True)


class _Attempt(AttemptWithBackoff):
    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, RECONNECT_DELAY_MAX_SECONDS)


class Pool(AsyncConnectionPool):
    """An AsyncConnectionPool of autocommit connections whose check is bounded and whose
    reconnection back-off is capped."""

    def __init__(self, url: str, statement_seconds: float | None = None, **kwargs):
        # When each connection was last given back in a good state (the pool's reset runs
        # then, on an idle connection only).
        self._given_back: weakref.WeakKeyDictionary[psycopg.AsyncConnection, float] = \
            weakref.WeakKeyDictionary()
        # Autocommit: a single statement is one round trip, not three (psycopg's implicit
        # BEGIN goes out alone, and the pool's COMMIT after); whatever must be atomic says
        # so with `conn.transaction()`.
        # (Set on each new connection, not as a connect argument: procrastinate's listener
        # connects with the pool's arguments and autocommit of its own.)
        super().__init__(conninfo(url, statement_seconds), check=self._bounded_check,
                         reset=self._note_given_back, configure=_autocommit, **kwargs)

    async def _note_given_back(self, conn: psycopg.AsyncConnection) -> None:
        self._given_back[conn] = time.monotonic()

    async def _bounded_check(self, conn: psycopg.AsyncConnection) -> None:
        given_back = self._given_back.pop(conn, None)
        if given_back is not None and time.monotonic() - given_back < FRESH_SECONDS \
                and not conn.broken:
            return
        with deadline(conn, CHECK_SECONDS):
            await AsyncConnectionPool.check_connection(conn)

    async def _add_connection(self, attempt, growing: bool = False) -> None:
        await super()._add_connection(attempt or _Attempt(timeout=self.reconnect_timeout),
                                      growing)

    @contextlib.asynccontextmanager
    async def bounded(self, seconds: float, wait: float) -> AsyncIterator[psycopg.AsyncConnection]:
        """A connection (waiting at most `wait` s for one), its use bounded to `seconds`."""
        async with self.connection(timeout=wait) as conn:
            with deadline(conn, seconds):
                yield conn
