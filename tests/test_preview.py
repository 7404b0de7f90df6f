"""The video preview stream (multipart JPEG from ffmpeg) and ?w= page thumbnails."""

from __future__ import annotations

import concurrent.futures
import io
import time
from contextlib import ExitStack

import httpx
import pytest
from PIL import Image

from conftest import Server, run_server
from jobqueue.api.routes.files import THUMBNAIL_WIDTHS
from media import make_clip

JPEG_START = b"\xff\xd8"


def video_job(client: httpx.Client, width: int = 320) -> str:
    response = client.post("/put", json={"jobType": "video", "width": width})
    assert response.status_code == 200, response.text
    return response.json()["data"]["id"]


class Frames:
    """Reads JPEG frames off a multipart/x-mixed-replace stream. Keep it while reading: when
    its chunk iterator is dropped, httpx closes the stream and the server sees the viewer go."""

    def __init__(self, stream: httpx.Response):
        self.boundary = b"--" + stream.headers["content-type"].split("boundary=")[1].encode()
        self.chunks = stream.iter_bytes()
        self.buffer = b""

    def take(self, count: int) -> list[bytes]:
        frames: list[bytes] = []
        for chunk in self.chunks:
            self.buffer += chunk
            parts = self.buffer.split(self.boundary)
            # Every part but the last is complete: headers, a blank line, the JPEG.
            for part in parts[1:-1]:
                headers, _, body = part.partition(b"\r\n\r\n")
                assert b"image/jpeg" in headers
                frames.append(body.rstrip(b"\r\n"))
            self.buffer = self.boundary + parts[-1]
            if len(frames) >= count:
                break
        return frames


def wait_for_no_children(server: Server, name: str, seconds: float) -> float:
    started = time.monotonic()
    while server.children(name) and time.monotonic() - started < seconds:
        time.sleep(0.02)
    return time.monotonic() - started


def test_preview_streams_frames_and_kills_ffmpeg_when_the_viewer_leaves(server, client):
    job_id = video_job(client)
    started = time.monotonic()
    with client.stream("GET", f"/jobs/{job_id}/preview.mjpg", params={"fps": 10}) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"] == "multipart/x-mixed-replace;boundary=frame"
        reader = Frames(stream)
        frames = reader.take(6)
        assert len(frames) >= 6 and all(f.startswith(JPEG_START) for f in frames)
        # Paced at (at most) 10 frames a second, not dumped as fast as ffmpeg decodes.
        assert time.monotonic() - started > 0.3
        assert len(set(frames)) > 1, "the frames should change: it is a moving picture"
        assert len(server.children("ffmpeg")) == 1
    assert wait_for_no_children(server, "ffmpeg", 3) < 1.0, "ffmpeg outlived its viewer"


def test_several_viewers_each_get_frames(server, client):
    job_id = video_job(client)
    with ExitStack() as viewers:
        streams = [viewers.enter_context(client.stream(
            "GET", f"/jobs/{job_id}/preview.mjpg", params={"width": 64, "fps": 5}))
            for _ in range(3)]
        readers = [Frames(stream) for stream in streams]
        for reader in readers:
            assert len(reader.take(2)) >= 2
        assert len(server.children("ffmpeg")) == 3
    assert wait_for_no_children(server, "ffmpeg", 3) < 1.0


def test_preview_of_a_whole_video_ends_by_itself(server, client):
    job_id = video_job(client, width=64)
    response = client.get(f"/jobs/{job_id}/preview.mjpg", params={"fps": 25}, timeout=20)
    assert response.status_code == 200
    # The 4 s sample at 25 fps: one frame per part, about 100 of them.
    assert 90 <= response.content.count(b"--frame\r\n") <= 110
    assert not server.children("ffmpeg")


def test_preview_refusals(client):
    pdf = client.post("/put", json={"jobType": "pdf2image", "dpi": 20}).json()["data"]["id"]
    response = client.get(f"/jobs/{pdf}/preview.mjpg")
    assert response.status_code == 404
    assert "only video jobs have a preview" in response.json()["detail"]
    assert client.get("/jobs/not-a-job/preview.mjpg").status_code == 404
    job_id = video_job(client)
    assert client.get(f"/jobs/{job_id}/preview.mjpg", params={"fps": 0}).status_code == 422


def test_preview_streams_are_limited(tmp_path):
    with run_server(tmp_path, preview_streams=1) as server, server.client() as client:
        job_id = video_job(client)
        with client.stream("GET", f"/jobs/{job_id}/preview.mjpg") as first:
            reader = Frames(first)
            assert reader.take(1)
            second = client.get(f"/jobs/{job_id}/preview.mjpg")
            assert second.status_code == 503
            assert second.headers["Retry-After"] == "5"
            assert "JOBQUEUE_PREVIEW_STREAMS" in second.json()["detail"]
        wait_for_no_children(server, "ffmpeg", 3)
        with client.stream("GET", f"/jobs/{job_id}/preview.mjpg") as again:
            assert again.status_code == 200


@pytest.mark.parametrize(("width", "made"), [(16, 16), (100, 128), (400, 512), (1000, None)])
def test_thumbnails_of_pages(client, width, made):
    """?w= is rounded up to the next of 16, 32, ... 2048; a page narrower than that is not
    enlarged."""
    job = client.post("/put", json={"jobType": "pdf2image", "dpi": 100}).json()["data"]
    page = job["result"]["files"][0]
    with Image.open(io.BytesIO(client.get(page).content)) as original:
        made = made or original.width  # 1024 is wider than the page itself
    response = client.get(page, params={"w": width})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(response.content)) as image:
        # A4 at 100 dpi is 827 x 1169: the thumbnail keeps that shape.
        assert image.width == made
        assert abs(image.height - round(made * 1169 / 827)) <= 1


def test_thumbnails_of_every_width_keep_a_bounded_few_per_page(server, client):
    """Every distinct ?w= used to keep one more JPEG per page: a GET that fills the disk.
    Widths are rounded up to a few sizes, so a page keeps at most that many."""
    job = client.post("/put", json={"jobType": "pdf2image", "dpi": 40}).json()["data"]
    page = job["result"]["files"][0]
    for width in range(16, 2049, 37):  # 55 distinct widths
        response = client.get(page, params={"w": width})
        assert response.status_code == 200, response.text
        with Image.open(io.BytesIO(response.content)) as image:
            assert image.width >= min(width, 330), "never narrower than asked (or the page)"
    kept = list((server.out_dir / job["id"]).rglob("thumbnails/*.jpg"))
    assert 0 < len(kept) <= len(THUMBNAIL_WIDTHS), sorted(path.name for path in kept)


def test_thumbnail_refusals(client):
    video = client.post("/put", json={"jobType": "video", "width": 64}).json()["data"]
    response = client.get(video["result"]["files"][0], params={"w": 100})
    assert response.status_code == 422
    assert "not an image" in response.json()["detail"]
    page = client.post("/put", json={"jobType": "pdf2image", "dpi": 20}).json()["data"]
    assert client.get(page["result"]["files"][0], params={"w": 5000}).status_code == 422


def test_many_viewers_at_once_start_no_more_decoders_than_the_limit(tmp_path):
    with run_server(tmp_path, preview_streams=2) as server, server.client() as client:
        job_id = video_job(client)
        answers: list[int] = []
        most_decoders = 0

        def watch() -> None:
            with server.client() as own, own.stream(
                    "GET", f"/jobs/{job_id}/preview.mjpg", params={"width": 64}) as stream:
                answers.append(stream.status_code)
                if stream.status_code == 200:
                    reader = Frames(stream)
                    reader.take(10)  # held for about 0.4 s

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            viewers = [pool.submit(watch) for _ in range(8)]
            while not all(viewer.done() for viewer in viewers):
                most_decoders = max(most_decoders, len(server.children("ffmpeg")))
                time.sleep(0.01)
            for viewer in viewers:
                viewer.result()
        assert most_decoders <= 2
        assert answers.count(200) >= 2 and answers.count(503) >= 1
        assert set(answers) == {200, 503}


def test_a_running_jobs_preview_plays_its_upload(server, client, tmp_path):
    clip = make_clip(tmp_path / "long.mp4", 20)
    with clip.open("rb") as video:
        job_id = client.post("/jobs", data={"jobType": "video", "width": "1280"},
                             files={"file": ("long.mp4", video)}).json()["id"]
    try:
        with client.stream("GET", f"/jobs/{job_id}/preview.mjpg",
                           params={"width": 64, "fps": 10}) as stream:
            assert stream.status_code == 200
            reader = Frames(stream)
            assert len(reader.take(3)) >= 3
            assert client.get(f"/jobs/{job_id}").json()["status"] in ("queued", "running")
    finally:
        client.delete(f"/jobs/{job_id}")
    cancelled = client.get(f"/jobs/{job_id}/preview.mjpg")
    assert cancelled.status_code == 404 and "has no video of its own" in cancelled.json()["detail"]
