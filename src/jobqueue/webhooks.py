"""Completion webhooks: when a job with a callback URL ends, its status document is POSTed there.

Every rule is here, once, for both engines; an engine only stores the deliveries and claims
them (`DeliveryStore`: SQLite's `deliveries` table in the embedded engine,
`jobqueue_deliveries` in PostgreSQL, a row per job that has a callback URL).

- **When**: a job's end (succeeded, failed, cancelled) is one event; a failed job a client
  retries that ends again is another. A row whose job has ended at another time than the
  event it last delivered (`ended_at` is not the job's `finished_at`) starts a new event: its
  attempts start from 0. The engines never tell this module a job ended: the delivery loop
  finds ended jobs with due deliveries in the database, so every way a job ends (a run, a
  cancel, a restart, another process) is covered, and a pending delivery survives a restart.
- **Who**: the `Deliverer` task of each server process that answers HTTP (the embedded server,
  each API replica), on its event loop: never a worker thread or a worker slot. Each attempt
  is claimed first (`claimed_until`, a lease of LEASE_SECONDS, in one UPDATE ... RETURNING;
  `FOR UPDATE SKIP LOCKED` in PostgreSQL), so exactly one process makes each attempt; a
  process that dies mid-attempt leaves the claim to expire, then another one tries.
- **How**: Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature` v1,
  signed with JOBQUEUE_WEBHOOK_SECRET by `standardwebhooks`); the body is the job's status
  document (GET /jobs/{id}), made once per event and sent the same on every retry, as is
  its webhook-id. A 2xx answer is delivered; anything else (a 3xx: redirects are not
  followed), no answer within TIMEOUT_SECONDS or no connection is a failed attempt, tried
  again after FIRST_DELAY_SECONDS, then twice as long each time up to MAX_DELAY_SECONDS,
  until JOBQUEUE_WEBHOOK_RETRY_HOURS after the job's end: then the delivery has failed.
- **Where not** (no server-side request forgery): only http and https; the host must resolve
  to public addresses only (`refusal`: no loopback, private, link-local, shared, reserved,
  multicast, unspecified or cloud metadata address), unless JOBQUEUE_WEBHOOK_ALLOW_HOSTS
  names it. Checked when the job is submitted (422) and again before every attempt, which
  then connects to the very address it checked (the URL's host stays in `Host` and in TLS's
  server name), so a DNS answer that changes in between cannot send it elsewhere.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from standardwebhooks import Webhook

from jobqueue.errors import BadInput
from jobqueue.jobs import FINISHED
from jobqueue.records import JobRecord

log = logging.getLogger(__name__)

# A receiver that answers nothing costs an attempt this long, on a delivery task.
TIMEOUT_SECONDS = 10.0
# Resolving a callback URL's host, at submit and before each attempt.
RESOLVE_SECONDS = 5.0
# The wait after the first failed attempt, doubled after each further one, up to the cap.
FIRST_DELAY_SECONDS = 1.0
MAX_DELAY_SECONDS = 600.0
# How long a claim keeps other processes off a delivery: more than an attempt can take.
LEASE_SECONDS = 3 * TIMEOUT_SECONDS
# How often the loop looks for due deliveries, and how many attempts it makes at once.
POLL_SECONDS = 1.0
AT_ONCE = 16
MAX_URL_LENGTH = 2000

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"

# Cloud metadata services (AWS, GCP, Azure: 169.254.169.254, link-local anyway; AWS's IPv6
# one; Alibaba's), refused by name even where the other rules would let them through.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(address) for address in (
    "169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2",
    "168.63.129.16"))  # the last: Azure's WireServer, a public address
# Host names are resolved on threads of their own, so that slow DNS answers (a resolver's
# time-outs outlast RESOLVE_SECONDS) never hold up the loop's default executor, which the
# server's other blocking calls use.
_resolver = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="webhook-dns")


@dataclass(frozen=True)
class Delivery:
    """A claimed delivery: the next attempt of one job end's event."""

    job_id: str
    url: str
    attempts: int  # made so far for this event
    ended_at: float  # the job's finished_at: which end this event is
    payload: str | None  # the body, once made (the first attempt makes it)
    # Until when this process holds the claim: its note of the attempt counts only while
    # it still does (another process may have claimed it since, had this one stalled).
    claimed_until: float | None = None


@dataclass(frozen=True)
class Attempted:
    """What an attempt leaves in the delivery's row."""

    status: str  # PENDING (tried again at next_at), DELIVERED or FAILED (given up)
    attempts: int
    last_error: str | None
    next_at: float | None
    payload: str | None  # None: not made yet (the next attempt makes it)


class DeliveryStore(Protocol):
    """What an engine keeps of deliveries (engines/base.JobEngine has these)."""

    async def claim_deliveries(self, limit: int, lease: float) -> list[Delivery]:
        """Up to `limit` deliveries due now (a new end's first attempt, or a retry whose time
        has come), none claimed by a process now; each claimed for `lease` seconds."""

    async def delivery_done(self, delivery: Delivery, attempted: Attempted) -> None:
        """Store an attempt's outcome and let go of the claim (only if the delivery is still
        of that same end)."""

    async def release_delivery(self, delivery: Delivery) -> None:
        """Let go of the claim of an attempt that was not made to its end."""

    async def callback(self, job_id: str) -> dict[str, Any] | None:
        """The job's delivery row (url, status, attempts, last_error, ended_at), or None."""

    async def get(self, job_id: str) -> JobRecord | None: ...


# ---- the rules ----

def webhook_id(job_id: str, ended_at: float) -> str:
    """One id per job end: the same on every retry of it, another for a later end."""
    return f"msg_{job_id}_{round(ended_at * 1000)}"


def next_delay(attempts: int) -> float:
    """Seconds after the `attempts`-th failed attempt until the next one."""
    return min(MAX_DELAY_SECONDS, FIRST_DELAY_SECONDS * 2 ** max(0, attempts - 1))


def after_attempt(delivery: Delivery, error: str | None, payload: str | None,
                  retry_hours: float, now: float) -> Attempted:
    """The delivery after an attempt that failed with `error` (None: delivered): tried again
    after next_delay, unless that is past JOBQUEUE_WEBHOOK_RETRY_HOURS from the job's end."""
    attempts = delivery.attempts + 1
    if error is None:
        return Attempted(DELIVERED, attempts, None, None, payload)
    next_at = now + next_delay(attempts)
    if next_at > delivery.ended_at + retry_hours * 3600:
        return Attempted(FAILED, attempts, error, None, payload)
    return Attempted(PENDING, attempts, error, next_at, payload)


def shown(row: dict[str, Any] | None, record: JobRecord) -> dict[str, Any] | None:
    """The `callback` of the job's status document: {status, attempts, lastError}; pending
    with no attempts while the job has not ended (or ended again, not tried yet)."""
    if row is None:
        return None
    current = (record.status in FINISHED and row["ended_at"] is not None
               and row["ended_at"] == record.finished_at)
    if not current:
        return {"status": PENDING, "attempts": 0, "last_error": None}
    return {"status": row["status"], "attempts": row["attempts"],
            "last_error": row["last_error"]}


def refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a callback may not go to this address, or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv4 address inside an IPv6 one (::ffff:127.0.0.1, 6to4's 2002:7f00:1::,
        # Teredo's) is judged as that IPv4 address.
        embedded = address.ipv4_mapped or address.sixtofour or \
            (address.teredo[1] if address.teredo else None)
        if embedded is not None:
            if (why := refusal(embedded)) is not None:
                return why
            if address.ipv4_mapped is not None:
                return None
        if address.is_site_local:
            return "a site-local address"
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for test, what in (("is_loopback", "a loopback address"),
                       ("is_link_local", "a link-local address"),
                       ("is_multicast", "a multicast address"),
                       ("is_unspecified", "the unspecified address"),
                       ("is_reserved", "a reserved address"),
                       ("is_private", "a private address")):
        if getattr(address, test):
            return what
    if not address.is_global:
        return "not a public address"
    return None


def parse_url(url: object) -> tuple[str, int]:
    """The host and port of a callback URL; BadInput unless it is an http(s) URL."""
    if not isinstance(url, str) or len(url) > MAX_URL_LENGTH:
        raise BadInput(f"callbackUrl must be an http:// or https:// URL of at most "
                       f"{MAX_URL_LENGTH} characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname \
            or parts.username is not None or any(c.isspace() or not c.isprintable()
                                                 for c in url):
        raise BadInput(f"callbackUrl must be an http:// or https:// URL (without user or "
                       f"password), not {url[:100]!r}.")
    try:  # what the delivery's client makes of it (IDNA 2008 for the host, for one)
        httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as error:
        raise BadInput(f"callbackUrl is not a URL the server can send to ({error}).") from None
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


async def checked_address(url: str, allow_hosts: list[str]) -> str:
    """Resolve the URL's host and check every address it has (`refusal`), unless
    JOBQUEUE_WEBHOOK_ALLOW_HOSTS names the host: the address to connect to. BadInput naming
    why and the setting."""
    host, port = parse_url(url)
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.run_in_executor(
                _resolver, lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)),
                RESOLVE_SECONDS)
        except (OSError, TimeoutError, UnicodeError) as error:
            raise BadInput(f"callbackUrl's host {host!r} cannot be resolved "
                           f"({error or 'no answer'}).") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        if not addresses:
            raise BadInput(f"callbackUrl's host {host!r} has no address.")
    if host.lower() not in allow_hosts:
        for address in addresses:
            if (why := refusal(address)) is not None:
                named = f"{host!r} is {why}" if literal is not None \
                    else f"{host!r} resolves to {address}, {why}"
                raise BadInput(f"callbackUrl refused: {named}; callbacks go to public "
                               "addresses only (JOBQUEUE_WEBHOOK_ALLOW_HOSTS lets named "
                               "hosts through).")
    return str(addresses[0])


def signed_headers(secret: str, msg_id: str, body: str, now: float) -> dict[str, str]:
    """The Standard Webhooks headers of a delivery."""
    timestamp = datetime.fromtimestamp(int(now), UTC)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(now)),
            "webhook-signature": Webhook(secret).sign(msg_id, timestamp, body),
            "content-type": "application/json"}


# ---- the delivery loop ----

Document = Callable[[JobRecord], Awaitable[dict[str, Any]]]


class Deliverer:
    """The delivery loop of one process: claims due deliveries and makes their attempts, at
    most AT_ONCE at a time, each a task of its own on the event loop."""

    def __init__(self, store: DeliveryStore, document: Document, secret: str,
                 retry_hours: float, allow_hosts: list[str],
                 count: Callable[[str], None] = lambda outcome: None):
        self.store = store
        self.document = document
        self.secret = secret
        self.retry_hours = retry_hours
        self.allow_hosts = allow_hosts
        self.count = count  # metrics: an attempt's outcome (delivered, retried, failed)
        self._tasks: dict[asyncio.Task, Delivery] = {}  # the attempts under way
        # No proxies from the environment: a proxy would connect wherever the name resolves
        # to, past the address checked here. No redirects: a 3xx is a failed attempt.
        # No connection kept open: one to an address checked for one host name must not carry
        # another host's delivery (a shared front end routes by the name it was opened for).
        self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                         timeout=TIMEOUT_SECONDS,
                                         limits=httpx.Limits(max_keepalive_connections=0))

    async def run(self) -> None:
        failing = ""  # the last look's error: logged once, not every second
        try:
            while True:
                due: list[Delivery] = []
                free = AT_ONCE - len(self._tasks)
                if free > 0:
                    try:
                        due = await self.store.claim_deliveries(free, LEASE_SECONDS)
                    except Exception as error:  # the database is down: the next look tries
                        if str(error) != failing:
                            log.warning("could not look for webhook deliveries: %s", error)
                        failing = str(error)
                    else:
                        if failing:
                            log.info("webhook deliveries are looked for again")
                        failing = ""
                for delivery in due:
                    task = asyncio.create_task(self._attempt(delivery))
                    self._tasks[task] = delivery
                    task.add_done_callback(lambda done: self._tasks.pop(done, None))
                if len(due) < free or free <= 0:
                    await asyncio.sleep(POLL_SECONDS)
        finally:
            cut = list(self._tasks.values())
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            # Attempts cut short by the shutdown are due again at once (a receiver may get
            # one twice), not only once their claim runs out.
            for delivery in cut:
                try:
                    await asyncio.wait_for(self.store.release_delivery(delivery), 2)
                except Exception as error:  # the claim runs out by itself
                    log.info("job %s: webhook claim left to run out: %s", delivery.job_id,
                             error)
            await self._client.aclose()

    async def _attempt(self, delivery: Delivery) -> None:
        try:
            await self._try(delivery)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a failed attempt all the same: retried, then given up
            log.exception("job %s: webhook delivery failed unexpectedly", delivery.job_id)
            with contextlib.suppress(Exception):  # else its claim runs out: tried again
                await self.store.delivery_done(delivery, after_attempt(
                    delivery, f"{type(error).__name__}: {error}"[:300],
                    delivery.payload,  # None: the next attempt makes the body anew
                    self.retry_hours, time.time()))

    async def _try(self, delivery: Delivery) -> None:
        job_id = delivery.job_id
        payload = delivery.payload
        if payload is None:
            record = await self.store.get(job_id)
            if record is None:
                return  # deleted meanwhile: its delivery went with it
            if record.finished_at != delivery.ended_at:
                # Retried (POST /jobs/{id}/retry) since that end: its body would not be that
                # end's. The next look starts the new end's event, once there is one.
                await self.store.release_delivery(delivery)
                return
            payload = json.dumps(await self.document(record), separators=(",", ":"))
        error = await self.post(delivery.url, webhook_id(job_id, delivery.ended_at), payload)
        attempted = after_attempt(delivery, error, payload, self.retry_hours, time.time())
        await self.store.delivery_done(delivery, attempted)
        if attempted.status == DELIVERED:
            self.count("delivered")
            log.info("job %s: webhook delivered (attempt %d)", job_id, attempted.attempts)
        elif attempted.status == FAILED:
            self.count("failed")
            log.warning("job %s: webhook delivery given up after %d attempts "
                        "(JOBQUEUE_WEBHOOK_RETRY_HOURS): %s", job_id, attempted.attempts, error)
        else:
            self.count("retried")
            log.info("job %s: webhook attempt %d failed (%s); next in %.0f s", job_id,
                     attempted.attempts, error, attempted.next_at - time.time())

    async def post(self, url: str, msg_id: str, payload: str) -> str | None:
        """One attempt: None when delivered, else why not."""
        if not self.secret:  # a delivery stored while the server had one
            return "JOBQUEUE_WEBHOOK_SECRET is not set: deliveries cannot be signed"
        try:
            address = await checked_address(url, self.allow_hosts)
        except BadInput as refused:
            return str(refused)
        target = httpx.URL(url)
        host_header = target.netloc.decode("ascii")
        pinned = target.copy_with(host=address)
        headers = {**signed_headers(self.secret, msg_id, payload, time.time()),
                   "host": host_header, "user-agent": "jobqueue-webhooks"}
        extensions = {"sni_hostname": target.raw_host.decode("ascii")} \
            if target.scheme == "https" else {}
        try:
            async with asyncio.timeout(TIMEOUT_SECONDS):
                # Its status is all an answer is read for: a body, however large, is not.
                async with self._client.stream("POST", pinned, content=payload.encode(),
                                               headers=headers,
                                               extensions=extensions) as answer:
                    pass
        except TimeoutError:
            return f"no answer within {TIMEOUT_SECONDS:g} s"
        except httpx.TimeoutException:
            return f"no answer within {TIMEOUT_SECONDS:g} s"
        except httpx.HTTPError as error:
            return f"{type(error).__name__}: {error}"[:300]
        if 200 <= answer.status_code < 300:
            return None
        if 300 <= answer.status_code < 400:
            return f"HTTP {answer.status_code} (redirects are not followed)"
        return f"HTTP {answer.status_code}"
