"""The bad-input corpus (tests/corpus/make_corpus.py) on /put and /jobs: always a 4xx that says
what is wrong, or a job that fails saying so; never a 5xx, a hung worker, a file outside
out/<id>/, or anything left on disk for a refused upload."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest

from conftest import DATA, ROOT, Server, eventually, run_server, wait_finished

sys.path.insert(0, str(ROOT / "tests" / "corpus"))
import make_corpus  # noqa: E402

KIND_OF = {".pdf": "pdf2image", ".mp4": "video", ".ts": "video", ".mkv": "video",
           ".mov": "video"}
# What each file must come to. "refused": a 4xx naming the problem; "fails": refused, or
# accepted and then failed with an error; "works": a job that succeeds.
EXPECTED = {
    "empty.pdf": ("refused", "not a PDF"),
    "truncated.pdf": ("refused", "not a PDF"),
    "html-behind-pdf-header.pdf": ("refused", "PDF"),
    "thousand-pages.pdf": ("refused", "JOBQUEUE_PDF_MAX_PAGES"),
    "encrypted.pdf": ("refused", "password"),
    # Opens without asking, in any viewer: not refused as encrypted.
    "encrypted-with-an-empty-password.pdf": ("works", ""),
    "rotated-by-a-real-number.pdf": ("works", ""),
    "image-named.pdf": ("refused", "not a PDF"),
    "text-named.pdf": ("refused", "not a PDF"),
    "empty.mp4": ("refused", "video"),
    "text-named.mp4": ("refused", "video"),
    "audio-only.mp4": ("refused", "no video stream"),
    "tiny-2x2.mp4": ("works", ""),
    "codec-lie.mp4": ("fails", "ffmpeg exited"),
    "no-samples.mp4": ("refused", "no frames"),
    "data-elsewhere.mov": ("refused", "no frames"),
    # Bombs and lies (test_hostile.py holds them to tighter limits).
    "huge-page.pdf": ("refused", "JOBQUEUE_PDF_MAX_PIXELS"),
    "flate-bomb.pdf": ("fails", "JOBQUEUE_RENDER_MAX_MB"),
    "framerate-bomb.mp4": ("refused", "JOBQUEUE_VIDEO_MAX_FPS"),
    "lying-length.mp4": ("works", ""),
    "frame-burst.ts": ("works", ""),
    "overflowing-page.pdf": ("refused", "too large for poppler to measure"),
    "title-with-a-bad-size.pdf": ("works", ""),
    "rotate-tag-lie.mkv": ("works", ""),
}
UNSAFE_NAMES = ["../../../evil.pdf", "/etc/absolute.pdf", "nul\x00byte.pdf", "x" * 1000 + ".pdf",
                "résumé-文件.pdf", "..", ".hidden.pdf", "a\\..\\..\\win.pdf"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    make_corpus.make(folder)
    return folder


@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> Server:
    with run_server(tmp_path_factory.mktemp("guarded"), video_queue_size=50,
                    pdf2image_queue_size=50, message_timeout=5) as server:
        yield server


def job_dirs(server: Server) -> set[str]:
    return {path.name for path in server.out_dir.iterdir() if path.is_dir()}



def check_answer(client: httpx.Client, server: Server, response: httpx.Response,
                 expected: str, words: str, before: set[str]) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        detail = response.json()["detail"]
        assert detail and (words.lower() in json.dumps(detail).lower()), detail
        assert expected in ("refused", "fails"), response.text
        assert job_dirs(server) == before, "a refused upload left files behind"
        return
    if response.status_code == 202:
        job = wait_finished(client, response.json()["id"])
        if expected == "works":
            assert job["status"] == "succeeded", job
        else:
            assert job["status"] == "failed" and words.lower() in job["error"].lower(), job
            # Its partial output goes (just after its end is recorded); its upload stays.
            folder = server.out_dir / job["id"]
            eventually(lambda: sorted(path.name for path in folder.iterdir())
                       == [".job", "input"])
    else:
        assert expected == "works", response.text


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("endpoint", ["/put", "/jobs"])
def test_corpus_file(guarded, corpus, name, endpoint):
    expected, words = EXPECTED[name]
    with guarded.client() as client:
        before = job_dirs(guarded)
        with (corpus / name).open("rb") as upload:
            response = client.post(endpoint, data={"jobType": KIND_OF[Path(name).suffix]},
                                   files={"file": (name, upload)})
        check_answer(client, guarded, response, expected, words, before)


@pytest.mark.parametrize("endpoint", ["/put", "/jobs"])
def test_unsafe_file_names_stay_inside_the_job_folder(guarded, endpoint):
    pdf = (DATA / "sample.pdf").read_bytes()
    with guarded.client() as client:
        for name in UNSAFE_NAMES:
            body = (b"--b\r\nContent-Disposition: form-data; name=\"jobType\"\r\n\r\npdf2image\r\n"
                    b"--b\r\nContent-Disposition: form-data; name=\"dpi\"\r\n\r\n20\r\n"
                    b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\""
                    + name.encode() + b"\"\r\nContent-Type: application/pdf\r\n\r\n"
                    + pdf + b"\r\n--b--\r\n")
            response = client.post(endpoint, content=body,
                                   headers={"Content-Type": "multipart/form-data; boundary=b"})
            assert response.status_code in (200, 202), (name, response.text)
            job_id = response.json()["data"]["id"] if endpoint == "/put" else response.json()["id"]
            [stored] = (guarded.out_dir / job_id / "input").iterdir()
            assert stored.name.isascii() and "/" not in stored.name and len(stored.name) <= 120
            assert not stored.name.startswith(".")
    # Nothing anywhere but job folders, the job database and the mark of its store.
    for path in guarded.out_dir.rglob("*"):
        top = path.relative_to(guarded.out_dir).parts[0]
        assert top.startswith("jobs.db") or len(top) == 36 or top == ".jobqueue-store", path
    assert not (guarded.out_dir.parent / "evil.pdf").exists()
    assert not Path("/etc/absolute.pdf").exists()


BODIES = {
    "5 MB JSON string": ({"Content-Type": "application/json"},
                         json.dumps({"data": "x" * 5_000_000}).encode(), 413),
    "5 MB form field": ({"Content-Type": "multipart/form-data; boundary=b"},
                        b"--b\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\n"
                        + b"x" * 5_000_000 + b"\r\n--b--\r\n", 422),
    "wrong Content-Type": ({"Content-Type": "application/xml"}, b"<job/>", 415),
    "no boundary": ({"Content-Type": "multipart/form-data"}, b"--b\r\n", 422),
    "cut-off multipart": ({"Content-Type": "multipart/form-data; boundary=b"},
                          b"--b\r\nContent-Disposition: form-data; name=\"file\"; "
                          b"filename=\"a.pdf\"\r\n\r\n%PDF-1.4 half", 400),
    "garbage multipart": ({"Content-Type": "multipart/form-data; boundary=b"},
                          b"\x00\xff garbage \r\n\r\n--x--", 400),
    "JSON array": ({"Content-Type": "application/json"}, b"[1, 2]", 422),
    "deep JSON": ({"Content-Type": "application/json"}, b"[" * 100_000, 422),
    "NaN option": ({"Content-Type": "application/json"}, b'{"seconds": NaN}', 422),
    "infinite number": ({"Content-Type": "application/json"}, b'{"seconds": 1e400}', 422),
    "huge integer": ({"Content-Type": "application/json"},
                     b'{"seconds": ' + b"9" * 5000 + b"}", 422),
    "lone surrogate": ({"Content-Type": "application/json"}, b'{"data": "\\ud800"}', 422),
}


@pytest.mark.parametrize("case", sorted(BODIES))
@pytest.mark.parametrize("endpoint", ["/put", "/jobs"])
def test_malformed_bodies(guarded, endpoint, case):
    headers, body, status = BODIES[case]
    with guarded.client() as client:
        before = job_dirs(guarded)
        response = client.post(endpoint, content=body, headers=headers)
        assert response.status_code == status, response.text
        assert response.json()["detail"]
        assert job_dirs(guarded) == before


def test_workers_still_serve_after_the_corpus(guarded):
    with guarded.client() as client:
        for kind, options in (("message", {"seconds": 0}), ("pdf2image", {"dpi": 20}),
                              ("video", {"width": 64})):
            response = client.post("/put", json={"jobType": kind, **options})
            assert response.status_code == 200, (kind, response.text)
    assert "Traceback" not in guarded.log()


def test_odd_query_values_are_422_not_500(guarded):
    with guarded.client() as client:
        job_id = client.post("/put", json={"jobType": "video", "width": 64}).json()["data"]["id"]
        for query in ("fps=inf", "fps=nan", "width=1e999", "fps=%ED%A0%80", "fps=%FF"):
            response = client.get(f"/jobs/{job_id}/preview.mjpg?{query}")
            assert response.status_code == 422, (query, response.text)
        assert client.get("/jobs", params={"limit": "inf"}).status_code == 422


@pytest.mark.parametrize("settings, options, words", [
    ({"video_max_seconds": 2}, {}, "JOBQUEUE_VIDEO_MAX_SECONDS"),
    ({"video_max_pixels": 640 * 360}, {}, "JOBQUEUE_VIDEO_MAX_PIXELS"),
    ({"video_max_pixels": 1280 * 720}, {"width": "1920"}, "output frames would be"),
    # An output frame too large for ffmpeg to set up under its memory cap: ffmpeg fails at
    # once, before /put's probe beside it answers, and the answer is still the limit's.
    ({"video_max_mb": 512}, {"width": "7680", "height": "4320"}, "output frames would be"),
    ({"pdf_max_pages": 3}, {}, "JOBQUEUE_PDF_MAX_PAGES"),
    ({"pdf_max_pixels": 1_000_000}, {}, "JOBQUEUE_PDF_MAX_PIXELS"),
])
def test_limits_refuse_before_work_starts(tmp_path, settings, options, words):
    kind, sample = (("pdf2image", DATA / "sample.pdf") if any("pdf" in name for name in settings)
                    else ("video", DATA / "sample.mp4"))
    with run_server(tmp_path, **settings) as server, server.client() as client:
        for endpoint in ("/jobs", "/put"):
            with sample.open("rb") as upload:
                response = client.post(endpoint, data={"jobType": kind, **options},
                                       files={"file": (sample.name, upload)})
            assert response.status_code == 413, response.text
            assert words in response.json()["detail"]
