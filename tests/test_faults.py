"""Faults: engines dying mid-job, a full disk. The server reports them and keeps serving."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import Server, eventually, run_server, wait_finished
from media import make_clip


def wait_for_child(server: Server, name: str, seconds: float = 20) -> int:
    deadline = time.monotonic() + seconds
    while not (pids := server.children(name)):
        assert time.monotonic() < deadline, f"{name} never started"
        time.sleep(0.01)
    return pids[0]



@pytest.mark.parametrize("engine, child, words", [
    ("pdfium", "python", "the PDFium renderer was killed by signal 9"),
    ("poppler", "pdftoppm", "pdftoppm was killed by signal 9"),
])
def test_a_renderer_killed_mid_job_fails_the_job_with_what_happened(tmp_path, engine, child,
                                                                     words):
    with run_server(tmp_path, pdf_engine=engine) as server, server.client() as client:
        job_id = client.post("/jobs", json={"jobType": "pdf2image", "dpi": 600}).json()["id"]
        os.kill(wait_for_child(server, child), signal.SIGKILL)
        job = wait_finished(client, job_id)
        assert job["status"] == "failed"
        assert "could not be rendered: " + words in job["error"], job["error"]
        assert server.children(child) == [], "a child outlived its failed job"
        again = client.post("/put", json={"jobType": "pdf2image", "dpi": 20})
        assert again.status_code == 200, "the worker serves on"


def test_ffmpeg_dying_mid_job_reports_its_stderr(server, client, tmp_path):
    clip = make_clip(tmp_path / "long.mp4", 20)
    with clip.open("rb") as video:
        job_id = client.post("/jobs", data={"jobType": "video", "width": "1280"},
                             files={"file": ("long.mp4", video)}).json()["id"]
    # SIGSEGV-like death with something on stderr first: SIGTERM makes ffmpeg say why it stops.
    os.kill(wait_for_child(server, "ffmpeg"), signal.SIGTERM)
    job = wait_finished(client, job_id)
    assert job["status"] == "failed"
    assert job["error"].startswith("ffmpeg "), job["error"]
    assert client.post("/put", json={"jobType": "video", "width": 64}).status_code == 200


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 3 MB tmpfs; skipped where the test may not mount one (the engine-level ENOSPC test in
    test_engine.py covers the mapping then)."""
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_gives_a_clear_failure_and_the_server_keeps_serving(tmp_path, small_disk):
    with run_server(tmp_path, out_dir=small_disk / "out", db_path=tmp_path / "jobs.db",
                    max_upload_mb=50) as server, server.client() as client:
        # Something else fills the disk up to its last 200 KB.
        filler = small_disk / "filler"
        filler.write_bytes(b"\0" * (3 * 2**20 - 200 * 2**10))
        # An upload that does not fit: 507, and its partial file is gone.
        big = os.urandom(2**20)
        response = client.post("/jobs", data={"jobType": "video"},
                               files={"file": ("big.mp4", big)})
        assert response.status_code == 507, response.text
        assert "disk is full" in response.json()["detail"]
        assert not list((small_disk / "out").glob("*/input/*"))
        # Pages that do not fit: the job fails saying so.
        job_id = client.post("/jobs", json={"jobType": "pdf2image", "dpi": 300}).json()["id"]
        job = wait_finished(client, job_id)
        assert job["status"] == "failed", job
        assert "disk is full" in job["error"] or "No space" in job["error"], job["error"]
        answer = client.post("/put", json={"jobType": "pdf2image", "dpi": 300})
        assert answer.status_code in (422, 507), answer.text
        # Still serving, and working again once there is room.
        assert client.get("/health").status_code == 200
        filler.unlink()
        assert client.post("/put", json={"data": "still here", "seconds": 0}).status_code == 200
        assert client.post("/put", json={"jobType": "pdf2image", "dpi": 20}).status_code == 200
    assert "Traceback" not in server.log()


def age(folder: Path, seconds: float = 3600) -> None:
    """Make a job folder look untouched for `seconds` (the orphan sweep waits 10 minutes)."""
    then = time.time() - seconds
    for path in (*folder.rglob("*"), folder):
        os.utime(path, (then, then), follow_symlinks=False)


def test_a_new_or_emptied_job_store_never_deletes_job_folders(tmp_path):
    """Job folders that a store does not know, because it is new (jobs.db deleted, emptied,
    JOBQUEUE_DB_PATH changed), are left alone with a warning naming both places; a folder
    that a server of this very store left without a record (kill -9 mid-upload) still goes."""
    out = tmp_path / "out"
    with run_server(tmp_path) as server, server.client() as client:
        job_id = client.post("/jobs", json={"jobType": "pdf2image", "dpi": 20}).json()["id"]
        assert wait_finished(client, job_id)["status"] == "succeeded"
    kept = out / job_id
    pages = sorted(path.name for path in kept.glob("*.png"))
    assert pages
    age(kept)
    for emptied in ("delete", "truncate", "elsewhere"):
        db_path = tmp_path / "elsewhere.db" if emptied == "elsewhere" else out / "jobs.db"
        if emptied == "delete":
            for path in out.glob("jobs.db*"):
                path.unlink()
        elif emptied == "truncate":
            (out / "jobs.db").write_bytes(b"")
        settings = {"db_path": db_path} if emptied == "elsewhere" else {}
        with run_server(tmp_path, **settings) as server, server.client() as client:
            # The start-up sweep has run once /health answers; so has a periodic one by the
            # time this job is done.
            done = client.post("/put", json={"jobType": "pdf2image", "dpi": 20})
            assert done.status_code == 200, done.text
            assert client.get(f"/jobs/{job_id}").status_code == 404  # this store's answer
            log = server.log()
        assert sorted(path.name for path in kept.glob("*.png")) == pages, emptied
        # This run's own earlier /put jobs are among them: each run is a new store.
        assert f"job folders in {out} have no record in {db_path}" in log, log
    # A record-less folder that this store's server made (an upload cut off by kill -9): swept.
    store_id = (out / ".jobqueue-store").read_text()
    leftover = out / str(uuid.uuid4())
    (leftover / "input").mkdir(parents=True)
    (leftover / ".job").write_text(store_id)
    (leftover / "input" / "half.pdf").write_bytes(b"%PDF-1.4 cut off")
    age(leftover)
    with run_server(tmp_path, db_path=tmp_path / "elsewhere.db") as server:
        pass
    assert not leftover.exists()
    assert sorted(path.name for path in kept.glob("*.png")) == pages


@pytest.mark.parametrize("damage", ["pages overwritten", "not a database"])
def test_a_damaged_job_database_stops_the_start_with_how_to_recover(tmp_path, damage):
    with run_server(tmp_path) as server, server.client() as client:
        for _ in range(30):  # records over several pages
            assert client.post("/put", json={"data": "x" * 2000, "seconds": 0}
                               ).status_code == 200
    db_path = tmp_path / "out" / "jobs.db"
    assert db_path.stat().st_size > 8 * 4096
    with db_path.open("r+b") as db:
        if damage == "pages overwritten":
            # Leaf pages of the records: the schema stays readable, so the server used to
            # start, and answer 500 for the jobs on them.
            db.seek(db_path.stat().st_size - 4 * 4096)
            db.write(os.urandom(3 * 4096))
        else:
            db.write(os.urandom(4096))
    with pytest.raises(RuntimeError, match="exited at start") as refusal:
        with run_server(tmp_path):
            pass
    assert f"The job database {db_path} is damaged" in str(refusal.value)
    assert ".recover" in str(refusal.value)


def test_an_output_folder_the_server_cannot_write_stops_the_start(tmp_path, small_disk):
    (small_disk / "out").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(RuntimeError, match="exited at start") as refusal:
        with run_server(tmp_path, out_dir=small_disk / "out", db_path=tmp_path / "jobs.db"):
            pass
    assert f"The output folder {small_disk / 'out'} cannot be written" in str(refusal.value)
    assert "Read-only file system" in str(refusal.value)


def fill(disk: Path) -> Path:
    """Fill `disk` to its last byte; the filler file, to remove for room again."""
    filler = disk / "filler"
    sink = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(sink, b"\0" * 4096):
            pass
    except OSError:  # no space left
        pass
    finally:
        os.close(sink)
    return filler


def test_a_full_disk_under_the_job_database_is_507_and_heals_without_a_restart(tmp_path,
                                                                                small_disk):
    """Records on a disk that fills up: 507 naming the disk, never 500 (a failed ROLLBACK used
    to hide the failed COMMIT); a DELETE answered 200 stays deleted after a restart; once
    there is room again, submissions work again without a restart."""
    big = {"data": "x" * 600_000, "seconds": 0}  # a record the log has no room for
    with run_server(tmp_path, out_dir=small_disk / "out") as server, server.client() as client:
        kept = client.post("/jobs", json={"data": "kept", "seconds": 0}).json()["id"]
        doomed = client.post("/jobs", json={"data": "doomed", "seconds": 0}).json()["id"]
        assert wait_finished(client, kept)["status"] == wait_finished(client, doomed)[
            "status"] == "succeeded"
        filler = fill(small_disk)
        refused = client.post("/jobs", json=big)
        assert refused.status_code == 507, refused.text
        assert "disk is full" in refused.json()["detail"]
        deleted = client.delete(f"/jobs/{doomed}")
        assert deleted.status_code in (200, 507), deleted.text
        assert client.get("/health").status_code == 200
        filler.unlink()
        # Room again: accepted within seconds, with no restart. (A small job: the big one's
        # record and its echoed result, twice in the log, may not fit on the 3 MB disk.)
        deadline = time.monotonic() + 60
        small = {"data": "room again", "seconds": 0}
        while (answer := client.post("/jobs", json=small)).status_code == 507:
            assert time.monotonic() < deadline, "still refused with room on the disk"
            time.sleep(0.2)
        assert answer.status_code == 202, answer.text
        assert wait_finished(client, answer.json()["id"])["status"] == "succeeded"
        if deleted.status_code == 507:  # refused then: done once there was room
            eventually(lambda: client.delete(f"/jobs/{doomed}").status_code in (200, 404))
    log = server.log()
    assert " 500 " not in log and "Traceback" not in log, log
    assert "no transaction is active" not in log
    with run_server(tmp_path, out_dir=small_disk / "out") as server, server.client() as client:
        assert client.get(f"/jobs/{doomed}").status_code == 404
        assert client.get(f"/jobs/{kept}").json()["status"] == "succeeded"
