"""`kill -9` of the server: its child processes die with it, and what it left on disk is
cleaned up by the next start, without touching anything else under out/."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

from conftest import run_server, wait_finished
from media import make_clip


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has died; only its exit status waits to be read


def test_children_die_with_the_server_and_the_jobs_run_again(tmp_path):
    clip = make_clip(tmp_path / "long.mp4", 20)
    with run_server(tmp_path) as server, server.client() as client:
        pdf_job = client.post("/jobs", json={"jobType": "pdf2image", "dpi": 600}).json()["id"]
        with clip.open("rb") as video:
            video_job = client.post("/jobs", data={"jobType": "video", "width": "1280"},
                                    files={"file": ("long.mp4", video)}).json()["id"]
        deadline = time.monotonic() + 20
        while not (server.children("python") and server.children("ffmpeg")):
            assert time.monotonic() < deadline, "the children never started"
            time.sleep(0.02)
        children = server.children("python") + server.children("ffmpeg")
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in children):
            assert time.monotonic() < deadline, "a child outlived the killed server"
            time.sleep(0.02)

    with run_server(tmp_path) as again, again.client() as client:
        for job_id in (pdf_job, video_job):
            assert wait_finished(client, job_id, 120)["status"] == "succeeded"


def test_a_folder_with_no_record_is_removed_once_it_is_old(tmp_path):
    out = tmp_path / "out"
    with run_server(tmp_path):  # makes the job store, whose id marks the folders it makes
        store_id = (out / ".jobqueue-store").read_text()
    leftover, fresh, unmarked = (out / str(uuid.uuid4()) for _ in range(3))
    other = out / "not-a-job"
    for folder in (leftover, fresh, unmarked, other):
        (folder / "input").mkdir(parents=True)
        (folder / "input" / "upload.pdf").write_bytes(b"%PDF-1.4 cut off by kill -9")
        if folder is not unmarked:  # the mark the server puts in each folder it makes
            (folder / ".job").write_text(store_id)
    an_hour_ago = time.time() - 3600
    for folder in (leftover, unmarked, other):
        for path in (*folder.rglob("*"), folder):
            os.utime(path, (an_hour_ago, an_hour_ago))
    with run_server(tmp_path) as server, server.client() as client:
        assert client.get("/health").status_code == 200
        assert not leftover.exists(), "an old folder with no record is a leftover"
        assert fresh.exists(), "a recent one may be an upload in progress"
        assert other.exists(), "only job-id-named folders are touched"
        assert unmarked.exists(), "and only those the server made"
        job = client.post("/put", json={"jobType": "pdf2image", "dpi": 20}).json()["data"]
        assert (out / job["id"]).is_dir(), "a folder with a record stays"
    assert "had no record" in server.log()
