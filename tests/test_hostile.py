"""Bombs and lies held to tight limits: a drawing loop stopped with its /put, videos whose
headers lie about their length or frame rate, a file sent with a job that takes none. Each
ends in a 4xx naming the limit, a 504, or a failed job; the render children go with it, and the
server's memory does not grow."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, Server, run_server, wait_finished
from jobqueue.errors import BadInput
from jobqueue.kinds import video
from jobqueue.settings import Settings
from media import probe_streams

sys.path.insert(0, str(ROOT / "tests" / "corpus"))
import make_corpus  # noqa: E402

RENDER_CHILDREN = {"pdfium": "python", "poppler": "pdftoppm"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile")
    make_corpus.make(folder)
    return folder


def rss_kb(server: Server) -> int:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


def wait_until(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the state never came"
        time.sleep(0.02)


@pytest.mark.parametrize("engine", ["pdfium", "poppler"])
def test_a_drawing_loop_ends_with_its_put_and_takes_its_renderer_along(tmp_path, corpus,
                                                                       engine):
    """Forms drawn inside forms: 2**40 rectangles. Whatever the engine makes of it (PDFium
    gives up, poppler would draw until the end of time), the answer comes by the timeout and
    no renderer outlives it."""
    child = RENDER_CHILDREN[engine]
    with run_server(tmp_path, pdf_engine=engine, pdf2image_timeout=3) as server, \
            server.client() as client:
        before = rss_kb(server)
        with (corpus / "nested-forms.pdf").open("rb") as pdf:
            response = client.post("/put", data={"jobType": "pdf2image"},
                                   files={"file": ("loop.pdf", pdf)})
        # PDFium gives up (422, or 413 when it says it ran out of memory) or the timeout
        # comes first (504): which, depends on how fast the machine is.
        assert response.status_code in (413, 422, 504), response.text
        wait_until(lambda: not server.children(child), 3)
        assert rss_kb(server) - before < 30_000, "the render happened outside the server"
        assert client.get("/health").status_code == 200


def test_a_video_longer_than_its_header_says_is_stopped_at_the_limit(tmp_path, corpus):
    """The header says 1 s, the frames last 20 s: ffmpeg is stopped once it has decoded
    JOBQUEUE_VIDEO_MAX_SECONDS, the job fails naming the setting, and no partial output stays."""
    lie = corpus / "lying-length.mp4"
    with run_server(tmp_path, video_max_seconds=5) as server, server.client() as client:
        with lie.open("rb") as video:
            put = client.post("/put", data={"jobType": "video"}, files={"file": (lie.name, video)})
        assert put.status_code == 413 and "JOBQUEUE_VIDEO_MAX_SECONDS" in put.json()["detail"]
        with lie.open("rb") as video:
            accepted = client.post("/jobs", data={"jobType": "video"},
                                   files={"file": (lie.name, video)})
        assert accepted.status_code == 202, "its header passes the check before queueing"
        job = wait_finished(client, accepted.json()["id"])
        assert job["status"] == "failed" and "JOBQUEUE_VIDEO_MAX_SECONDS" in job["error"]
        folder = server.out_dir / job["id"]
        assert not (folder / "video.mp4").exists(), "the partial output is removed"
        assert not server.children("ffmpeg")


def test_frames_count_whatever_the_declared_rate_and_a_result_tells_the_real_length(
        tmp_path, corpus):
    """A stream that declares 10 frames a second and bursts into 500 holds 1060 frames: more
    than VIDEO_MAX_SECONDS x VIDEO_MAX_FPS = 600, so it is refused. The 20 s clip whose header
    says 1 s stays within the limits; its result says how long the output really is."""
    with run_server(tmp_path, video_max_seconds=20, video_max_fps=30) as server, \
            server.client() as client:
        burst = corpus / "frame-burst.ts"
        for endpoint in ("/put", "/jobs"):
            with burst.open("rb") as video:
                refused = client.post(endpoint, data={"jobType": "video"},
                                      files={"file": (burst.name, video)})
            assert refused.status_code == 413, refused.text
            assert "JOBQUEUE_VIDEO_MAX_FPS" in refused.json()["detail"]
            assert "1060" in refused.json()["detail"]
        with (corpus / "lying-length.mp4").open("rb") as video:
            done = client.post("/put", data={"jobType": "video", "width": "64"},
                               files={"file": ("lie.mp4", video)})
        assert done.status_code == 200, done.text
        assert 19 <= done.json()["data"]["result"]["data"]["durationSeconds"] <= 20


def test_a_turn_just_off_a_right_angle_is_judged_as_ffmpeg_does(tmp_path):
    """A 384x128 clip whose display matrix turns it by 89.7°: ffprobe prints -89, ffmpeg rounds
    to 90 and transposes. At width 384 it comes out 384x1152, which the result says (it is
    probed); at width 768 (768x2304) it is over JOBQUEUE_VIDEO_MAX_PIXELS on both endpoints,
    before it is encoded."""
    clip, turned = tmp_path / "clip.mp4", tmp_path / "turned.mp4"
    make_corpus.ffmpeg(clip, "-f", "lavfi", "-i", "testsrc=duration=1:size=384x128:rate=5",
                       "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast")
    make_corpus.display_matrix(clip, turned, 89.7)
    with run_server(tmp_path / "server", video_max_pixels=1_000_000) as server, \
            server.client() as client:
        with turned.open("rb") as upload:
            done = client.post("/put", data={"jobType": "video", "width": "384"},
                               files={"file": (turned.name, upload)})
        assert done.status_code == 200, done.text
        result = done.json()["data"]["result"]
        output = tmp_path / "output.mp4"
        output.write_bytes(client.get(result["files"][0]).content)
        probed = probe_streams(output)["video"]
        assert (probed["width"], probed["height"]) == (384, 1152)
        assert (result["data"]["width"], result["data"]["height"]) == (384, 1152)
        for endpoint in ("/put", "/jobs"):
            with turned.open("rb") as upload:
                refused = client.post(endpoint, data={"jobType": "video", "width": "768"},
                                      files={"file": (turned.name, upload)})
            assert refused.status_code == 413, (endpoint, refused.text)
            assert "768x2304" in refused.json()["detail"]
            assert "JOBQUEUE_VIDEO_MAX_PIXELS" in refused.json()["detail"]


def test_an_output_without_video_frames_is_no_result(tmp_path):
    """What the output check makes of ffmpeg's output when it decoded nothing: an MP4 with no
    stream at all (262 bytes, as ffmpeg writes when no frame reaches it), one whose video
    track has no samples, and frames larger than the pixel limit."""
    settings = Settings(video_max_pixels=100 * 100)

    def verdict(path: Path) -> dict:
        done = subprocess.run(video.probe_command(str(path)), capture_output=True, check=True)
        return json.loads(done.stdout)

    empty, clip, hollow = tmp_path / "empty.mp4", tmp_path / "clip.mp4", tmp_path / "hollow.mp4"
    make_corpus.ffmpeg(empty, "-f", "lavfi", "-i", "testsrc=size=64x48", "-frames:v", "0",
                       "-c:v", "libx264")
    make_corpus.ffmpeg(clip, "-f", "lavfi", "-i", "testsrc=duration=1:size=64x48:rate=5",
                       "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast")
    make_corpus.no_samples(clip, hollow)
    with pytest.raises(BadInput, match="no video stream"):
        video.output_size(verdict(empty), settings)
    with pytest.raises(BadInput, match="no video frames"):
        video.output_size(verdict(hollow), settings)
    assert video.output_size(verdict(clip), settings) == (64, 48)
    with pytest.raises(BadInput, match="JOBQUEUE_VIDEO_MAX_PIXELS"):
        video.output_size(verdict(clip), Settings(video_max_pixels=64 * 47))


def test_a_file_sent_to_a_kind_that_takes_none_is_refused_before_it_is_stored(tmp_path):
    """jobType=message before the file part: 422 at once, nothing written."""
    boundary = b"b0undary"
    head = (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"jobType\"\r\n\r\n"
            b"message\r\n--" + boundary + b"\r\nContent-Disposition: form-data; name=\"file\"; "
            b"filename=\"big.bin\"\r\n\r\n")
    body = head + b"\0" * (8 * 2**20) + b"\r\n--" + boundary + b"--\r\n"
    with run_server(tmp_path) as server, server.client() as client:
        response = client.post("/jobs", content=body, headers={
            "Content-Type": "multipart/form-data; boundary=b0undary"})
        assert response.status_code == 422
        assert "take no file" in response.json()["detail"]
        assert [p for p in server.out_dir.iterdir() if p.is_dir()] == [], "nothing stored"


def test_a_boundary_longer_than_the_parser_allows_is_400_naming_the_limit(server, client):
    """python-multipart refuses a boundary over 256 characters as it is built: that was a 500.
    Now it is 400, on both routes, and nothing is stored."""
    boundary = "b" * 300
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"jobType\"\r\n\r\n"
            f"message\r\n--{boundary}--\r\n").encode()
    before = set(server.out_dir.iterdir())
    for endpoint in ("/put", "/jobs"):
        response = client.post(endpoint, content=body, headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert response.status_code == 400, response.text
        detail = response.json()["detail"]
        assert "boundary" in detail and "300" in detail and "256" in detail
    assert set(server.out_dir.iterdir()) == before, "nothing stored"
