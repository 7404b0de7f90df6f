"""The two example kinds of examples/, each a package of its own installed into the venv (make
examples, part of make test) and served by its entry point's name (JOBQUEUE_KINDS=ocr), as a
user's kind would be: `ocr` (tesseract through run_child) and `digits` (a scikit-learn model
trained at setup, predicting batches of jobs)."""

from __future__ import annotations

import ast
import concurrent.futures
import io
import os
import random
import struct
import zlib
from importlib.metadata import entry_points
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

import jobqueue_digits  # from this checkout: pyproject.toml's pythonpath
import jobqueue_ocr
from conftest import ROOT, eventually, run_server, wait_finished
from deployments import deploy
from jobqueue import BadInput, JobContext, UnsupportedInput

POINTS = {point.name: point.value for point in entry_points(group="jobqueue.kinds")}
if not {"ocr", "digits"} <= set(POINTS):  # a venv made without make
    raise ImportError("The example kinds are not installed in this venv: run make examples "
                      "(or pip install --no-deps -e examples/ocr -e examples/digits)")


def test_the_examples_are_installed_and_imported_from_this_checkout():
    assert (POINTS["ocr"], POINTS["digits"]) == ("jobqueue_ocr:KIND", "jobqueue_digits:KIND")
    for module, folder in ((jobqueue_ocr, "ocr"), (jobqueue_digits, "digits")):
        assert Path(module.__file__).resolve().is_relative_to(ROOT / "examples" / folder), \
            f"{module.__name__} is imported from {module.__file__}, not from this checkout"


def test_the_examples_import_only_the_public_api():
    """`from jobqueue import ...` and nothing deeper, as a user's kind in a package of its own."""
    for package in ("ocr/jobqueue_ocr", "digits/jobqueue_digits"):
        for path in (ROOT / "examples" / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    assert not (node.module or "").startswith("jobqueue."), \
                        f"{path} imports {node.module}"
                elif isinstance(node, ast.Import):
                    assert not any(alias.name.startswith("jobqueue.") for alias in node.names), \
                        path


# --- ocr -------------------------------------------------------------------------------------

def text_image(lines: list[str], font_size: int = 56, kind: str = "PNG") -> bytes:
    """Black text on white, 640 pixels wide, in Pillow's own font (the same on every machine)."""
    font = ImageFont.load_default(size=font_size)
    step = int(font_size * 1.5)
    image = Image.new("L", (640, 64 + step * len(lines)), 255)
    draw = ImageDraw.Draw(image)
    for number, line in enumerate(lines):
        draw.text((32, 32 + step * number), line, font=font, fill=0)
    out = io.BytesIO()
    image.convert("RGB" if kind == "JPEG" else "L").save(out, kind)
    return out.getvalue()


def page_of_words(width: int = 3000, height: int = 4000) -> bytes:
    """A page full of small words: tesseract reads it for about 10 s on one core."""
    font = ImageFont.load_default(size=28)
    image = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(image)
    words = "the quick brown fox jumps over a lazy dog 42 HELLO queue worker".split()
    pick = random.Random(1)
    for y in range(20, height - 40, 40):
        draw.text((20, y), " ".join(pick.choice(words) for _ in range(30)), font=font, fill=0)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature, a valid IHDR chunk and the start of its pixels: a size that can only
    be read from the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(bytes(1000))))


def corrupt_png() -> bytes:
    """A PNG whose header is right and whose pixel data is garbage."""
    data = text_image(["HELLO 42"])
    start = data.index(b"IDAT") + 4
    return data[:start] + bytes(64) + data[start + 64:]


def ocr(client: httpx.Client, content: bytes, name: str = "scan.png",
        **options: str) -> httpx.Response:
    return client.post("/put", data={"jobType": "ocr", **options},
                       files={"file": (name, content, "application/octet-stream")})


@pytest.fixture(scope="module")
def ocr_server(tmp_path_factory):
    with run_server(tmp_path_factory.mktemp("ocr"), kinds="message,ocr") as server:
        yield server


def test_put_reads_the_words_of_a_png_and_of_a_jpeg(ocr_server):
    with ocr_server.client() as client:
        assert list(client.get("/").json()["jobTypes"]) == ["message", "ocr"]
        for kind in ("PNG", "JPEG"):
            answer = ocr(client, text_image(["HELLO 42", "queue worker"], kind=kind))
            assert answer.status_code == 200, answer.text
            result = answer.json()["data"]["result"]
            data = result["data"]
            assert data["text"].split() == ["HELLO", "42", "queue", "worker"], data
            assert [line["text"] for line in data["lines"]] == ["HELLO 42", "queue worker"]
            assert all(0 < line["confidence"] <= 100 for line in data["lines"])
            assert (data["lang"], data["psm"], data["width"], data["height"]) == \
                ("eng", 3, 640, 232)
            text_url = next(url for url in result["files"] if url.endswith("/text.txt"))
            assert client.get(text_url).text.split() == data["text"].split()


def test_without_an_upload_the_bundled_sample_is_read(ocr_server):
    with ocr_server.client() as client:
        answer = client.post("/put", json={"jobType": "ocr", "psm": 6})
        assert answer.status_code == 200, answer.text
        assert answer.json()["data"]["result"]["data"]["text"].split()[:2] == ["HELLO", "42"]


@pytest.mark.parametrize("content", [b"%PDF-1.4 not an image", b"GIF89a\x01\x00\x01\x00", b""],
                         ids=["pdf", "gif", "empty"])
def test_a_file_that_is_no_png_or_jpeg_is_415_before_it_is_queued_or_run(ocr_server, content):
    with ocr_server.client() as client:
        answer = ocr(client, content)
        assert answer.status_code == 415, answer.text
        assert "not a PNG or JPEG" in answer.json()["detail"]
        queued = client.post("/jobs", data={"jobType": "ocr"},
                             files={"file": ("x.png", content, "image/png")})
        assert queued.status_code == 415, queued.text


@pytest.mark.parametrize("width, height, says", [
    (8000, 8000, "8000x8000 = 64000000"),
    (100000, 100000, "far more than"),  # past what Pillow opens at all
])
def test_an_image_too_large_by_its_header_is_413(ocr_server, width, height, says):
    with ocr_server.client() as client:
        for answer in (ocr(client, png_header(width, height)),
                       client.post("/jobs", data={"jobType": "ocr"},
                                   files={"file": ("big.png", png_header(width, height))})):
            assert answer.status_code == 413, answer.text
            assert says in answer.json()["detail"] and "OCR_MAX_PIXELS" in answer.json()["detail"]


@pytest.mark.parametrize("options", [{"lang": "../../etc/passwd"}, {"lang": "eng --psm 0"},
                                     {"psm": "2"}, {"psm": "14"}])
def test_options_are_checked(ocr_server, options):
    with ocr_server.client() as client:
        assert ocr(client, text_image(["HELLO"]), **options).status_code == 422


def test_a_failing_tesseract_fails_the_job_with_its_stderr(ocr_server):
    with ocr_server.client() as client:
        answer = ocr(client, corrupt_png())
        assert answer.status_code == 422, answer.text
        detail = answer.json()["detail"]
        assert detail.startswith("tesseract exited with code 1: ") and "pixRead" in detail
        # POST /jobs queues it (its header is a PNG's); the job's error is the same.
        job = client.post("/jobs", data={"jobType": "ocr"},
                          files={"file": ("bad.png", corrupt_png())}).json()
        job = wait_finished(client, job["id"])
        assert job["status"] == "failed" and "pixRead" in job["error"], job
        missing = ocr(client, text_image(["HELLO"]), lang="xyz")
        assert missing.status_code == 422
        assert "Failed loading language 'xyz'" in missing.json()["detail"]


def test_a_cancel_kills_tesseract(ocr_server):
    with ocr_server.client() as client:
        job = client.post("/jobs", data={"jobType": "ocr"},
                          files={"file": ("page.png", page_of_words())}).json()
        eventually(lambda: ocr_server.children("tesseract"), 30)
        assert client.get(f"/jobs/{job['id']}").json()["status"] == "running"
        assert client.delete(f"/jobs/{job['id']}").json()["status"] == "cancelled"
        eventually(lambda: not ocr_server.children("tesseract"), 5)
        assert wait_finished(client, job["id"], 5)["status"] == "cancelled"
        assert not (ocr_server.out_dir / job["id"]).exists()


def test_tesseract_runs_under_the_memory_cap(tmp_path, monkeypatch):
    monkeypatch.setenv("OCR_MAX_MB", "100")  # read by the kind when the server imports it
    with run_server(tmp_path, kinds="ocr") as server, server.client() as client:
        answer = ocr(client, page_of_words())
        assert answer.status_code == 413, answer.text
        detail = answer.json()["detail"]
        assert "under its cap of 100 MB (OCR_MAX_MB)" in detail, detail
        assert "not a jobqueue setting" not in server.log()  # OCR_MAX_MB is no JOBQUEUE_*


def test_a_distributed_worker_serves_the_kind_by_its_entry_point(tmp_path, postgres):
    with deploy("postgres", tmp_path, postgres, kinds="ocr") as cluster, \
            cluster.client() as client:
        answer = ocr(client, text_image(["HELLO 42"]))
        assert answer.status_code == 200, answer.text
        assert answer.json()["data"]["result"]["data"]["text"] == "HELLO 42"
        assert ocr(client, b"not an image").status_code == 415


# --- digits ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset():
    from sklearn.datasets import load_digits

    return load_digits()


def digit_png(pixels: np.ndarray, dark_on_light: bool = True, scale: int = 8) -> bytes:
    """One of load_digits' 8x8 images (0-16, ink bright) as a PNG `scale` times its size."""
    grey = np.round(pixels * 255 / 16)
    if dark_on_light:
        grey = 255 - grey
    image = Image.fromarray(grey.astype(np.uint8)).resize((8 * scale, 8 * scale),
                                                          Image.Resampling.NEAREST)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def ten_digits(dataset) -> list[tuple[int, bytes]]:
    """The last image of each digit in the data set, as PNGs (every other one light on dark)."""
    picks = [int(np.flatnonzero(dataset.target == digit)[-1]) for digit in range(10)]
    return [(int(dataset.target[index]), digit_png(dataset.images[index], index % 2 == 0))
            for index in picks]


def contexts(tmp_path: Path, files: list[bytes], resource) -> list[JobContext]:
    jobs = []
    for number, content in enumerate(files):
        path = tmp_path / f"upload-{number}"
        path.write_bytes(content)
        jobs.append(JobContext(f"job-{number}", jobqueue_digits.DigitsOptions(), path, tmp_path,
                               None, resource=resource))
    return jobs


def test_an_image_becomes_the_features_the_data_set_has(tmp_path, dataset):
    for index in (0, 7, 1000):
        for dark_on_light in (True, False):
            path = tmp_path / "digit.png"
            path.write_bytes(digit_png(dataset.images[index], dark_on_light, scale=5))
            assert np.allclose(jobqueue_digits.features(path), dataset.data[index], atol=0.05)


def test_the_model_trained_at_setup_reads_digits_in_one_batch(tmp_path, dataset):
    model = jobqueue_digits.train(None)
    assert model.pid == os.getpid() and 0 < model.seconds
    digits = ten_digits(dataset)
    files = [content for _, content in digits] + [corrupt_png(), b"no image at all"]
    results = jobqueue_digits.recognize(contexts(tmp_path, files, model))
    assert len(results) == 12
    *outputs, broken, wrong_type = results
    right = sum(output.data["digit"] == digit for output, (digit, _) in zip(outputs, digits,
                                                                              strict=True))
    assert right >= 9, [output.data for output in outputs]
    assert all(output.data["batchSize"] == 12 and output.data["setupPid"] == os.getpid()
               and 0 < output.data["probability"] <= 1 for output in outputs)
    # An unreadable image fails only its own job.
    assert isinstance(broken, BadInput) and "cannot be read" in str(broken)
    assert isinstance(wrong_type, UnsupportedInput)
    # Without batching (DIGITS_BATCH_SIZE=1): the same code, one job a call.
    one, bad = contexts(tmp_path, [digits[3][1], b"no image"], model)
    assert jobqueue_digits.recognize_one(one).data["digit"] == 3
    with pytest.raises(UnsupportedInput):
        jobqueue_digits.recognize_one(bad)


def test_the_kind_declares_setup_and_batch():
    kind = jobqueue_digits.KIND
    assert kind.setup is jobqueue_digits.train and kind.workers == 1
    assert (kind.batch.max_size, kind.batch.max_wait) == (32, 0.01)
    assert kind.handler is jobqueue_digits.recognize


def right_answers(answers: list[httpx.Response], digits: list[tuple[int, bytes]]) -> list[dict]:
    """The answers' data, each a 200 (at least 90% of them with the right digit)."""
    assert all(answer.status_code == 200 for answer in answers), \
        [answer.text for answer in answers if answer.status_code != 200][:3]
    results = [answer.json()["data"]["result"]["data"] for answer in answers]
    right = sum(result["digit"] == digit for result, (digit, _) in zip(results, digits,
                                                                          strict=True))
    assert right >= 0.9 * len(digits), results
    return results


def test_without_batching_the_model_is_set_up_once_in_the_server(tmp_path, monkeypatch, dataset):
    monkeypatch.setenv("DIGITS_BATCH_SIZE", "1")  # read by the kind when the server imports it
    with run_server(tmp_path, kinds="digits") as server:
        digits = ten_digits(dataset) * 3
        results = right_answers(put_digits(server, [content for _, content in digits], 4),
                                digits)
        assert {(r["setupPid"], r["setupCount"], r["batchSize"]) for r in results} == \
            {(server.process.pid, 1, 1)}
        assert "not a jobqueue setting" not in server.log()


def test_a_distributed_worker_sets_the_model_up_once(tmp_path, postgres, monkeypatch, dataset):
    monkeypatch.setenv("DIGITS_BATCH_SIZE", "1")
    with deploy("postgres", tmp_path, postgres, kinds="digits") as cluster:
        digits = ten_digits(dataset)
        results = right_answers(put_digits(cluster.server, [content for _, content in digits],
                                           4), digits)
        # In the worker process, not in the API replica that answered.
        assert {(r["setupPid"], r["setupCount"]) for r in results} == \
            {(cluster.workers[0].pid, 1)}




@pytest.fixture(scope="module")
def digits_server(tmp_path_factory):
    with run_server(tmp_path_factory.mktemp("digits"), kinds="message,digits") as server:
        yield server


def put_digits(server, files: list[bytes], threads: int = 16) -> list[httpx.Response]:
    """Each file through /put, `threads` at a time."""
    def put(content: bytes) -> httpx.Response:
        with server.client() as client:
            return client.post("/put", data={"jobType": "digits"},
                               files={"file": ("digit.png", content, "image/png")})

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(put, files))


def test_setup_runs_once_and_batches_form_under_16_concurrent_puts(digits_server, dataset):
    digits = ten_digits(dataset) * 12
    results = right_answers(put_digits(digits_server, [content for _, content in digits]),
                            digits)
    # One setup, in the server's process, for every job.
    assert {(result["setupPid"], result["setupCount"]) for result in results} == \
        {(digits_server.process.pid, 1)}
    assert max(result["batchSize"] for result in results) > 1, "no batch formed"


def test_an_unreadable_image_fails_only_its_own_job(digits_server, dataset):
    broken = corrupt_png()
    files = [content for _, good in ten_digits(dataset) for content in (good, broken)] * 4
    answers = put_digits(digits_server, files)
    for answer, content in zip(answers, files, strict=True):
        if content == broken:
            assert answer.status_code == 422, answer.text
            assert "cannot be read" in answer.json()["detail"]
        else:
            assert answer.status_code == 200, answer.text
