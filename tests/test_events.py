"""GET /events: one stream of queue sizes and job changes, as the dashboard reads it."""

from __future__ import annotations

import threading
import time

from httpx_sse import connect_sse


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
