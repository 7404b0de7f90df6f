"""The client library (jobqueue.client) against real servers, each test through Client and
through AsyncClient; and its retry rules against a mock transport."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import DATA, ROOT, Server, eventually, run_server
from jobqueue.client import (
    AsyncClient,
    Client,
    ClientError,
    EarlierError,
    Event,
    Job,
    JobCancelled,
    JobFailed,
    Refused,
    Result,
    RetriesExhausted,
    Retry,
    Unreachable,
)
from jobqueue.client.wire import file_name
from media import make_clip, png_size

# ---- both clients, one test body -----------------------------------------------------------


class SyncAPI:
    """Client as it is; events() gathered into a list."""

    def __init__(self, url: str, **options):
        self.client = Client(url, **options)

    def __getattr__(self, name: str):
        return getattr(self.client, name)

    def events(self, job) -> list[Event]:
        return list(self.client.events(job))

    def first_events(self, job, until) -> list[Event]:
        """Events until one that `until` accepts; the stream is then closed."""
        seen, stream = [], self.client.events(job)
        for event in stream:
            seen.append(event)
            if until(event):
                break
        stream.close()
        return seen

    def close(self) -> None:
        self.client.close()


class AsyncAPI:
    """AsyncClient's coroutines, each run to its end on a loop of the test's own."""

    def __init__(self, url: str, **options):
        self.loop = asyncio.new_event_loop()
        self.client = AsyncClient(url, **options)

    def __getattr__(self, name: str):
        method = getattr(self.client, name)
        return lambda *args, **kwargs: self.loop.run_until_complete(method(*args, **kwargs))

    def events(self, job) -> list[Event]:
        async def gather() -> list[Event]:
            return [event async for event in self.client.events(job)]
        return self.loop.run_until_complete(gather())

    def first_events(self, job, until) -> list[Event]:
        async def gather() -> list[Event]:
            seen = []
            stream = self.client.events(job)
            async for event in stream:
                seen.append(event)
                if until(event):
                    break
            await stream.aclose()
            return seen
        return self.loop.run_until_complete(gather())

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


@pytest.fixture(params=["sync", "async"])
def connect(request):
    """connect(server, **options): a Client or an AsyncClient (through AsyncAPI) on it."""
    made = []

    def make(server: Server | str, **options):
        url = server if isinstance(server, str) else server.url
        api = (SyncAPI if request.param == "sync" else AsyncAPI)(url, **options)
        made.append(api)
        return api

    make.flavour = request.param
    yield make
    for api in made:
        api.close()


@pytest.fixture
def api(server, connect):
    return connect(server)


# ---- the calls -------------------------------------------------------------------------------

def test_put_returns_the_result(api):
    result = api.put("message", data="hello library", seconds=0)
    assert isinstance(result, Result)
    assert result.data == {"message": "hello library", "length": 13, "seconds": 0}
    assert result.files == [] and result.worker_name.startswith("message-worker")
    assert result.total_elapsed_ms >= result.process_elapsed_ms >= 0
    assert api.get(result.job_id).status == "succeeded"  # /put jobs show up in /jobs too


def test_submit_then_wait(api):
    job = api.submit("message", data="later", seconds=0.2)
    assert isinstance(job, Job) and job.status == "queued" and job.job_type == "message"
    assert job.links.url == f"/jobs/{job.id}" and job.links.events == f"/jobs/{job.id}/events"
    done = api.wait(job)
    assert done.id == job.id and done.succeeded and done.finished
    assert done.result.data == {"message": "later", "length": 5, "seconds": 0.2}
    assert done.progress.fraction == 1 and done.finished_at >= done.started_at
    assert api.get(job.id) == done
    assert job.id in [listed.id for listed in api.jobs(job_type="message", limit=100)]


def test_events_yield_progress_then_the_end(api):
    job = api.submit("message", seconds=1.5)
    events = api.events(job.id)
    assert all(isinstance(event, Event) for event in events)
    *before, last = events
    assert last.finished and last.status == "succeeded" and last.job.result.data["seconds"] == 1.5
    assert before and not any(event.finished for event in before)
    assert any(event.status == "running" and event.progress.total == 1.5
               and event.progress.unit == "seconds" for event in before)
    done = [event.progress.done for event in events]
    assert done == sorted(done)


def test_download_writes_the_files(api, tmp_path):
    job = api.wait(api.submit("pdf2image", dpi=20))
    saved = api.download(job, tmp_path / "pages")
    assert [path.name for path in saved] == [f"page-00{n}.png" for n in range(1, 5)]
    assert sorted(path.name for path in (tmp_path / "pages").iterdir()) == [
        path.name for path in saved]  # and no .part files
    width, height = png_size(saved[0].read_bytes())
    assert 160 < width < 170 and 230 < height < 240  # A4 at 20 dpi
    # An upload through /put, downloaded from its Result; by id; a job without files.
    result = api.put("pdf2image", DATA / "sample.pdf", dpi=20)
    assert len(api.download(result, tmp_path / "put")) == 4
    assert len(api.download(result.job_id, tmp_path / "by-id")) == 4
    assert api.download(api.put("message", seconds=0).job_id, tmp_path / "none") == []
    assert not (tmp_path / "none").exists()


def test_download_of_an_unfinished_job_says_so(api, tmp_path):
    job = api.submit("message", seconds=30)
    try:
        with pytest.raises(ClientError, match="only a succeeded job has files"):
            api.download(job.id, tmp_path)
    finally:
        api.cancel(job)


def running(event: Event) -> bool:
    return event.status == "running"


def test_cancel_a_running_message_job(api):
    job = api.submit("message", seconds=60)
    assert running(api.first_events(job, running)[-1])
    cancelled = api.cancel(job)
    assert cancelled.id == job.id and cancelled.status == "cancelled"
    with pytest.raises(JobCancelled) as ended:
        api.wait(job)
    assert isinstance(ended.value, JobFailed) and ended.value.job.status == "cancelled"
    # Cancelling a finished job leaves it be: it is not deleted.
    assert api.cancel(job).status == "cancelled"
    assert api.get(job).status == "cancelled"


def test_delete(api):
    finished = api.wait(api.submit("message", seconds=0))
    assert api.delete(finished).status == "succeeded"
    with pytest.raises(Refused) as missing:
        api.get(finished)
    assert missing.value.status == 404 and "There is no job" in missing.value.detail
    # A running job is cancelled, then deleted.
    job = api.submit("message", seconds=60)
    api.first_events(job, running)
    assert api.delete(job).status == "cancelled"
    with pytest.raises(Refused, match="404"):
        api.get(job)
    with pytest.raises(Refused, match="404"):
        api.delete(job)


@pytest.fixture(scope="module")
def codec_lie(tmp_path_factory) -> Path:
    """A video whose container says HEVC over H.264 frames: ffprobe takes it, so it is
    accepted, and ffmpeg then fails on it (tests/corpus/make_corpus.py's codec-lie.mp4)."""
    folder = tmp_path_factory.mktemp("codec-lie")
    clip = make_clip(folder / "h264.mp4", 1)
    lie = folder / "codec-lie.mp4"
    lie.write_bytes(clip.read_bytes().replace(b"avc1", b"hvc1").replace(b"avcC", b"hvcC"))
    return lie


def test_a_failed_job_raises_job_failed_with_its_error(api, codec_lie):
    with pytest.raises(JobFailed) as put:
        api.put("video", codec_lie, width=320)
    job = put.value.job
    assert type(put.value) is JobFailed and job.status == "failed" and "ffmpeg" in job.error
    assert job.error in str(put.value) and api.get(job.id).status == "failed"

    submitted = api.submit("video", codec_lie, width=320)
    with pytest.raises(JobFailed) as waited:
        api.wait(submitted)
    assert waited.value.job.id == submitted.id and "ffmpeg" in waited.value.job.error
    with pytest.raises(JobFailed):
        api.download(submitted, "unused")


def test_refusals_carry_the_status_and_the_servers_detail(api, tmp_path):
    notes = tmp_path / "notes.pdf"
    notes.write_text("not a PDF at all")
    with pytest.raises(Refused) as refused:
        api.submit("pdf2image", notes)
    assert refused.value.status == 415 and "not a PDF" in refused.value.detail
    assert str(refused.value).startswith("415: ")
    with pytest.raises(Refused) as invalid:  # a validation error's detail is a list
        api.put("video", width=641)
    assert invalid.value.status == 422 and isinstance(invalid.value.detail, list)
    assert invalid.value.message.startswith("width: ") and "even number" in invalid.value.message
    with pytest.raises(Refused) as unknown:
        api.submit("no-such-kind")
    assert unknown.value.status == 422 and "valid job types" in unknown.value.message


def test_a_wrong_api_key_is_refused_with_401(tmp_path, connect):
    with run_server(tmp_path, api_keys="library-key") as keyed:
        for key in ("wrong-key", None):
            with pytest.raises(Refused) as refused:
                connect(keyed, api_key=key).submit("message", seconds=0)
            assert refused.value.status == 401 and not isinstance(refused.value,
                                                                   RetriesExhausted)
        client = connect(keyed, api_key="library-key")
        assert client.wait(client.submit("message", seconds=0)).succeeded


def test_an_unreachable_server(connect):
    client = connect("http://127.0.0.1:9", network_retries=1)
    with pytest.raises(Unreachable, match="cannot reach http://127.0.0.1:9"):
        client.get("some-job")


# ---- Idempotency-Key -------------------------------------------------------------------------

class LoseFirstAnswer(httpx.HTTPTransport):
    """Sends each request; the first POST /jobs's answer never reaches the client (as if the
    connection broke just after the server took the job)."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[str] = []
        self.lost: list[dict] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        return self.deliver(request, response, response.read())

    def deliver(self, request, response, body):
        if request.method == "POST" and request.url.path == "/jobs":
            self.keys.append(request.headers["Idempotency-Key"])
            if not self.lost:
                self.lost.append(json.loads(body))
                raise httpx.ReadError("connection reset by peer", request=request)
        return response


class AsyncLoseFirstAnswer(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.keys: list[str] = []
        self.lost: list[dict] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        return LoseFirstAnswer.deliver(self, request, response, await response.aread())


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_retried_submit_makes_one_job(server, client, tmp_path, flavour):
    retries: list[Retry] = []
    transport = LoseFirstAnswer() if flavour == "sync" else AsyncLoseFirstAnswer()
    api = (SyncAPI if flavour == "sync" else AsyncAPI)(server.url, transport=transport,
                                                       on_retry=retries.append)
    try:
        before = {job["id"] for job in client.get("/jobs?limit=50").json()["items"]}
        upload = tmp_path / "scan.pdf"
        upload.write_bytes((DATA / "sample.pdf").read_bytes())
        job = api.submit("pdf2image", upload, dpi=20)  # a file: sent again on the retry
        after = {job["id"] for job in client.get("/jobs?limit=50").json()["items"]}
        assert after - before == {job.id}, "the retry made a second job"
        assert transport.lost[0]["id"] == job.id
        assert len(transport.keys) == 2 and transport.keys[0] == transport.keys[1]
        assert [(retry.status, retry.idempotency_key) for retry in retries] == [
            (None, transport.keys[0])]
        assert api.wait(job).succeeded
        # A key the caller gives is used as it is: the same key, the same job.
        again = api.submit("pdf2image", upload, dpi=20, idempotency_key=transport.keys[0])
        assert again.id == job.id
    finally:
        api.close()


# ---- a busy server: 503 and Retry-After ------------------------------------------------------

@pytest.fixture(scope="module")
def busy(tmp_path_factory) -> Iterator[Server]:
    """One message worker and room for one job in the queue."""
    with run_server(tmp_path_factory.mktemp("busy"), message_workers=1,
                    message_queue_size=1) as server:
        yield server


@pytest.fixture
def full_queue(busy) -> Iterator[tuple[str, str]]:
    """A long job running and another waiting: the message queue is full. Every job is
    cancelled afterwards."""
    with busy.client() as http:
        first = http.post("/jobs", json={"seconds": 120}).json()["id"]
        eventually(lambda: http.get(f"/jobs/{first}").json()["status"] == "running")
        second = http.post("/jobs", json={"seconds": 120}).json()["id"]
        assert http.post("/jobs", json={}).status_code == 503
        yield first, second
        for job in http.get("/jobs?limit=100").json()["items"]:
            if job["status"] in ("queued", "running"):
                http.delete(f"/jobs/{job['id']}")


def test_a_503_is_retried_after_its_retry_after_until_the_job_gets_in(busy, full_queue,
                                                                       connect):
    retries: list[Retry] = []

    def free_a_slot(retry: Retry) -> None:  # told before the wait: the queue then has room
        retries.append(retry)
        if len(retries) == 1:
            assert httpx.delete(f"{busy.url}/jobs/{full_queue[1]}").status_code == 200

    client = connect(busy, on_retry=free_a_slot)
    job = client.submit("message", seconds=0)
    assert job.status == "queued"
    assert len(retries) == 1
    retry = retries[0]
    assert retry.status == 503 and "queue is full" in retry.detail
    assert retry.retry_after >= 1 and retry.wait == retry.retry_after  # as the server said
    assert retry.attempt == 1 and retry.method == "POST" and retry.url.endswith("/jobs")
    assert retry.idempotency_key  # the same key for the attempt after it
    assert client.get(job).status in ("queued", "running", "succeeded")


def test_past_the_caps_the_503_is_raised(busy, full_queue, connect):
    retries: list[Retry] = []
    # A Retry-After (at least 1 s) longer than one wait may be; no time left at all.
    for options in ({"max_retry_wait": 0.5}, {"max_retry_seconds": 0}):
        with pytest.raises(RetriesExhausted) as exhausted:
            connect(busy, on_retry=retries.append, **options).submit("message")
        assert exhausted.value.status == 503 and exhausted.value.attempts == 1
        assert "queue is full" in exhausted.value.detail and isinstance(exhausted.value, Refused)
    assert retries == []
    # Some retries, then no time left for the next wait. The server's Retry-After grows with
    # its running job's age (soon past 2.5 s: no retry at all), so it is cut to 1 s here.
    transport = (ShortRetryAfter if connect.flavour == "sync" else AsyncShortRetryAfter)()
    with pytest.raises(RetriesExhausted) as exhausted:
        connect(busy, on_retry=retries.append, max_retry_seconds=2.5,
                transport=transport).put("message")
    assert len(retries) >= 1, "no retry happened"
    assert exhausted.value.attempts == len(retries) + 1
    assert all(retry.status == 503 and retry.method == "POST" and retry.wait == 1
               and "queue is full" in retry.detail for retry in retries)


def short_retry_after(response: httpx.Response) -> httpx.Response:
    if response.status_code == 503:
        response.headers["Retry-After"] = "1"
    return response


class ShortRetryAfter(httpx.HTTPTransport):
    """The server's answers, a 503's Retry-After cut to 1 s."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return short_retry_after(super().handle_request(request))


class AsyncShortRetryAfter(httpx.AsyncHTTPTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return short_retry_after(await super().handle_async_request(request))


def test_wait_asks_for_the_job_when_no_event_stream_is_free(tmp_path, connect):
    with run_server(tmp_path, max_streams=1, message_workers=2) as server:
        client = connect(server)
        long = client.submit("message", seconds=60)
        with httpx.stream("GET", f"{server.url}/jobs/{long.id}/events") as held:
            assert held.status_code == 200  # the one stream there is
            job = client.submit("message", seconds=0.5)
            assert httpx.get(f"{server.url}/jobs/{job.id}/events").status_code == 503
            assert client.wait(job).succeeded
        client.cancel(long)


# ---- asyncio: many jobs at once --------------------------------------------------------------

def test_async_client_follows_many_jobs_at_once(server):
    async def main() -> list[Job]:
        async with AsyncClient(server.url) as client:
            jobs = await asyncio.gather(*(client.submit("message", data=str(n), seconds=0.3)
                                          for n in range(4)))
            return await asyncio.gather(*(client.wait(job) for job in jobs))

    done = asyncio.run(main())
    assert [job.result.data["message"] for job in done] == ["0", "1", "2", "3"]


# ---- the retry rules, on a mock transport ----------------------------------------------------

def answers(*responses: httpx.Response):
    """A mock transport answering these in turn; the requests it got are in .requests."""
    sent: list[httpx.Request] = []
    queue = list(responses)

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    transport = httpx.MockTransport(handle)
    transport.requests = sent
    return transport


ACCEPTED = {"id": "j1", "jobType": "message", "status": "queued",
            "links": {"self": "/jobs/j1", "events": "/jobs/j1/events",
                      "result": "/jobs/j1/result", "cancel": "/jobs/j1"}}


def test_429_and_503_are_retried_with_the_same_key_and_retry_after_honoured():
    retries: list[Retry] = []
    transport = answers(
        httpx.Response(429, json={"detail": "Rate limit exceeded"}, headers={"Retry-After": "0"}),
        httpx.Response(503, json={"detail": "The message queue is full"},
                       headers={"Retry-After": "Thu, 01 Jan 1970 00:00:00 GMT"}),  # passed
        httpx.Response(503, json={"detail": "busy"}),  # no Retry-After: 1 s
        httpx.Response(202, json=ACCEPTED))
    with Client("http://jobs.test", transport=transport, on_retry=retries.append) as client:
        job = client.submit("message", seconds=1)
    assert job.id == "j1" and job.links.url == "/jobs/j1"
    # A Retry-After of 0 (or a date passed) is waited 0.1 s, not a busy loop.
    assert [(r.status, r.retry_after, r.wait) for r in retries] == [
        (429, 0, 0.1), (503, 0, 0.1), (503, None, 1)]
    keys = {request.headers["Idempotency-Key"] for request in transport.requests}
    assert len(transport.requests) == 4 and len(keys) == 1
    assert json.loads(transport.requests[0].content) == {"seconds": 1, "jobType": "message"}


def test_a_put_is_not_sent_again_once_it_may_have_reached_the_server():
    transport = answers(httpx.ConnectError("refused"),  # never got there: sent again
                        httpx.ReadError("reset"))  # may have run: not sent again
    client = Client("http://jobs.test", transport=transport, on_retry=lambda retry: None)
    with pytest.raises(Unreachable, match="reset"):
        client.put("message")
    assert len(transport.requests) == 2
    # A GET is sent again after any network error, up to network_retries times in a row.
    transport = answers(httpx.ReadError("reset"), httpx.ReadError("reset"),
                        httpx.Response(200, json={"items": []}))
    client = Client("http://jobs.test", transport=transport, network_retries=2,
                    on_retry=lambda retry: None)
    assert client.jobs() == []


FAILED_JOB = {"id": "j9", "jobType": "video", "status": "failed", "attempt": 1,
              "error": "The object store is unavailable; retry later."}


def test_a_put_whose_job_ran_is_never_sent_again(connect):
    """A /put whose job ran and ended Unavailable is answered 503 with its Location: the job
    exists (and ran), so the answer is its end, JobFailed, not a busy server to wait out."""
    puts: list[httpx.Request] = []
    retries: list[Retry] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/put":
            puts.append(request)
            if len(puts) == 1:
                return httpx.Response(503, json={"detail": FAILED_JOB["error"]},
                                      headers={"Location": "http://jobs.test/jobs/j9",
                                               "Retry-After": "0"})
            return httpx.Response(200, json={"data": {"id": "j10", "result": {"data": {}}}})
        if request.method == "GET" and request.url.path == "/jobs/j9":
            return httpx.Response(200, json=FAILED_JOB)
        return httpx.Response(404, json={"detail": "no such route"})

    client = connect("http://jobs.test", transport=httpx.MockTransport(handle),
                     on_retry=retries.append)
    with pytest.raises(JobFailed) as failed:
        client.put("video", b"an upload", width=320)
    assert len(puts) == 1, "the /put was sent again"
    assert retries == []
    assert type(failed.value) is JobFailed and failed.value.job.id == "j9"
    assert failed.value.job.error == FAILED_JOB["error"]


def file_links(*links: str) -> Result:
    return Result("j1", {}, list(links))


def serving_files() -> httpx.MockTransport:
    """Every GET answered with its own path as the file; the requests are in .requests."""
    sent: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, content=request.url.path.encode())

    transport = httpx.MockTransport(handle)
    transport.requests = sent
    return transport


def test_download_sends_the_api_key_to_the_servers_origin_only(connect, tmp_path):
    links = ["/jobs/j1/files/page-001.png",
             "http://jobs.test:80/jobs/j1/files/page-002.png",  # the same origin
             "https://cdn.test/j1/page-003.png",  # another host
             "http://jobs.test:8080/j1/page-004.png",  # another port
             "https://jobs.test/j1/page-005.png",  # another scheme
             "http://evil.jobs.test/j1/page-006.png"]
    transport = serving_files()
    client = connect("http://jobs.test", api_key="secret", transport=transport)
    saved = client.download(file_links(*links), tmp_path)
    assert [path.name for path in saved] == [f"page-00{n}.png" for n in range(1, 7)]
    assert [request.headers.get("X-API-Key") for request in transport.requests] == [
        "secret", "secret", None, None, None, None]
    assert saved[2].read_bytes() == b"/j1/page-003.png"


@pytest.mark.parametrize("links, name", [
    (("/jobs/j1/files/out.png", "https://cdn.test/elsewhere/out.png"), "out.png"),
    (("/jobs/j1/files/page-001.png", "/jobs/j1/files/C:page-002.png"), "C:page-002.png"),
])
def test_download_writes_nothing_when_a_name_is_unusable(connect, tmp_path, links, name):
    """Two links of one name would overwrite each other; a name the folder cannot take is
    refused: either before any file is fetched or written."""
    transport = serving_files()
    client = connect("http://jobs.test", transport=transport)
    with pytest.raises(ClientError, match=name):
        client.download(file_links(*links), tmp_path / "out")
    assert transport.requests == [] and not (tmp_path / "out").exists()


def test_file_name_keeps_the_servers_names_and_refuses_the_rest():
    for link, name in [("/jobs/j1/files/page-001.png", "page-001.png"),
                       ("http://jobs.test/jobs/j1/files/output.mp4", "output.mp4"),
                       ("/prefix/jobs/j1/files/text.txt", "text.txt"),
                       ("/jobs/j1/files/page%20one.png", "page one.png")]:
        assert file_name(link) == name
    for link in ["/jobs/j1/files/a:b.png", "/jobs/j1/files/C%3Aevil.png",
                 "/jobs/j1/files/x%00.png", "/jobs/j1/files/..%5Cx.png",
                 "/jobs/j1/files/a%5Cb.png", "/jobs/j1/files/a%2Fb.png",
                 "/jobs/j1/files/..", "/jobs/j1/files/%2E%2E", "/jobs/j1/files/.hidden",
                 "/jobs/j1/files/a..b", "/jobs/j1/files/tab%09.png", ""]:
        with pytest.raises(ClientError, match="unusable file name"):
            file_name(link)


def test_the_library_imports_nothing_of_the_server():
    code = ("import sys, httpx, httpx_sse\n"
            "before = set(sys.modules)\n"
            "import jobqueue.client\n"
            "print(sorted(name for name in set(sys.modules) - before\n"
            "             if name.split('.')[0] in ('fastapi', 'starlette', 'pydantic', 'rich',\n"
            "                                       'uvicorn')\n"
            "             or name.startswith('jobqueue.') and not\n"
            "             name.startswith('jobqueue.client')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ---- priorities, retries and Prefer, on a mock transport (no server needed) ------------------

RETRYING_JOB = {
    "id": "j2", "jobType": "message", "status": "queued", "attempt": 2, "maxAttempts": 3,
    "priority": 5, "queuePosition": 1, "estimatedStartSeconds": 0,
    "nextAttemptAt": "2026-12-07T17:00:02+00:00",
    "earlierErrors": [{"attempt": 1, "error": "ConnectionError: flaky",
                       "finishedAt": "2026-12-07T17:00:00+00:00"},
                      {"attempt": 2, "error": "ConnectionError: flakier",
                       "finishedAt": "2026-12-07T17:00:01.5+00:00"}],
    "progress": {"done": 0, "total": 0, "unit": ""}, "createdAt": "2026-12-07T16:59:59+00:00"}


def test_a_job_reads_the_retry_and_priority_fields():
    job = Job.from_json(RETRYING_JOB)
    assert (job.attempt, job.max_attempts, job.priority) == (2, 3, 5)
    assert job.next_attempt_at.isoformat() == "2026-12-07T17:00:02+00:00"
    assert job.estimated_start_seconds == 0 and job.queue_position == 1
    utc = datetime.timezone.utc
    assert job.earlier_errors == (
        EarlierError(1, "ConnectionError: flaky", datetime.datetime(2026, 12, 7, 17, tzinfo=utc)),
        EarlierError(2, "ConnectionError: flakier",
                     datetime.datetime(2026, 12, 7, 17, 0, 1, 500000, tzinfo=utc)))
    assert not job.finished  # waiting for its next attempt: queued


def test_a_job_from_a_server_without_the_new_fields():
    old = Job.from_json({"id": "j3", "jobType": "message", "status": "queued"})
    assert old.priority == 0 and old.max_attempts is None and old.next_attempt_at is None
    assert old.earlier_errors == () and old.estimated_start_seconds is None
    # `estimatedStartSeconds` is omitted when there is no estimate; present, it is a number.
    assert Job.from_json({**ACCEPTED, "estimatedStartSeconds": 12.5}).estimated_start_seconds \
        == 12.5


def recording(handle):
    """A mock transport calling `handle(request)`; the requests it got are in .requests."""
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return handle(request)

    transport = httpx.MockTransport(record)
    transport.requests = sent
    return transport


FINISHED_JOB = {"id": "j1", "jobType": "message", "status": "succeeded", "attempt": 1,
                "priority": 3, "progress": {"done": 1, "total": 1, "unit": "seconds"},
                "result": {"data": {"message": "hi"}, "files": []}}


def test_submit_sends_priority_and_prefer_wait(connect):
    transport = recording(lambda request: httpx.Response(
        200, json=FINISHED_JOB, headers={"Preference-Applied": "wait=5"}))
    client = connect("http://jobs.test", transport=transport)
    job = client.submit("message", data="hi", priority=3, wait=5)
    assert job.succeeded and job.result.data == {"message": "hi"} and job.priority == 3
    assert job.links is None  # a finished job's status, not the Accepted body
    sent = transport.requests[0]
    assert sent.headers["Prefer"] == "wait=5" and sent.headers["Idempotency-Key"]
    assert json.loads(sent.content) == {"data": "hi", "priority": 3, "jobType": "message"}
    # A fraction of a second is sent as it is; no wait, no Prefer; a file: a form field.
    client.submit("message", wait=0.5)
    assert transport.requests[1].headers["Prefer"] == "wait=0.5"
    client.submit("pdf2image", b"%PDF-1.4 ...", priority=-2)
    assert "Prefer" not in transport.requests[2].headers
    assert b'name="priority"\r\n\r\n-2\r\n' in transport.requests[2].read()


def test_submit_with_wait_returns_a_failed_job_and_a_202_as_before(connect):
    failed = {**FINISHED_JOB, "status": "failed", "result": None, "error": "ValueError: no"}
    answers_ = [httpx.Response(200, json=failed), httpx.Response(202, json=ACCEPTED)]
    client = connect("http://jobs.test", transport=recording(lambda r: answers_.pop(0)))
    job = client.submit("message", wait=1)
    assert job.status == "failed" and job.error == "ValueError: no"  # returned, not raised
    job = client.submit("message", wait=1)  # not ended within the wait
    assert job.status == "queued" and job.links.url == "/jobs/j1"


def test_bad_priority_and_wait_are_refused_before_sending(connect):
    transport = recording(lambda request: httpx.Response(202, json=ACCEPTED))
    client = connect("http://jobs.test", transport=transport)
    for arguments in ({"priority": 1.5}, {"priority": True}, {"priority": "5"},
                      {"wait": -1}, {"wait": float("inf")}):
        with pytest.raises(ValueError):
            client.submit("message", **arguments)
    with pytest.raises(ValueError, match="respond_async_after"):
        client.put("message", respond_async_after=float("nan"))
    assert transport.requests == []


def test_put_respond_async_returns_a_job_to_wait_for(connect):
    running = {**RETRYING_JOB, "id": "j4", "status": "running", "attempt": 1}
    del running["nextAttemptAt"], running["earlierErrors"], running["estimatedStartSeconds"]
    transport = recording(lambda request: httpx.Response(
        202, json=running, headers={"Location": "/jobs/j4",
                                    "Preference-Applied": "respond-async"}))
    client = connect("http://jobs.test", transport=transport)
    job = client.put("message", data="slow", priority=1, respond_async_after=2)
    assert isinstance(job, Job) and job.id == "j4" and job.status == "running"
    sent = transport.requests[0]
    assert sent.url.path == "/put" and sent.headers["Prefer"] == "respond-async, wait=2"
    assert json.loads(sent.content)["priority"] == 1
    assert len(transport.requests) == 1  # a 202 is an answer, not retried


def test_put_without_respond_async_keeps_its_result_and_its_504(connect):
    puts = [httpx.Response(200, json={"data": {"id": "j5", "result": {"data": {}}}}),
            httpx.Response(504, json={"detail": "Job j6 ... did not finish within 5 s"})]
    transport = recording(lambda request: puts.pop(0))
    client = connect("http://jobs.test", transport=transport)
    assert isinstance(client.put("message"), Result)
    assert "Prefer" not in transport.requests[0].headers
    with pytest.raises(Refused) as timed_out:
        client.put("message")
    assert timed_out.value.status == 504


def test_retry_posts_to_the_jobs_retry_route(connect):
    outcomes = {"j1": httpx.Response(202, json=ACCEPTED, headers={"Location": "/jobs/j1"}),
                "j7": httpx.Response(409, json={"detail": "Job j7 has not failed"}),
                "j8": httpx.Response(410, json={"detail": "Job j8's upload is gone"})}
    transport = recording(lambda request: outcomes[request.url.path.split("/")[2]])
    client = connect("http://jobs.test", transport=transport)
    job = client.retry(Job.from_json({**FAILED_JOB, "id": "j1"}))
    assert job.status == "queued" and job.links.events == "/jobs/j1/events"
    assert (transport.requests[0].method, transport.requests[0].url.path) == (
        "POST", "/jobs/j1/retry")
    for ident, status in (("j7", 409), ("j8", 410)):
        with pytest.raises(Refused) as refused:
            client.retry(ident)
        assert refused.value.status == status


# ---- NEEDS THE SERVER SIDE of priorities, retries and Prefer: these fail until it is merged --
# (written against the contract in docs/api.md#priorities-fair-share-and-retries)

def test_server_submit_with_wait_answers_the_finished_job(api):
    job = api.submit("message", data="soon", seconds=0.2, wait=10)
    assert job.status == "succeeded" and job.result.data["message"] == "soon"
    assert job.links is None and job.priority == 0
    slow = api.submit("message", seconds=30, wait=0.5)  # not ended within the wait: 202
    try:
        assert slow.status in ("queued", "running") and slow.links.url == f"/jobs/{slow.id}"
    finally:
        api.cancel(slow)


def test_server_put_respond_async_after_gives_a_job_that_runs_on(api, tmp_path):
    job = api.put("message", data="early", seconds=2, respond_async_after=0.5)
    assert isinstance(job, Job) and job.status in ("queued", "running")
    done = api.wait(job)
    assert done.succeeded and done.result.data["message"] == "early"
    quick = api.put("message", data="quick", seconds=0, respond_async_after=5)
    assert isinstance(quick, Result) and quick.data["message"] == "quick"
    # A kept job: its upload kept, its files downloadable.
    pages = api.put("pdf2image", DATA / "sample.pdf", dpi=20, respond_async_after=0)
    if isinstance(pages, Job):
        pages = api.wait(pages)
    assert len(api.download(pages, tmp_path / "pages")) == 4


def test_server_higher_priority_runs_first(tmp_path, connect):
    with run_server(tmp_path, message_workers=1) as server:
        client = connect(server)
        blocker = client.submit("message", seconds=1)
        low = client.submit("message", seconds=0, priority=-1)
        plain = client.submit("message", seconds=0)
        high = client.submit("message", seconds=0, priority=5)
        assert client.get(high).priority == 5
        done = [client.wait(job) for job in (blocker, low, plain, high)]
        starts = {job.id: job.started_at for job in done}
        assert starts[high.id] < starts[plain.id] < starts[low.id]
        for priority in (11, -11):
            with pytest.raises(Refused) as refused:
                client.submit("message", seconds=0, priority=priority)
            assert refused.value.status == 422


def test_server_priority_over_the_keys_cap_is_422_naming_the_setting(tmp_path, connect):
    with run_server(tmp_path, max_priority_per_key="*=2") as server:
        client = connect(server)
        assert client.wait(client.submit("message", seconds=0, priority=2)).priority == 2
        with pytest.raises(Refused) as refused:
            client.put("message", seconds=0, priority=3)
        assert refused.value.status == 422
        assert "JOBQUEUE_MAX_PRIORITY_PER_KEY" in refused.value.message


def test_server_max_queued_per_key_is_a_429_the_client_waits_out(tmp_path, connect):
    retries: list[Retry] = []
    with run_server(tmp_path, message_workers=1, max_queued_per_key=1) as server:
        client = connect(server, on_retry=retries.append, max_retry_seconds=0)
        running = client.submit("message", seconds=30)
        eventually(lambda: client.get(running).status == "running")
        waiting = client.submit("message", seconds=0)
        with pytest.raises(RetriesExhausted) as refused:  # no time to wait it out
            client.submit("message", seconds=0)
        assert refused.value.status == 429
        assert "JOBQUEUE_MAX_QUEUED_PER_KEY" in refused.value.message
        assert refused.value.response.headers["Retry-After"]
        client.cancel(running)
        client.cancel(waiting)


def test_server_retry_runs_a_failed_job_again(api, codec_lie):
    job = api.submit("video", codec_lie, width=320)
    with pytest.raises(JobFailed) as failed:
        api.wait(job)
    first = failed.value.job
    again = api.retry(job)
    assert again.id == job.id and again.status == "queued"
    assert again.links.url == f"/jobs/{job.id}"
    with pytest.raises(JobFailed) as failed_again:  # the same input fails the same way
        api.wait(again)
    last = failed_again.value.job
    assert last.attempt > first.attempt and "ffmpeg" in last.error
    # Only a failed job runs again.
    done = api.wait(api.submit("message", seconds=0))
    with pytest.raises(Refused) as refused:
        api.retry(done)
    assert refused.value.status == 409
    with pytest.raises(Refused) as missing:
        api.retry("no-such-job")
    assert missing.value.status == 404


def test_server_a_job_shows_its_priority_and_estimated_start(api):
    job = api.get(api.submit("message", seconds=0, priority=1))
    assert job.priority == 1 and job.raw["priority"] == 1
    if job.status == "queued" and "estimatedStartSeconds" in job.raw:
        assert job.estimated_start_seconds >= 0
    api.wait(job)
