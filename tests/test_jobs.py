"""Asynchronous jobs: submit, poll, events, result, cancel, list, limits, restart, retention."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
import sqlite3
import time
import uuid
import zipfile

import httpx
import pytest

from conftest import DATA, Server, eventually, run_server
from jobqueue import records
from jobqueue.api.routes.files import ThumbnailFailed, make_thumbnail
from jobqueue.api.routes.jobs import ZipDownload, zip_stream
from jobqueue.errors import FilesGone, Unavailable
from jobqueue.records import JobRecord
from jobqueue.settings import Settings
from media import pdf_page_points, png_size, probe_streams


@pytest.fixture(scope="module")
def jobs_server(tmp_path_factory) -> Server:
    with run_server(tmp_path_factory.mktemp("jobs"), message_workers=1) as server:
        yield server


@pytest.fixture
def client(jobs_server) -> httpx.Client:
    with jobs_server.client() as client:
        yield client


def submit(client: httpx.Client, **kwargs) -> dict:
    response = client.post("/jobs", **kwargs)
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["Location"] == f"/jobs/{body['id']}" == body["links"]["self"]
    assert body["status"] == "queued"
    return body


def wait_until(client: httpx.Client, job_id: str, statuses=("succeeded", "failed", "cancelled"),
               seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in statuses or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def test_message_lifecycle_with_json_result(client):
    job = submit(client, json={"data": "later", "seconds": 0.3})
    assert job["jobType"] == "message"
    early = client.get(job["links"]["result"])
    assert early.status_code == 409
    done = wait_until(client, job["id"])
    assert done["status"] == "succeeded"
    assert done["progress"] == {"done": 0.3, "total": 0.3, "unit": "seconds"}
    assert done["createdAt"] <= done["startedAt"] <= done["finishedAt"]
    assert client.get(job["links"]["result"]).json() == {"message": "later", "length": 5,
                                                         "seconds": 0.3}


def test_pdf2image_lifecycle_result_is_a_zip_of_the_pages(client):
    with open(DATA / "sample.pdf", "rb") as pdf:
        job = submit(client, data={"jobType": "pdf2image", "dpi": "50"},
                     files={"file": ("scan.pdf", pdf, "application/pdf")})
    done = wait_until(client, job["id"])
    pages, _, _ = pdf_page_points(DATA / "sample.pdf")
    assert done["status"] == "succeeded" and done["progress"]["done"] == pages
    assert done["progress"]["unit"] == "pages"
    with client.stream("GET", job["links"]["result"]) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/zip"
        assert f'filename="pdf2image-{job["id"]}.zip"' in response.headers["content-disposition"]
        content = b"".join(response.iter_bytes())
    archive = zipfile.ZipFile(io.BytesIO(content))
    assert archive.namelist() == [f"page-{n:03d}.png" for n in range(1, pages + 1)]
    assert png_size(archive.read("page-001.png"))[0] in (413, 414)  # 595.44 pt at 50 dpi


def test_video_lifecycle_result_is_the_mp4(client, tmp_path):
    with open(DATA / "sample.mp4", "rb") as video:
        job = submit(client, data={"jobType": "video", "width": "320"},
                     files={"file": ("clip.mp4", video, "video/mp4")})
    done = wait_until(client, job["id"])
    assert done["status"] == "succeeded"
    assert done["progress"]["unit"] == "seconds"
    assert done["progress"]["done"] == pytest.approx(4, abs=0.1)
    response = client.get(job["links"]["result"])
    assert response.headers["content-type"] == "video/mp4"
    assert "attachment" in response.headers["content-disposition"]
    path = tmp_path / "result.mp4"
    path.write_bytes(response.content)
    streams = probe_streams(path)
    assert streams["video"]["width"] == 320 and "audio" in streams


def test_cancel_queued_and_running_jobs(client, jobs_server):
    running = submit(client, json={"data": "long", "seconds": 30})
    queued = submit(client, json={"data": "waiting", "seconds": 30})
    wait_until(client, running["id"], ("running",))
    state = client.get(f"/jobs/{queued['id']}").json()
    assert state["status"] == "queued" and state["queuePosition"] == 1
    cancelled = client.delete(queued["links"]["cancel"]).json()
    assert cancelled["status"] == "cancelled" and "startedAt" not in cancelled
    started = time.monotonic()
    cancelled = client.delete(running["links"]["cancel"]).json()
    # Stopped, not waited for: the job had 30 s to run.
    assert cancelled["status"] == "cancelled" and time.monotonic() - started < 10
    assert client.get(running["links"]["result"]).status_code == 409
    # A second DELETE of a finished job deletes it and its files; after that it is gone.
    assert client.delete(running["links"]["cancel"]).status_code == 200
    assert client.get(running["links"]["self"]).status_code == 404
    assert not (jobs_server.out_dir / running["id"]).exists()


def test_cancel_running_video_kills_ffmpeg_and_removes_partial_output(client, jobs_server):
    with open(DATA / "sample.mp4", "rb") as video:
        job = submit(client, data={"jobType": "video", "width": "3840"},
                     files={"file": ("clip.mp4", video, "video/mp4")})
    deadline = time.monotonic() + 10
    while not jobs_server.children("ffmpeg") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert jobs_server.children("ffmpeg"), "ffmpeg never started"
    assert client.delete(job["links"]["cancel"]).json()["status"] == "cancelled"
    assert jobs_server.children("ffmpeg") == []
    assert not (jobs_server.out_dir / job["id"]).exists()


def test_events_deliver_rising_progress_and_a_final_event(client):
    job = submit(client, json={"data": "watch me", "seconds": 1})
    events = []
    with client.stream("GET", job["links"]["events"]) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    done = [event["progress"]["done"] for event in events]
    assert len(events) >= 5 and done == sorted(done) and done[-1] == 1
    assert events[-1]["status"] == "succeeded"
    assert all(event["status"] in ("queued", "running") for event in events[:-1])
    # A client that connects late gets the final state at once, and the stream ends.
    late = client.get(job["links"]["events"])
    assert [json.loads(line[5:])["status"] for line in late.text.splitlines()
            if line.startswith("data:")] == ["succeeded"]


def test_uploads_are_checked_by_content_not_name(client, jobs_server):
    before = set(jobs_server.out_dir.iterdir())
    for name, content, kind in (("clip.mp4", b"hello, I am text\n" * 50, "video"),
                                ("scan.pdf", b"<html>not a pdf</html>", "pdf2image"),
                                ("fake.pdf", b"%PDF-1.4\ngarbage", "pdf2image")):
        response = client.post("/jobs", data={"jobType": kind}, files={"file": (name, content)})
        assert response.status_code == 415, (name, response.text)
        assert "Send a" in response.json()["detail"]
    assert set(jobs_server.out_dir.iterdir()) == before, "a refused upload left files behind"


def test_list_pages_and_filters(client):
    ids = [submit(client, json={"data": f"list {n}", "seconds": 0})["id"] for n in range(5)]
    for job_id in ids:
        wait_until(client, job_id)
    listed, url = [], "/jobs?jobType=message&status=succeeded&limit=2"
    while url:
        page = client.get(url).json()
        assert len(page["items"]) <= 2
        listed += [item["id"] for item in page["items"]]
        url = page.get("next")
    assert listed[:5] == ids[::-1], "newest first"
    assert all(client.get(f"/jobs/{i}").json()["jobType"] == "message" for i in listed)
    assert client.get("/jobs?jobType=video&status=queued").json()["items"] == []
    assert client.get("/jobs?status=nonsense").status_code == 422
    put = client.post("/put", json={"data": "sync", "seconds": 0}).json()["data"]["id"]
    assert client.get("/jobs?limit=1").json()["items"][0]["id"] == put, "/put jobs are listed"


def test_upload_over_the_cap_is_413_and_leaves_nothing(tmp_path):
    with run_server(tmp_path, max_upload_mb=1) as server, server.client() as client:
        def body():  # streamed, so the server only learns the size while reading
            yield b"--b\r\nContent-Disposition: form-data; name=\"jobType\"\r\n\r\nvideo\r\n"
            yield (b"--b\r\nContent-Disposition: form-data; name=\"file\"; "
                   b"filename=\"big.mp4\"\r\n\r\n")
            for _ in range(3):
                yield b"\0" * 1024 * 1024
            yield b"\r\n--b--\r\n"

        response = client.post("/jobs", content=body(),
                                headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert response.status_code == 413
        assert "JOBQUEUE_MAX_UPLOAD_MB" in response.json()["detail"]
        assert [p.name for p in server.out_dir.iterdir() if p.is_dir()] == []


def test_retention_sweep_deletes_old_finished_jobs(tmp_path):
    with run_server(tmp_path, result_ttl=1) as server, server.client() as client:
        job = submit(client, json={"jobType": "pdf2image", "dpi": 20})
        assert wait_until(client, job["id"])["status"] == "succeeded"
        assert (server.out_dir / job["id"] / "page-001.png").exists()
        eventually(lambda: client.get(job["links"]["self"]).status_code == 404)
        # The record goes first (nobody is sent to missing files), its folder right after.
        eventually(lambda: not (server.out_dir / job["id"]).exists())


def test_restart_after_kill_9_runs_every_accepted_job(tmp_path):
    settings = {"message_workers": 1, "pdf2image_workers": 1}
    with run_server(tmp_path, **settings) as server, server.client() as client:
        jobs = [submit(client, json={"data": f"job {n}", "seconds": 1}) for n in range(3)]
        with open(DATA / "sample.pdf", "rb") as pdf:
            jobs.append(submit(client, data={"jobType": "pdf2image", "dpi": "30"},
                               files={"file": ("scan.pdf", pdf)}))
        wait_until(client, jobs[0]["id"], ("running",))
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    with run_server(tmp_path, **settings) as server, server.client() as client:
        finished = [wait_until(client, job["id"]) for job in jobs]
        assert [job["status"] for job in finished] == ["succeeded"] * 4
        assert [job["result"]["data"]["message"] for job in finished[:3]] == [
            "job 0", "job 1", "job 2"]
        starts = [job["startedAt"] for job in finished[:3]]
        assert starts == sorted(starts), "recovered in their original order"
        assert finished[3]["result"]["data"]["pages"] == 4
        assert "queued again after a restart" in server.log()


def test_a_jobs_db_from_before_attempts_were_counted(tmp_path):
    """A jobs.db without the attempt column gets it at start: a job that had run counts one
    run, one still waiting none until it runs, and the one the old server died running runs
    again as its second."""
    (tmp_path / "out").mkdir()
    now = time.time()
    jobs = {"done": ("succeeded", now - 5, now - 4, {"data": {"message": "done"}, "files": []}),
            "waiting": ("queued", None, None, None), "crashed": ("running", now - 3, None, None)}
    ids = {name: str(uuid.uuid4()) for name in jobs}
    with contextlib.closing(sqlite3.connect(tmp_path / "out" / "jobs.db")) as old:
        # The first tables, before the added columns.
        old.executescript(records.QUERIES["make_tables"])
        assert "attempt" not in {row[1] for row in old.execute("PRAGMA table_info(jobs)")}
        old.executemany(
            "INSERT INTO jobs (id, job_type, status, options, created_at, started_at, "
            "finished_at, worker_name, progress, result) VALUES (?, 'message', ?, ?, ?, ?, ?, "
            "'message-worker-1', '{}', ?)",
            [(ids[name], status, json.dumps({"data": name, "seconds": 0}), now - 6, started,
              finished, json.dumps(result)) for name, (status, started, finished, result)
             in jobs.items()])
        old.commit()
    with run_server(tmp_path) as server, server.client() as client:
        finished = {name: wait_until(client, ids[name]) for name in jobs}
        assert {name: job["status"] for name, job in finished.items()} == dict.fromkeys(
            jobs, "succeeded")
        assert {name: job["attempt"] for name, job in finished.items()} == {
            "done": 1, "waiting": 1, "crashed": 2}


def test_bad_ids_params_and_bodies_are_4xx(client):
    unknown = "8d3c4a5e-2f1b-4c6d-9e7f-0a1b2c3d4e5f"
    for path in (f"/jobs/{unknown}", f"/jobs/{unknown}/events", f"/jobs/{unknown}/result",
                 "/jobs/not-a-uuid", "/jobs/not-a-uuid/events"):
        assert client.get(path).status_code == 404, path
    assert client.delete(f"/jobs/{unknown}").status_code == 404
    for query in ("offset=99999999999999999999", "limit=0", "limit=101", "jobType=ocr"):
        assert client.get(f"/jobs?{query}").status_code == 422, query
    cut_off = (b"--b\r\nContent-Disposition: form-data; name=\"jobType\"\r\n\r\nvideo\r\n"
               b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp4\"\r\n\r\n"
               b"half a vid")
    response = client.post("/jobs", content=cut_off,
                           headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 400 and "cut off" in response.json()["detail"]
    too_big = client.post("/jobs", json={"data": "x" * 2 * 1024 * 1024})
    assert too_big.status_code == 413


ZIPPED_JOB = "3f1c9a52-58a4-4c36-9c6f-0d8f2a9d1b7e"


@pytest.mark.parametrize("error", [FilesGone(ZIPPED_JOB, "page-2.png"),
                                   Unavailable("the object store did not answer")])
def test_a_zip_whose_files_go_midway_is_cut_short_not_finished(caplog, error):
    """A job deleted (or its store failing) while its zip is being sent: the download ends
    without its last chunk (the client sees it cut short, not a valid zip of fewer pages),
    with a line in the log rather than a traceback."""
    record = JobRecord(id=ZIPPED_JOB, job_type="pdf2image",
                       status="succeeded", options={}, input_path=None, created_at=time.time(),
                       finished_at=time.time(),
                       result={"data": {}, "files": ["page-1.png", "page-2.png"]})

    class DeletedAfterTheFirstPage:
        def chunks(self, record: JobRecord, name: str):
            if name == "page-2.png":
                raise error
            yield b"\x89PNG" + b"\0" * 100

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        await asyncio.Event().wait()  # the client stays
        return {}

    response = ZipDownload(zip_stream(DeletedAfterTheFirstPage(), record, record.result["files"]),
                           media_type="application/zip")
    asyncio.run(response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send))
    bodies = [message for message in sent if message["type"] == "http.response.body"]
    assert bodies and all(message["more_body"] for message in bodies), "no last chunk"
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(b"".join(message["body"] for message in bodies)))
    assert f"job {record.id}" in caplog.text
    assert ("page-2.png" if isinstance(error, FilesGone) else "did not answer") in caplog.text


def test_a_thumbnail_of_a_page_deleted_meanwhile_is_not_found_rather_than_unmakeable(tmp_path):
    """A job deleted while a thumbnail of its page is being made: the thumbnail program finds
    no file, which the route answers 404 (FileNotFoundError), not 422 "no thumbnail can be
    made", which stays for an image it cannot read."""
    settings = Settings(out_dir=tmp_path)
    with pytest.raises(FileNotFoundError):
        make_thumbnail(tmp_path / "page-1.png", tmp_path / "64-page-1.jpg", 64, settings)
    (tmp_path / "page-2.png").write_bytes(b"not a PNG")
    with pytest.raises(ThumbnailFailed):
        make_thumbnail(tmp_path / "page-2.png", tmp_path / "64-page-2.jpg", 64, settings)


def every_link(client: httpx.Client, headers: dict[str, str]) -> list[str]:
    """The links a pdf2image job's answers carry: /put's file URLs, POST /jobs' Location and
    links, the job's file URLs, a list page's items' and its next page's."""
    put = client.post("/put", json={"jobType": "pdf2image", "dpi": 20}, headers=headers)
    assert put.status_code == 200, put.text
    accepted = client.post("/jobs", json={"jobType": "pdf2image", "dpi": 20}, headers=headers)
    assert accepted.status_code == 202, accepted.text
    job = wait_until(client, accepted.json()["id"])
    assert job["status"] == "succeeded", job
    view = client.get(f"/jobs/{job['id']}", headers=headers).json()
    listed = client.get("/jobs", params={"limit": 1}, headers=headers).json()
    return [*put.json()["data"]["result"]["files"], accepted.headers["Location"],
            *accepted.json()["links"].values(), *view["result"]["files"],
            *listed["items"][0]["result"]["files"], listed["next"]]


def test_links_never_come_from_the_host_header(tmp_path, client):
    """`Host: evil.example:666` made every file URL (and the next page's) point there. Links
    are paths now, which a client resolves against the server's address; or absolute from
    JOBQUEUE_PUBLIC_URL when it is set."""
    links = every_link(client, {"Host": "evil.example:666"})
    assert all(link.startswith("/jobs") for link in links), links
    for link in links:  # each works, resolved against the address the client used
        assert client.get(link).status_code == 200, link
    page = client.get("/dashboard", headers={"Host": "evil.example:666"})
    assert page.status_code == 200 and "evil.example" not in page.text, "nor its scripts"

    public = "https://jobs.example.com/queue"
    with run_server(tmp_path, public_url=public + "/") as server, server.client() as other:
        links = every_link(other, {"Host": "evil.example:666"})
        assert all(link.startswith(f"{public}/jobs") for link in links), links
        page = other.get(links[0].removeprefix(public))  # through the proxy, as it were
        assert page.status_code == 200 and page.content.startswith(b"\x89PNG")
