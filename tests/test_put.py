"""POST /put for each job kind, as JSON and as upload, plus files, validation and concurrency."""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import time
import uuid
from types import SimpleNamespace

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from starlette.requests import Request

from conftest import DATA
from jobqueue.api.app import DirectRoute, create_app, takes_request_alone
from jobqueue.api.routes import put
from jobqueue.records import JobRecord, Origin
from jobqueue.settings import Settings
from media import pdf_page_points, png_size, probe_streams


def result_of(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    body = response.json()["data"]
    assert uuid.UUID(body["id"]).version == 4
    result = body["result"]
    for field in ("dequeueElapsedMs", "processElapsedMs", "totalElapsedMs"):
        assert result[field] >= 0
    assert result["totalElapsedMs"] >= result["processElapsedMs"]
    return {"id": body["id"], **result}


def expected_page_size(dpi: int) -> tuple[int, int]:
    _, width_pt, height_pt = pdf_page_points(DATA / "sample.pdf")
    return round(width_pt / 72 * dpi), round(height_pt / 72 * dpi)


def assert_pages(client: httpx.Client, result: dict, dpi: int) -> None:
    pages, _, _ = pdf_page_points(DATA / "sample.pdf")
    assert result["data"] == {"pages": pages, "dpi": dpi}
    assert [url.rsplit("/", 1)[1] for url in result["files"]] == [
        f"page-{n:03d}.png" for n in range(1, pages + 1)]
    want_w, want_h = expected_page_size(dpi)
    for url in result["files"]:
        page = client.get(url)
        assert page.headers["content-type"] == "image/png"
        width, height = png_size(page.content)
        assert abs(width - want_w) <= 1 and abs(height - want_h) <= 1, (width, height)


def assert_video(client: httpx.Client, result: dict, tmp_path, width: int, height: int) -> None:
    [url] = result["files"]
    download = client.get(url)
    assert download.headers["content-type"] == "video/mp4"
    path = tmp_path / "out.mp4"
    path.write_bytes(download.content)
    streams = probe_streams(path)
    assert (streams["video"]["width"], streams["video"]["height"]) == (width, height)
    assert streams["video"]["codec_name"] == "h264"
    assert "audio" in streams, "the audio track was dropped"
    assert result["data"]["audio"] is True
    assert (result["data"]["width"], result["data"]["height"]) == (width, height)


def test_message_json_is_the_default_kind(client):
    result = result_of(client.post("/put", json={"data": "hello xdata team", "seconds": 0.2}))
    assert result["data"] == {"message": "hello xdata team", "length": 16, "seconds": 0.2}
    assert result["processElapsedMs"] >= 200
    assert result["workerName"].startswith("message-worker-")
    assert result["files"] == []


def test_pdf2image_json_converts_the_bundled_sample(client):
    result = result_of(client.post("/put", json={"data": "x", "jobType": "pdf2image"}))
    assert_pages(client, result, dpi=200)


def test_pdf2image_upload_honours_dpi(client):
    with open(DATA / "sample.pdf", "rb") as pdf:
        response = client.post("/put", data={"jobType": "pdf2image", "dpi": "72"},
                               files={"file": ("scan.pdf", pdf, "application/pdf")})
    assert_pages(client, result_of(response), dpi=72)


def test_video_json_resizes_the_bundled_sample_to_640_wide(client, tmp_path):
    result = result_of(client.post("/put", json={"jobType": "video"}))
    # sample.mp4 is 1280x720, so 640 wide keeps 16:9 at 360 high.
    assert_video(client, result, tmp_path, 640, 360)


def test_video_upload_with_height_only_keeps_aspect_ratio_at_an_even_width(client, tmp_path):
    with open(DATA / "sample.mp4", "rb") as video:
        response = client.post("/put", data={"jobType": "video", "height": "240"},
                               files={"file": ("clip.mp4", video, "video/mp4")})
    assert_video(client, result_of(response), tmp_path, 426, 240)  # 1280*240/720 = 426.7 -> even


def test_unknown_job_type_is_422_listing_the_valid_ones(client):
    response = client.post("/put", json={"data": "x", "jobType": "ocr"})
    assert response.status_code == 422
    assert "message, pdf2image, video" in response.json()["detail"]


def test_bad_options_are_422_naming_the_field(client):
    response = client.post("/put", json={"jobType": "video", "width": 641})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "width"]
    response = client.post("/put", json={"seconds": "soon"})
    assert response.status_code == 422


def test_non_pdf_upload_is_415_as_on_post_jobs_and_the_worker_lives_on(client, server):
    upload = {"file": ("notes.pdf", b"just some text\n" * 100, "application/pdf")}
    response = client.post("/put", data={"jobType": "pdf2image"}, files=upload)
    assert response.status_code == 415
    assert "not a PDF" in response.json()["detail"]
    queued = client.post("/jobs", data={"jobType": "pdf2image"}, files=upload)
    assert (queued.status_code, queued.json()) == (415, response.json()), "one check, one answer"
    # The handler raised on both pdf2image workers' watch; both still take work.
    for _ in range(3):
        result_of(client.post("/put", json={"jobType": "pdf2image", "dpi": 20}))
    assert client.get("/health").json()["queues"]["pdf2image"]["workers"] == 2


def test_non_video_upload_is_415_without_server_paths(client):
    response = client.post("/put", data={"jobType": "video"},
                           files={"file": ("clip.mp4", b"not a video at all", "video/mp4")})
    assert response.status_code == 415
    detail = response.json()["detail"]
    assert "not a video" in detail and "/input/" not in detail


def test_upload_name_cannot_escape_the_job_folder(client, server):
    with open(DATA / "sample.pdf", "rb") as pdf:
        response = client.post("/put", data={"jobType": "pdf2image", "dpi": "20"},
                               files={"file": ("../../../evil.pdf", pdf, "application/pdf")})
    job_id = result_of(response)["id"]
    stored = server.out_dir / job_id / "input" / "evil.pdf"
    assert list(server.out_dir.parent.rglob("evil.pdf")) == [stored]


def test_files_unknown_and_traversal_are_404(client):
    result = result_of(client.post("/put", json={"jobType": "pdf2image", "dpi": 20}))
    job_id = result["id"]
    assert client.get(f"/jobs/{job_id}/files/page-001.png").status_code == 200
    assert client.get(f"/jobs/{job_id}/files/page-999.png").status_code == 404
    assert client.get(f"/jobs/{uuid.uuid4()}/files/page-001.png").status_code == 404
    assert client.get(f"/jobs/{job_id}/files/input").status_code == 404
    for path in (f"/jobs/{job_id}/files/..%2F..%2Fpyproject.toml",
                 "/jobs/..%2F..%2F/files/pyproject.toml",
                 f"/jobs/{job_id}/files/%2E%2E",
                 "/jobs/not-a-uuid/files/page-001.png"):
        response = client.get(path)
        assert response.status_code == 404, path


def test_fifty_concurrent_puts_each_get_their_own_result(server):
    def put(number: int) -> dict:
        with server.client() as client:
            return result_of(client.post("/put", json={"data": f"job {number}", "seconds": 0.05}))

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(put, range(50)))
    assert [r["data"]["message"] for r in results] == [f"job {n}" for n in range(50)]
    assert len({r["id"] for r in results}) == 50
    assert {r["workerName"] for r in results} <= {f"message-worker-{n}" for n in range(1, 5)}


def test_health_and_root(client):
    health = client.get("/health").json()
    assert health["status"] == "ok"
    assert set(health["queues"]) == {"message", "pdf2image", "video"}
    assert health["queues"]["message"] == {"workers": 4, "busy": 0, "queued": 0, "capacity": 64,
                                           "state": "ready"}
    assert health["queues"]["video"]["capacity"] == 10
    assert "/docs" in client.get("/").json()["docs"]


def test_docs_give_every_route_a_summary_and_put_examples(client):
    spec = client.get("/openapi.json").json()
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            assert operation.get("summary"), f"{method.upper()} {path} has no summary"
    put = spec["paths"]["/put"]["post"]
    assert {"application/json", "multipart/form-data"} <= set(put["requestBody"]["content"])
    assert {"503", "504", "429", "422"} <= set(put["responses"])


def test_docs_give_a_job_event_stream_its_item_schema(client):
    # The routes are copied into the app (api/app.py's include_flat); the copy must infer the
    # stream's item type from the endpoint as the original did, or `data` is just a string.
    spec = client.get("/openapi.json").json()
    stream = spec["paths"]["/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    item = stream["text/event-stream"]["itemSchema"]
    assert item["required"] == ["data"]
    assert item["properties"]["data"]["contentMediaType"] == "application/json"
    assert item["properties"]["data"]["contentSchema"]["type"] == "object"


async def answer_alone(request: Request) -> JSONResponse:
    return JSONResponse({})


async def answer_a_dict(request: Request) -> dict:
    return {}


async def answer_with_a_parameter(request: Request, job_id: str) -> JSONResponse:
    return JSONResponse({})


def test_an_endpoint_taking_the_request_alone_is_called_directly_and_others_through_fastapi(
        tmp_path):
    app = FastAPI()
    app.router.route_class = DirectRoute
    app.add_api_route("/alone", answer_alone)
    app.add_api_route("/dict", answer_a_dict)
    app.add_api_route("/param/{job_id}", answer_with_a_parameter)
    app.add_api_route("/keyed", answer_alone, dependencies=[Depends(lambda: None)])
    direct = {route.path: route.get_route_handler() is route.endpoint
              for route in app.routes if isinstance(route, DirectRoute)}
    assert direct == {"/alone": True, "/dict": False, "/param/{job_id}": False, "/keyed": False}
    served = {route.path for route in create_app(Settings(out_dir=tmp_path)).routes
              if isinstance(route, DirectRoute) and takes_request_alone(route)}
    assert {"/put", "/health"} <= served


def test_malformed_bodies_are_4xx_never_5xx(client):
    cases = {
        "NaN": (b'{"seconds": NaN}', "application/json"),
        "deep nesting": (b"[" * 100_000 + b"]" * 100_000, "application/json"),
        "a list": (b"[1, 2]", "application/json"),
        "broken JSON": (b'{"data": ', "application/json"),
        "plain text": (b"hello", "text/plain"),
        "a raw lone surrogate": (b'{"data": "\xed\xa0\x80"}', "application/json"),
        "not UTF-8": (b'{"data": "\xff"}', "application/json"),
        # Without a BOM, UTF-16 and UTF-32 bytes of the escape never show "\u" side by side.
        **{f"a lone surrogate escape in {encoding}":
           ('{"data": "\\ud800"}'.encode(encoding), "application/json")
           for encoding in ("utf-16-le", "utf-16-be", "utf-32-le", "utf-16")},
    }
    for name, (body, content_type) in cases.items():
        response = client.post("/put", content=body, headers={"Content-Type": content_type})
        assert 400 <= response.status_code < 500, (name, response.status_code)
        assert response.json()["detail"], name


def test_multipart_mistakes_are_4xx(client):
    pdf = (DATA / "sample.pdf").read_bytes()
    two_files = client.post("/put", data={"jobType": "pdf2image"},
                            files=[("file", ("a.pdf", pdf)), ("file", ("b.pdf", pdf))])
    assert 400 <= two_files.status_code < 500
    job_type_as_file = client.post("/put", files={"jobType": ("t.txt", b"pdf2image")})
    assert job_type_as_file.status_code == 422
    file_for_message = client.post("/put", data={"data": "x"}, files={"file": ("a.txt", b"x")})
    assert file_for_message.status_code == 422
    twice = client.post("/put", files=[("dpi", (None, "100")), ("dpi", (None, "200")),
                                       ("jobType", (None, "pdf2image"))])
    assert twice.status_code == 422 and "twice" in twice.json()["detail"]


def test_content_type_is_matched_case_insensitively(client):
    request = client.build_request("POST", "/put", data={"jobType": "pdf2image", "dpi": "20"},
                                   files={"file": ("a.pdf", (DATA / "sample.pdf").read_bytes())})
    request.headers["Content-Type"] = request.headers["Content-Type"].replace(
        "multipart/form-data", "Multipart/Form-Data")
    assert client.send(request).status_code == 200


def test_reported_size_matches_ffmpeg_for_odd_aspect_ratios(client, tmp_path):
    """The summary's width and height are the output's, probed: check them against ffprobe."""
    odd, thin = tmp_path / "odd.mp4", tmp_path / "thin.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i",
                    "testsrc2=size=718x404:rate=10:duration=1", "-pix_fmt", "yuv420p",
                    "-metadata:s:v", "rotate=90", str(odd)], check=True)
    # So thin that its height at 8 wide rounds to 0, which ffmpeg takes as the input's.
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i",
                    "testsrc2=size=4000x10:rate=10:duration=1", "-pix_fmt", "yuv420p",
                    str(thin)], check=True)
    for clip, options in ((odd, {"width": "300"}), (odd, {"height": "202"}),
                          (odd, {"width": "100", "height": "60"}), (thin, {"width": "8"})):
        with open(clip, "rb") as video:
            result = result_of(client.post("/put", data={"jobType": "video", **options},
                                           files={"file": ("odd.mp4", video)}))
        path = tmp_path / "out.mp4"
        path.write_bytes(client.get(result["files"][0]).content)
        probed = probe_streams(path)["video"]
        assert (result["data"]["width"], result["data"]["height"]) == (
            probed["width"], probed["height"]), options


def test_a_put_job_stopped_at_its_deadline_before_the_wait_times_out_is_504():
    """The embedded engine's watchdog stops a /put job at its deadline; when that comes first
    (a busy event loop runs the wait's timer late), the client still gets 504, not 409. That
    order shows on a real server only now and then, so an engine stands in for it here."""
    now = time.time()
    stopped = JobRecord(id=str(uuid.uuid4()), job_type="message", status="cancelled",
                        options={}, input_path=None, created_at=now - 2.2, started_at=now - 2.1,
                        finished_at=now - 0.1, origin=Origin.PUT)

    class Engine:
        async def wait(self, job_id: str, timeout: float) -> JobRecord:
            return stopped

        async def cancel(self, *args) -> None:
            raise AssertionError("a job that has ended needs no cancel")

    async def receive() -> dict:
        await asyncio.Event().wait()  # no disconnect
        return {}

    async def wait() -> JobRecord:
        request = Request({"type": "http", "app": SimpleNamespace(state=SimpleNamespace(
            draining=False, loop=asyncio.get_running_loop()))}, receive)
        return await put.wait_for_job(request, Engine(), stopped, 2.0)

    with pytest.raises(HTTPException) as answer:
        asyncio.run(wait())
    assert answer.value.status_code == 504
    assert "JOBQUEUE_MESSAGE_TIMEOUT" in answer.value.detail
