"""Completion webhooks (webhooks.py) against a real receiver on loopback: signed deliveries a
receiver verifies with standardwebhooks, retries after a failure, a restart while a delivery
is pending, and the refusals (no server-side request forgery), on both engines where cheap."""

from __future__ import annotations

import base64
import ipaddress
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from standardwebhooks import Webhook

from conftest import eventually, free_port, run_server, scrape, value
from deployments import ENGINES, deploy
from jobqueue import webhooks
from jobqueue.client import Callback, Client

SECRET = "whsec_" + base64.b64encode(b"jobqueue test webhook secret 32b").decode()
# The tests' receiver listens on loopback: only this setting lets a callback go there.
ALLOW = {"webhook_secret": SECRET, "webhook_allow_hosts": "127.0.0.1"}


@dataclass
class Receiver:
    """An http.server on a free loopback port: records each request, answers `answers` in
    turn (then `then`)."""

    url: str
    answers: list[int] = field(default_factory=list)
    then: int = 200
    requests: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def got(self, path: str = "/hook") -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]


@contextmanager
def receiver(answers: list[int] | None = None, then: int = 200) -> Iterator[Receiver]:
    port = free_port()
    state = Receiver(f"http://127.0.0.1:{port}/hook", list(answers or []), then)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            with state.lock:
                state.requests.append({"path": self.path, "headers": dict(self.headers),
                                       "body": body})
                status = state.answers.pop(0) if state.answers else state.then
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", f"http://127.0.0.1:{port}/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def callback_of(client: httpx.Client, job_id: str) -> dict:
    answer = client.get(f"/jobs/{job_id}")
    assert answer.status_code == 200, answer.text
    return answer.json().get("callback", {})


def wait_callback(client: httpx.Client, job_id: str, status: str, seconds: float = 30) -> dict:
    deadline = time.monotonic() + seconds
    while (callback := callback_of(client, job_id)).get("status") != status:
        assert time.monotonic() < deadline, f"job {job_id}: callback never {status}: {callback}"
        time.sleep(0.05)
    return callback


def verified(request: dict) -> dict:
    """The body of a delivery, as a receiver verifies it with standardwebhooks."""
    return Webhook(SECRET).verify(request["body"], request["headers"])


def submit(client: httpx.Client, **fields) -> dict:
    answer = client.post("/jobs", json={"data": "hi", "seconds": 0, **fields})
    assert answer.status_code == 202, answer.text
    return answer.json()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_delivery_is_signed_and_retried_after_a_500(engine, request, tmp_path):
    """Two attempts (a 500, then a 200), each made once, by one of the two replicas that both
    look for due deliveries in the distributed mode; the receiver verifies each."""
    postgres = request.getfixturevalue("postgres") if engine == "postgres" else None
    with receiver([500]) as hook, \
            deploy(engine, tmp_path, postgres, replicas=2, **ALLOW) as cluster, \
            cluster.client() as client:
        job = submit(client, callbackUrl=hook.url)
        # Shown from the submit on (on a loaded machine both attempts may be made already).
        assert callback_of(client, job["id"])["status"] in ("pending", "delivered")
        callback = wait_callback(client, job["id"], "delivered")
        assert callback == {"status": "delivered", "attempts": 2}
        first, second = hook.got()
        # One event: the same id and body on its retry, each signed.
        assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"]
        assert first["body"] == second["body"]
        document = verified(second)
        assert document["id"] == job["id"] and document["status"] == "succeeded"
        assert document["result"]["data"]["message"] == "hi"
        assert "callback" not in document
        assert second["headers"]["content-type"] == "application/json"
        with pytest.raises(Exception):  # another secret does not verify it
            Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(
                second["body"], second["headers"])
        if engine == "embedded":  # this process made both attempts
            samples = scrape(f"{cluster.server.url}/metrics")
            assert value(samples, "jobqueue_webhook_deliveries_total", outcome="delivered") == 1
            assert value(samples, "jobqueue_webhook_deliveries_total", outcome="retried") == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_a_pending_delivery_survives_a_restart(engine, request, tmp_path):
    postgres = request.getfixturevalue("postgres") if engine == "postgres" else None
    with receiver(then=500) as hook:
        with deploy(engine, tmp_path, postgres, **ALLOW) as before, before.client() as client:
            database = before.env.get("JOBQUEUE_DATABASE_URL")
            job = submit(client, callbackUrl=hook.url)
            eventually(lambda: callback_of(client, job["id"]).get("attempts", 0) >= 1)
            assert callback_of(client, job["id"])["status"] == "pending"
            assert callback_of(client, job["id"])["lastError"] == "HTTP 500"
        hook.then = 200  # the receiver is back while the server is down
        with deploy(engine, tmp_path, database_url=database, **ALLOW) as after, \
                after.client() as client:
            # Within a claim's lease (30 s) at most, should the stop have cut an attempt short.
            callback = wait_callback(client, job["id"], "delivered", seconds=60)
            assert callback["attempts"] >= 2
        requests = hook.got()
        assert len({r["headers"]["webhook-id"] for r in requests}) == 1
        assert verified(requests[-1])["id"] == job["id"]


def test_refused_callback_urls(tmp_path):
    """A callback to a loopback, private, link-local or metadata address, or not over http(s),
    is 422 at submit, naming why and the setting; so is one on a /put that waits."""
    with run_server(tmp_path, webhook_secret=SECRET) as server, server.client() as client:
        for url, why in [("http://10.0.0.1/hook", "private"),
                         ("http://127.0.0.1:9/hook", "loopback"),
                         ("http://[::1]/hook", "loopback"),
                         ("http://[::ffff:127.0.0.1]/hook", "loopback"),
                         ("http://169.254.169.254/latest/meta-data", "metadata"),
                         ("http://[fd00:ec2::254]/", "metadata"),
                         ("http://0.0.0.0/", "unspecified"),
                         ("http://localhost:8000/", "loopback")]:
            answer = client.post("/jobs", json={"data": "x", "callbackUrl": url})
            assert answer.status_code == 422, (url, answer.text)
            assert why in answer.json()["detail"], answer.json()
            assert "JOBQUEUE_WEBHOOK_ALLOW_HOSTS" in answer.json()["detail"]
        for url in ["file:///etc/passwd", "ftp://example.com/", "gopher://x", "not a url",
                    "http://user:pw@example.com/"]:
            # As multipart form fields, the other way a job's fields come.
            answer = client.post("/jobs", files={"data": (None, "x"), "callbackUrl": (None, url)})
            assert answer.status_code == 422, (url, answer.text)
            assert "http://" in answer.json()["detail"]
        answer = client.post("/put", json={"data": "x", "seconds": 0,
                                           "callbackUrl": "http://10.0.0.1/"})
        assert answer.status_code == 422 and "respond-async" in answer.json()["detail"]
        assert client.get("/jobs").json()["items"] == []  # nothing was queued
    with run_server(tmp_path / "unsigned") as server, server.client() as client:
        answer = client.post("/jobs", json={"data": "x", "callbackUrl": "https://example.com/"})
        assert answer.status_code == 422
        assert "JOBQUEUE_WEBHOOK_SECRET" in answer.json()["detail"]


def test_a_redirect_is_not_followed_and_delivery_gives_up(tmp_path):
    """A 3xx is a failed attempt (its Location never asked); past JOBQUEUE_WEBHOOK_RETRY_HOURS
    the delivery has failed."""
    with receiver(then=302) as hook, \
            run_server(tmp_path, webhook_retry_hours=0.0005, **ALLOW) as server, \
            server.client() as client:
        job = submit(client, callbackUrl=hook.url)
        callback = wait_callback(client, job["id"], "failed")
        assert callback["lastError"] == "HTTP 302 (redirects are not followed)"
        assert callback["attempts"] == len(hook.got()) >= 1
        assert hook.got("/elsewhere") == []
        samples = scrape(f"{server.url}/metrics")
        assert value(samples, "jobqueue_webhook_deliveries_total", outcome="failed") == 1


def test_put_respond_async_and_the_keys_default_url(tmp_path):
    """/put with Prefer: respond-async takes a callbackUrl; an API key's JOBQUEUE_WEBHOOK_URLS
    is the default of its jobs, and an empty callbackUrl opts out of it. A deleted job's
    delivery goes with it."""
    with receiver() as hook:
        default = hook.url.replace("/hook", "/default")
        with run_server(tmp_path, api_keys="alpha,beta", webhook_urls=f"alpha={default}",
                        **ALLOW) as server, \
                server.client(headers={"X-API-Key": "alpha"}) as alpha, \
                server.client(headers={"X-API-Key": "beta"}) as beta:
            answer = alpha.post("/put", headers={"Prefer": "respond-async, wait=0"},
                                json={"data": "put", "seconds": 0.5, "callbackUrl": hook.url})
            assert answer.status_code in (200, 202), answer.text
            put_id = answer.json()["id"] if answer.status_code == 202 \
                else answer.json()["data"]["id"]
            wait_callback(alpha, put_id, "delivered")
            assert verified(hook.got()[0])["id"] == put_id
            by_default = submit(alpha)
            wait_callback(alpha, by_default["id"], "delivered")
            assert verified(hook.got("/default")[0])["id"] == by_default["id"]
            # Another key has no default; an empty callbackUrl opts out of alpha's.
            for client, job in ((beta, submit(beta)), (alpha, submit(alpha, callbackUrl=""))):
                finished = client.get(f"/jobs/{job['id']}").json()
                assert "callback" not in finished
            # Deleted with its job.
            eventually(lambda: alpha.get(f"/jobs/{by_default['id']}").json()["status"]
                       == "succeeded")
            assert alpha.delete(f"/jobs/{by_default['id']}").status_code == 200
            with sqlite3.connect(server.out_dir / "jobs.db") as db:
                rows = db.execute("SELECT job_id FROM deliveries").fetchall()
            assert (by_default["id"],) not in rows and (put_id,) in rows


def test_the_delivered_body_is_the_status_document(tmp_path):
    """The body is GET /jobs/{id}'s answer but for its `callback`; the client library shows
    the delivery (a callbackUrl passed as an option)."""
    with receiver() as hook, run_server(tmp_path, **ALLOW) as server, \
            Client(server.url) as library:
        job = library.submit("message", data="by the library", seconds=0, callbackUrl=hook.url)
        with server.client() as client:
            wait_callback(client, job.id, "delivered")
            shown = client.get(f"/jobs/{job.id}").json()
        delivered = json.loads(hook.got()[0]["body"])
        assert shown.pop("callback") == {"status": "delivered", "attempts": 1}
        assert delivered == shown
        assert library.get(job.id).callback == Callback("delivered", 1, None)


def test_the_address_rules():
    """webhooks.refusal: every non-public address is refused, public ones are not."""
    for address in ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                    "169.254.1.1", "100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1",
                    "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "fd00:ec2::254",
                    "ff02::1", "::ffff:10.0.0.1", "100.100.100.200", "198.18.0.1",
                    "2002:7f00:1::", "2002:a00:1::", "fec0::1", "168.63.129.16",
                    "2001:0:4136:e378:8000:63bf:f5ff:fffe"]:  # Teredo of 10.0.0.1
        assert webhooks.refusal(ipaddress.ip_address(address)) is not None, address
    for address in ["93.184.215.14", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]:
        assert webhooks.refusal(ipaddress.ip_address(address)) is None, address
    assert webhooks.next_delay(1) == 1 and webhooks.next_delay(3) == 4
    assert webhooks.next_delay(40) == webhooks.MAX_DELAY_SECONDS


def test_a_cancelled_job_is_told_too(tmp_path):
    """Every end is delivered: a DELETE of a running job ends it cancelled, and its status
    document says so."""
    with receiver() as hook, run_server(tmp_path, **ALLOW) as server, \
            server.client() as client:
        job = submit(client, seconds=30, callbackUrl=hook.url)
        eventually(lambda: client.get(f"/jobs/{job['id']}").json()["status"] == "running")
        assert client.delete(f"/jobs/{job['id']}").json()["status"] == "cancelled"
        wait_callback(client, job["id"], "delivered")
        assert verified(hook.got()[0])["status"] == "cancelled"


def test_a_url_the_client_cannot_send_to_is_422(tmp_path):
    """Control characters, and a host name IDNA 2008 refuses, are 422 at submit, not an
    accepted job whose every delivery fails."""
    for url in ["http://8.8.8.8/\x00", "http://8.8.8.8/a\x01b", "http://ex\u00adample.com/"]:
        with pytest.raises(webhooks.BadInput):
            webhooks.parse_url(url)
    with run_server(tmp_path, **ALLOW) as server, server.client() as client:
        for url in ["http://8.8.8.8/\x7f", 0, False, [], {"url": "http://8.8.8.8/"}]:
            answer = client.post("/jobs", json={"data": "hi", "callbackUrl": url})
            assert answer.status_code == 422 and "callbackUrl" in answer.json()["detail"], url


def test_the_store_keeps_a_callback_until_its_jobs_row_is_written(tmp_path):
    """A worker can start a job before its submit saves it queued: the callback, noted first,
    waits for the batch that writes the job's row (the start's), and goes with a delete."""
    from jobqueue.records import JobRecord, SqliteJobStore

    store = SqliteJobStore(tmp_path / "jobs.db")
    try:
        for job_id in ("started", "deleted"):
            store.add_callback(job_id, "", "http://example.com/hook")
        store.flush()  # a batch with the callbacks and neither job's row
        store.save(JobRecord("started", "message", "running", {}, None, time.time()))
        store.delete("deleted")
        store.flush()
        assert store.delivery("started")["url"] == "http://example.com/hook"
        assert store.delivery("deleted") is None
        with sqlite3.connect(tmp_path / "jobs.db") as db:
            rows = db.execute("SELECT job_id FROM deliveries").fetchall()
        assert rows == [("started",)]
    finally:
        store.close()


def test_an_attempt_cut_short_is_due_again_once_its_claim_runs_out(tmp_path):
    """The first attempt's claim, never given back (its process died, or its note of the
    answer failed): due again after the lease, as a retry's is."""
    from jobqueue.records import JobRecord, SqliteJobStore

    store = SqliteJobStore(tmp_path / "jobs.db")
    try:
        now = time.time()
        store.save(JobRecord("job", "message", "succeeded", {}, None, now - 2,
                             finished_at=now - 1))
        store.add_callback("job", "", "http://example.com/hook")
        store.flush()
        [claimed] = store.claim_deliveries(now, 16, 30)
        assert claimed["attempts"] == 0
        assert store.claim_deliveries(now + 29, 16, 30) == []  # still claimed
        [again] = store.claim_deliveries(now + 31, 16, 30)
        assert (again["job_id"], again["attempts"]) == ("job", 0)
        # The first claim's late note counts no more: the second claim's does.
        for claim, status in ((claimed, "pending"), (again, "delivered")):
            store.delivery_done("job", claim["ended_at"], "delivered", 1, None, None, "{}",
                                claim["claimed_until"])
            assert store.delivery("job")["status"] == status
    finally:
        store.close()
