"""GET /events: one stream of queue sizes and job changes, as the dashboard reads it; clients
that leave a stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator

import anyio
from fastapi.sse import EventSourceResponse
from httpx_sse import connect_sse

from conftest import eventually, run_server, wait_finished
from jobqueue.api.app import create_app
from jobqueue.settings import Settings


def test_events_stream_queues_and_job_changes(server, client):
    seen: list[tuple[str, object]] = []
    job_id = None
    with connect_sse(client, "GET", "/events", params={"limit": 5}) as events:
        assert events.response.headers["content-type"].startswith("text/event-stream")
        stream = events.iter_sse()
        first, second = next(stream), next(stream)
        assert first.event == "queues"
        assert set(first.json()) == {"message", "pdf2image", "video"}
        assert first.json()["message"]["workers"] == 4
        assert second.event == "jobs" and len(second.json()) <= 5

        job_id = client.post("/jobs", json={"data": "watched", "seconds": 0.6}).json()["id"]
        deadline = time.monotonic() + 20
        succeeded = False
        for event in stream:
            seen.append((event.event, event.json()))
            if event.event == "job" and event.json()["id"] == job_id:
                succeeded = event.json()["status"] == "succeeded"
            if succeeded and event.event == "queues":  # the one that ends the batch
                break
            assert time.monotonic() < deadline
        client.delete(f"/jobs/{job_id}")  # a finished job: deleted
        for event in stream:
            if event.event == "removed":
                assert event.json() == {"id": job_id}
                break

    mine = [data for kind, data in seen if kind == "job" and data["id"] == job_id]
    statuses = [view["status"] for view in mine]
    assert statuses[-1] == "succeeded" and "running" in statuses
    # Progress moves: several distinct values on the way, batched rather than every tick.
    progress = [view["progress"]["done"] for view in mine if view["status"] == "running"]
    assert len(set(progress)) >= 2 and len(mine) <= 10
    assert mine[-1]["result"] == {"files": []}, "the feed carries summaries, not results' data"
    assert client.get(f"/jobs/{job_id}").status_code == 404  # deleted above
    busy = [data["message"]["busy"] for kind, data in seen if kind == "queues"]
    assert max(busy) >= 1 and busy[-1] == 0


def test_watchers_that_come_and_go_do_not_disturb_jobs(server, client):
    def watch():
        with server.client() as own, connect_sse(own, "GET", "/events") as events:
            next(events.iter_sse())

    threads = [threading.Thread(target=watch) for _ in range(10)]
    for thread in threads:
        thread.start()
    response = client.post("/put", json={"data": "still fine", "seconds": 0.2})
    for thread in threads:
        thread.join(10)
    assert response.status_code == 200
    assert response.json()["data"]["result"]["data"]["message"] == "still fine"
    assert "Traceback" not in server.log()


def test_clients_that_leave_a_stream_or_a_download_midway_leave_no_traceback(tmp_path):
    """A job's event stream and a job's download, each left after its first bytes: the log
    says nothing of an unhandled error (test_a_client_that_leaves_in_the_sse_keep_alive_race
    is the race itself, which a real client meets only now and then)."""
    with run_server(tmp_path) as server, server.client() as client:
        job_id = client.post("/jobs", json={"jobType": "pdf2image", "dpi": 150}).json()["id"]
        with connect_sse(client, "GET", f"/jobs/{job_id}/events") as events:
            assert next(events.iter_sse()).json()["id"] == job_id  # and leaves mid-job
        assert wait_finished(client, job_id)["status"] == "succeeded"
        for _ in range(3):
            with client.stream("GET", f"/jobs/{job_id}/result") as download:
                assert download.status_code == 200
                next(download.iter_raw(1024))  # and leaves mid-zip
        eventually(lambda: client.get("/health").status_code == 200)
        time.sleep(0.5)  # the server has seen them go
        log = server.log()
    assert "unhandled error" not in log and "Traceback" not in log, log


def test_a_client_that_leaves_in_the_sse_keep_alive_race_is_no_server_error(tmp_path, caplog):
    """FastAPI's SSE keep-alive task is still sending when the client's stream closes, and
    raises anyio.BrokenResourceError out of the request after its answer began: that is the
    client gone, not an unhandled error (api/edge.py's GoneClients, inside Starlette's error
    middleware so the 500 handler never logs it). Before any answer it still is one: 500."""
    app = create_app(Settings(out_dir=tmp_path), with_workers=False)

    async def endless() -> AsyncIterator[dict]:
        while True:
            yield {"more": True}

    async def broken() -> dict:
        raise anyio.BrokenResourceError

    app.router.add_api_route("/endless", endless, response_class=EventSourceResponse)
    app.router.add_api_route("/broken", broken)

    async def call(path: str) -> list[dict]:
        sent: list[dict] = []
        gone = asyncio.Event()

        async def send(message: dict) -> None:
            sent.append(message)
            if message.get("more_body"):
                gone.set()
                await asyncio.Event().wait()  # the client reads no more: its buffer fills

        async def receive() -> dict:
            await gone.wait()  # (never, for an answer of one body)
            await asyncio.sleep(0.1)  # the keep-alive task now waits to hand on an event
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                 "http_version": "1.1", "method": "GET", "scheme": "http", "path": path,
                 "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [], "client": ("127.0.0.1", 50000), "server": ("test", 80)}
        with contextlib.suppress(Exception):  # Starlette raises a 500's error again
            await asyncio.wait_for(app(scope, receive, send), 10)
        return sent

    with caplog.at_level(logging.DEBUG, logger="jobqueue"):
        streamed = asyncio.run(call("/endless"))
    assert streamed[0]["status"] == 200
    assert "client left /endless while it streamed" in caplog.text
    assert "unhandled error" not in caplog.text and "Traceback" not in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="jobqueue"):
        refused = asyncio.run(call("/broken"))
    assert refused[0]["status"] == 500 and "unhandled error on GET /broken" in caplog.text
