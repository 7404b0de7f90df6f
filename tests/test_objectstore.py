"""Uploads and results in object storage (JOBQUEUE_STORAGE_URL), against a real SeaweedFS S3
server: an API replica and a worker process with separate out/ folders, so nothing can pass by
reading a local file; the store stopped and started under them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.server
import io
import os
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
import uuid
import zipfile
from pathlib import Path

import httpx
import obstore
import pytest
from obstore.store import S3Store

from conftest import DATA, eventually, free_port
from deployments import deploy
from jobqueue.engines.embedded.engine import EmbeddedEngine
from jobqueue.engines.postgres.runner import SCRATCH_PREFIX, clear_dead_scratch
from jobqueue.errors import JobCancelled
from jobqueue.files import retention
from jobqueue.files.objects import ObjectFiles, StoreUnavailable
from jobqueue.local.seaweedfs import LocalSeaweed
from jobqueue.records import JobRecord, SqliteJobStore
from jobqueue.settings import Settings
from test_contract import submit, wait_until

BUCKET = "jobqueue"
# SeaweedFS without an identity file takes any credentials; obstore wants some to sign with.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test-secret",
               "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def seaweed():
    folder = Path(tempfile.mkdtemp(prefix="jobqueue-weed-"))
    server = LocalSeaweed(folder, ports=free_port)
    server.start()
    server.make_bucket(BUCKET)
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch):
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)


def storage(endpoint: str) -> dict[str, str]:
    """Settings for a deployment on its own prefix of the bucket."""
    return {"storage_url": f"s3://{BUCKET}/t-{uuid.uuid4().hex[:10]}", "s3_endpoint": endpoint}


def bucket(endpoint: str, storage_url: str) -> S3Store:
    return S3Store.from_url(storage_url, config={"endpoint": endpoint,
                                                 "virtual_hosted_style_request": False},
                            client_options={"allow_http": True})


def keys(store: S3Store, job_id: str) -> set[str]:
    return {meta["path"] for batch in obstore.list(store, prefix=f"jobs/{job_id}/")
            for meta in batch}


def job_folders(out_dir: Path) -> list[str]:
    """Job folders in an out/ folder, and in the scratch folders of its worker processes."""
    return [path.name for path in out_dir.glob("*") if len(path.name) == 36] + \
        [path.name for path in out_dir.glob("scratch-*/*")]


def test_pdf_and_video_through_the_store_with_separate_folders(postgres, seaweed, tmp_path):
    settings = storage(seaweed.url)
    store = bucket(seaweed.url, settings["storage_url"])
    worker_out = tmp_path / "worker-out"
    with deploy("postgres", tmp_path, postgres, workers=0, **settings) as cluster, \
            cluster.client() as client:
        cluster.start_worker(out_dir=worker_out)
        with open(DATA / "sample.pdf", "rb") as pdf:
            job = submit(client, data={"jobType": "pdf2image", "dpi": "50"},
                         files={"file": ("my scan.pdf", pdf, "application/pdf")})
        done = wait_until(client, job["id"])
        assert done["status"] == "succeeded", done
        pages = [url.rsplit("/", 1)[-1] for url in done["result"]["files"]]
        assert len(pages) >= 2
        stored = keys(store, job["id"])
        assert f"jobs/{job['id']}/input/my_scan.pdf" in stored
        assert {f"jobs/{job['id']}/attempt-1/{name}" for name in pages} <= stored
        # The job's own manifest is written once the record says it succeeded: just after.
        eventually(lambda: f"jobs/{job['id']}/manifest.json" in keys(store, job["id"]))
        # Neither machine keeps the job's files: the replica's upload went to the store, the
        # worker's scratch folder went once the record said the job succeeded.
        eventually(lambda: job_folders(cluster.out_dir) == [] == job_folders(worker_out))

        first = client.get(f"/jobs/{job['id']}/files/{pages[0]}")
        assert first.status_code == 200 and first.content.startswith(b"\x89PNG")
        assert first.headers["content-type"] == "image/png"
        assert int(first.headers["content-length"]) == len(first.content)
        result = client.get(f"/jobs/{job['id']}/result")
        assert result.status_code == 200
        with zipfile.ZipFile(io.BytesIO(result.content)) as archive:
            assert archive.namelist() == pages
            assert archive.read(pages[0]) == first.content
        moved = client.get(f"/jobs/{job['id']}/files/{pages[0]}", params={"redirect": 1})
        assert moved.status_code == 307
        assert httpx.get(moved.headers["location"]).content == first.content
        thumbnail = client.get(f"/jobs/{job['id']}/files/{pages[0]}", params={"w": 64})
        assert thumbnail.status_code == 200 and thumbnail.content.startswith(b"\xff\xd8")
        assert f"jobs/{job['id']}/thumbnails/64-{Path(pages[0]).stem}.jpg" in keys(
            store, job["id"])
        assert client.get(f"/jobs/{job['id']}/files/nope.png").status_code == 404

        with open(DATA / "sample.mp4", "rb") as video:
            clip = submit(client, data={"jobType": "video", "width": "160"},
                          files={"file": ("clip.mp4", video, "video/mp4")})
        assert wait_until(client, clip["id"])["status"] == "succeeded"
        movie = client.get(f"/jobs/{clip['id']}/result")
        assert movie.status_code == 200 and movie.content[4:8] == b"ftyp"
        # ffmpeg plays the output from a presigned URL: at least a frame comes.
        with client.stream("GET", f"/jobs/{clip['id']}/preview.mjpg",
                           params={"fps": 2}) as preview:
            assert preview.status_code == 200
            seen = b""
            for chunk in preview.iter_bytes():
                seen += chunk
                if b"\xff\xd8" in seen or len(seen) > 2**20:
                    break
            assert b"Content-type: image/jpeg" in seen and b"\xff\xd8" in seen

        # The same Idempotency-Key twice at once: one job, and no objects of the other.
        def send(_: int) -> str:
            with open(DATA / "sample.pdf", "rb") as pdf:
                return submit(client, data={"jobType": "pdf2image", "dpi": "20"},
                              files={"file": ("again.pdf", pdf, "application/pdf")},
                              headers={"Idempotency-Key": "same-key-1"})["id"]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            twins = set(pool.map(send, range(2)))
        assert len(twins) == 1
        assert wait_until(client, *twins)["status"] == "succeeded"
        stored_jobs = {path.split("/")[1] for path in (meta["path"] for batch in obstore.list(
            store, prefix="jobs/") for meta in batch)}
        assert stored_jobs == {job["id"], clip["id"], *twins}
        eventually(lambda: job_folders(cluster.out_dir) == [] == job_folders(worker_out))

        assert client.delete(f"/jobs/{job['id']}").status_code == 200
        assert keys(store, job["id"]) == set()


def test_retention_removes_the_objects_with_the_record(postgres, seaweed, tmp_path):
    settings = storage(seaweed.url)
    store = bucket(seaweed.url, settings["storage_url"])
    with deploy("postgres", tmp_path, postgres, result_ttl=1, **settings) as cluster, \
            cluster.client() as client:
        with open(DATA / "sample.pdf", "rb") as pdf:
            job = submit(client, data={"jobType": "pdf2image", "dpi": "20"},
                         files={"file": ("a.pdf", pdf, "application/pdf")})
        deadline = time.monotonic() + 60
        while client.get(f"/jobs/{job['id']}").status_code != 404:  # ran, then expired
            assert time.monotonic() < deadline, "the job was never swept"
            time.sleep(0.1)
        # The record goes first (nobody is sent to missing files), its objects right after.
        eventually(lambda: keys(store, job["id"]) == set())


def test_an_upload_over_the_cap_is_413_and_stores_nothing(postgres, seaweed, tmp_path):
    settings = storage(seaweed.url)
    store = bucket(seaweed.url, settings["storage_url"])
    with deploy("postgres", tmp_path, postgres, workers=0, max_upload_mb=1,
                **settings) as cluster, cluster.client() as client:
        answer = client.post("/jobs", data={"jobType": "pdf2image"},
                             files={"file": ("big.pdf", b"%PDF-1.4\n" + b"0" * 2**21)})
        assert answer.status_code == 413 and "JOBQUEUE_MAX_UPLOAD_MB" in answer.json()["detail"]
        assert list(obstore.list(store, prefix="jobs/").collect()) == []
        assert job_folders(cluster.out_dir) == []


def test_a_bucket_that_goes_missing_is_503_naming_the_setting(postgres, seaweed, tmp_path):
    name = f"gone-{uuid.uuid4().hex[:10]}"
    seaweed.make_bucket(name)
    with deploy("postgres", tmp_path, postgres, workers=0, storage_url=f"s3://{name}/t",
                s3_endpoint=seaweed.url) as cluster, cluster.client() as client:
        assert httpx.delete(f"{seaweed.url}/{name}", timeout=10).status_code == 204

        def upload() -> httpx.Response:
            with open(DATA / "sample.pdf", "rb") as pdf:
                return client.post("/jobs", data={"jobType": "pdf2image"},
                                   files={"file": ("a.pdf", pdf, "application/pdf")})
        refused = upload()
        assert refused.status_code == 503, refused.text
        assert "JOBQUEUE_STORAGE_URL" in refused.json()["detail"]
        health = client.get("/health")
        assert health.status_code == 503 and "bucket was not found" in health.text
        assert job_folders(cluster.out_dir) == []
        seaweed.make_bucket(name)
        assert upload().status_code == 202


def test_a_full_queue_refuses_an_upload_before_reading_or_storing_it(postgres, seaweed,
                                                                      tmp_path):
    """With the pdf2image queue full (no worker takes its one job), an upload is 503 at once:
    when jobType comes before the file, before the file is read (so a file over the size cap is
    503, not 413); when it comes after, before the file goes to the store. A retry of the
    accepted upload gets its job back without sending the file to the store again. The bucket
    is deleted after the first upload, so nothing here that reaches the store can pass."""
    name = f"full-{uuid.uuid4().hex[:10]}"
    seaweed.make_bucket(name)
    with deploy("postgres", tmp_path, postgres, workers=0, max_upload_mb=1,
                pdf2image_queue_size=1, storage_url=f"s3://{name}/t",
                s3_endpoint=seaweed.url) as cluster, cluster.client() as client:
        def upload(key: str | None, file_first: bool = False) -> httpx.Response:
            with open(DATA / "sample.pdf", "rb") as pdf:
                parts = [("jobType", (None, "pdf2image")),
                         ("file", ("a.pdf", pdf, "application/pdf"))]
                return client.post("/jobs", files=parts[::-1] if file_first else parts,
                                   headers={"Idempotency-Key": key} if key else {})
        waiting = upload("first").json()  # the queue's one slot
        assert httpx.delete(f"{seaweed.url}/{name}", timeout=10).status_code == 204
        for file_first in (False, True):  # a retry is no new job: it gets its job back
            again = upload("first", file_first)
            assert again.status_code == 202 and again.json()["id"] == waiting["id"], again.text
            refused = upload(None, file_first)
            assert refused.status_code == 503, refused.text
            assert "pdf2image queue is full (1 jobs waiting)" in refused.json()["detail"]
            assert int(refused.headers["Retry-After"]) >= 1
        too_big = client.post("/jobs", data={"jobType": "pdf2image"},
                              files={"file": ("big.pdf", b"%PDF-1.4\n" + b"0" * 2**21)})
        assert too_big.status_code == 503, too_big.text
        assert "pdf2image queue is full" in too_big.json()["detail"]
        # /put takes no Idempotency-Key: a key of an accepted job does not let its file in.
        put = client.post("/put", data={"jobType": "pdf2image"},
                          files={"file": ("big.pdf", b"%PDF-1.4\n" + b"0" * 2**21)},
                          headers={"Idempotency-Key": "first"})
        assert put.status_code == 503, put.text
        assert job_folders(cluster.out_dir) == []
        assert client.delete(f"/jobs/{waiting['id']}").status_code in (200, 202, 204)


class NoSuchBucket(http.server.BaseHTTPRequestHandler):
    """S3's answer to any request for a bucket that does not exist (SeaweedFS answers a
    write with 403 instead; AWS with this 404)."""

    def answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchBucket</Code>'
                b"<Message>The specified bucket does not exist</Message></Error>")
        self.send_response(404)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = answer

    def log_message(self, *args) -> None:
        pass


def test_s3s_404_on_a_write_is_the_store_unavailable_not_a_missing_file(tmp_path):
    """obstore raises the built-in FileNotFoundError for any 404: on a write it means the
    bucket is missing, which must be a 503 naming the setting (and hold a worker's job), not
    a 500 or a failed job."""
    fake = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), NoSuchBucket)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        files = ObjectFiles(Settings(out_dir=tmp_path, storage_url="s3://missing/p",
                                     s3_endpoint=f"http://127.0.0.1:{fake.server_port}"))
        job_id = str(uuid.uuid4())
        upload = tmp_path / job_id / "input" / "a.pdf"
        upload.parent.mkdir(parents=True)
        upload.write_bytes(b"%PDF-1.4\n")
        with pytest.raises(StoreUnavailable, match="bucket was not found"):
            files.keep_input(job_id, upload)
        page = tmp_path / "page-001.png"
        page.write_bytes(b"png")
        record = JobRecord(id=job_id, job_type="pdf2image", status="running", options={},
                           input_path=None, created_at=time.time(), attempt=1)
        with pytest.raises(StoreUnavailable, match="bucket was not found"):
            files.publish(record, [page])
        with pytest.raises(StoreUnavailable):
            files.remove(job_id)
        assert "bucket was not found" in files.health()
    finally:
        fake.shutdown()


def test_a_cancel_stops_transfers_under_way(seaweed, tmp_path):
    """A worker's downloads and uploads ask whether the job was cancelled between chunks and
    between files: a cancel does not wait for a large transfer over a slow link to end."""
    settings = storage(seaweed.url)
    files = ObjectFiles(Settings(out_dir=tmp_path, **settings))
    store = bucket(seaweed.url, settings["storage_url"])
    job_id = str(uuid.uuid4())
    upload = tmp_path / "upload" / "a.pdf"
    upload.parent.mkdir()
    upload.write_bytes(b"%PDF-1.4\n" + os.urandom(2**20))
    stored = files.keep_input(job_id, upload)

    def cancelled() -> None:
        raise JobCancelled(job_id)

    with pytest.raises(JobCancelled):
        files.fetch_input(job_id, stored, cancelled)
    assert list((tmp_path / job_id / "input").iterdir()) == []  # no partial download left
    pages = [tmp_path / f"page-00{n}.png" for n in range(1, 4)]
    for page in pages:
        page.write_bytes(b"png")
    record = JobRecord(id=job_id, job_type="pdf2image", status="running", options={},
                       input_path=stored, created_at=time.time(), attempt=1)
    with pytest.raises(JobCancelled):
        files.publish(record, pages, cancelled)
    assert keys(store, job_id) == {f"jobs/{job_id}/{stored.split('/', 2)[2]}"}
    calls = []

    def cancelled_after_the_first_file() -> None:
        calls.append(1)
        if len(calls) > 1:
            raise JobCancelled(job_id)

    with pytest.raises(JobCancelled):
        files.publish(record, pages, cancelled_after_the_first_file)
    names = {key.rsplit("/", 1)[1] for key in keys(store, job_id)}
    assert "manifest.json" not in names and len(names & {p.name for p in pages}) < 3
    files.publish(record, pages)  # without a cancel: every page, then the manifest
    assert {key.rsplit("/", 1)[1] for key in keys(store, job_id)} >= {
        "page-001.png", "page-003.png", "manifest.json"}


def test_the_store_down_is_503_and_loses_no_accepted_job(postgres, tmp_path):
    folder = Path(tempfile.mkdtemp(prefix="jobqueue-weed-outage-"))
    server = LocalSeaweed(folder, ports=free_port)
    try:
        server.start()
        server.make_bucket(BUCKET)
        with deploy("postgres", tmp_path, postgres, workers=0,
                    **storage(server.url)) as cluster, cluster.client(timeout=60) as client:
            with open(DATA / "sample.pdf", "rb") as pdf:
                accepted = submit(client, data={"jobType": "pdf2image", "dpi": "40"},
                                  files={"file": ("a.pdf", pdf, "application/pdf")})
            server.stop()
            with open(DATA / "sample.pdf", "rb") as pdf:
                refused = client.post("/jobs", data={"jobType": "pdf2image"},
                                      files={"file": ("b.pdf", pdf, "application/pdf")})
            assert refused.status_code == 503, refused.text
            assert "JOBQUEUE_STORAGE_URL" in refused.json()["detail"]
            assert "retry-after" in refused.headers
            health = client.get("/health")  # names the store; PostgreSQL is fine
            assert health.status_code == 503
            assert set(health.json()["dependencies"]) == {"objectStorage"}
            metrics = client.get("/metrics").text
            assert 'jobqueue_dependency_up{dependency="objectStorage"} 0.0' in metrics
            assert 'jobqueue_jobs_waiting{kind="pdf2image",scope="cluster"}' in metrics
            # Reading a job still works: its record is in PostgreSQL.
            assert client.get(f"/jobs/{accepted['id']}").status_code == 200
            assert job_folders(cluster.out_dir) == []  # the refused upload is not kept
            # A worker that starts while the store is down waits for it with the job.
            cluster.start_worker(out_dir=tmp_path / "worker-out")
            wait_until(client, accepted["id"], ("running",))
            server.start()
            assert wait_until(client, accepted["id"], seconds=120)["status"] == "succeeded"
            page = wait_until(client, accepted["id"])["result"]["files"][0]
            assert client.get(page).status_code == 200
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def sweep(sweeper: retention.StoredOrphans, records: SqliteJobStore,
          files: ObjectFiles) -> list[str]:
    """One sweep of the object store, with `records` the embedded engine's job store."""
    engine = EmbeddedEngine(Settings(out_dir=files.out_dir), {}, store=records)
    return asyncio.run(sweeper.sweep(engine, files))


def test_the_sweep_removes_objects_no_record_owns(seaweed, tmp_path, monkeypatch):
    settings = Settings(out_dir=tmp_path / "out", **storage(seaweed.url))
    files = ObjectFiles(settings)
    records = SqliteJobStore(tmp_path / "jobs.db")
    orphan, coming = str(uuid.uuid4()), str(uuid.uuid4())
    for job_id in (orphan, coming):
        obstore.put(files.store, f"jobs/{job_id}/input/a.pdf", b"%PDF-1.4")
    obstore.put(files.store, "not-a-job/keep.txt", b"someone else's")
    monkeypatch.setattr(retention, "ORPHAN_SECONDS", 0.0)
    sweeper = retention.StoredOrphans()
    # The first sweep finds both without a record: suspects, nothing removed yet (an upload
    # is stored before its record is written).
    assert sweep(sweeper, records, files) == []
    assert set(sweeper.suspects) == {orphan, coming}
    # Meanwhile `coming` gets its record; the next sweep removes only the orphan.
    records.save(JobRecord(id=coming, job_type="pdf2image", status="queued", options={},
                           input_path=f"jobs/{coming}/input/a.pdf", created_at=time.time()))
    records.flush()
    assert sweep(sweeper, records, files) == [orphan]
    assert list(obstore.list(files.store, prefix=f"jobs/{orphan}/").collect()) == []
    assert len(list(obstore.list(files.store, prefix=f"jobs/{coming}/").collect())) == 1
    assert bytes(obstore.get(files.store, "not-a-job/keep.txt").bytes()) == b"someone else's"
    assert sweeper.suspects == {}
    # A leftover from long ago goes at the first sweep that finds it (the one at start).
    old = str(uuid.uuid4())
    obstore.put(files.store, f"jobs/{old}/attempt-1/page-001.png", b"png")
    monkeypatch.setattr(retention, "ORPHAN_SECONDS", 3600.0)
    monkeypatch.setattr(retention, "STALE_OBJECT_SECONDS", 0.0)
    assert sweep(retention.StoredOrphans(), records, files) == [old]
    assert list(obstore.list(files.store, prefix=f"jobs/{old}/").collect()) == []
    assert len(list(obstore.list(files.store, prefix=f"jobs/{coming}/").collect())) == 1
    records.close()


def test_a_worker_clears_its_own_pids_scratch_left_by_an_earlier_process(tmp_path):
    """A restarted container's worker has the same pid and host name as the one killed
    before it: that one's scratch is this one's to clear; a live worker's never is."""
    host = socket.gethostname()
    mine = tmp_path / f"{SCRATCH_PREFIX}{host}-{os.getpid()}" / str(uuid.uuid4())
    live = tmp_path / f"{SCRATCH_PREFIX}{host}-{os.getppid()}" / str(uuid.uuid4())
    gone = tmp_path / f"{SCRATCH_PREFIX}{host}-{2**22 + 1}" / str(uuid.uuid4())  # over pid_max
    for folder in (mine, live, gone):
        folder.mkdir(parents=True)
    clear_dead_scratch(tmp_path)
    assert not mine.parent.exists() and not gone.parent.exists() and live.exists()



def test_objects_older_than_the_job_store_are_never_swept(seaweed, tmp_path, monkeypatch):
    """A new or emptied database knows none of the stored jobs: those written before it was
    made are left alone, however old (test_the_sweep_removes_objects_no_record_owns: the
    store's own still go)."""
    settings = Settings(out_dir=tmp_path / "out", **storage(seaweed.url))
    files = ObjectFiles(settings)
    before = str(uuid.uuid4())
    obstore.put(files.store, f"jobs/{before}/attempt-1/page-001.png", b"png")
    db_path = tmp_path / "jobs.db"
    SqliteJobStore(db_path).close()
    with sqlite3.connect(db_path) as db:  # made an hour after that object was written
        db.execute("UPDATE store SET value = ? WHERE name = 'created_at'",
                   (str(time.time() + 3600),))
    records = SqliteJobStore(db_path)
    monkeypatch.setattr(retention, "STALE_OBJECT_SECONDS", 0.0)
    monkeypatch.setattr(retention, "STORE_CLOCK_MARGIN", 0.0)
    sweeper = retention.StoredOrphans()
    assert sweep(sweeper, records, files) == []
    assert sweep(sweeper, records, files) == []
    assert before in sweeper.strangers
    assert len(list(obstore.list(files.store, prefix=f"jobs/{before}/").collect())) == 1
    records.close()
