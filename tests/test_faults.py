"""Faults: engines dying mid-job, a full disk. The server reports them and keeps serving."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import Server, run_server, wait_finished
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
