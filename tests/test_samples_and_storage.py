"""The bundled samples, and the path rules that keep files inside out/<job-id>/."""

from __future__ import annotations

import uuid

from conftest import DATA
from jobqueue.files import jobfiles
from media import pdf_page_points, probe_streams


def test_samples_are_small_and_as_documented():
    for name in ("sample.pdf", "sample.mp4"):
        assert (DATA / name).stat().st_size < 1024 * 1024, name
    pages, _, _ = pdf_page_points(DATA / "sample.pdf")
    assert 3 <= pages <= 5
    streams = probe_streams(DATA / "sample.mp4")
    assert "audio" in streams
    assert 2 <= float(streams["video"]["duration"]) <= 10


def test_safe_name_keeps_a_plain_name_and_strips_everything_else():
    assert jobfiles.safe_name("scan 2024.pdf") == "scan_2024.pdf"
    assert jobfiles.safe_name("../../etc/passwd") == "passwd"
    assert jobfiles.safe_name("C:\\Users\\me\\clip.mp4") == "clip.mp4"
    assert jobfiles.safe_name("/abs/path/.hidden") == "hidden"
    assert jobfiles.safe_name("r\u00e9sum\u00e9\0.pdf") == "resume_.pdf"
    assert jobfiles.safe_name("..") == "upload"
    long = jobfiles.safe_name("a" * 500 + ".pdf")
    assert len(long) == jobfiles.MAX_NAME_LENGTH and long.endswith(".pdf")


def test_output_file_refuses_anything_but_a_plain_name_in_a_job_folder(tmp_path):
    job_id = str(uuid.uuid4())
    (tmp_path / job_id).mkdir()
    (tmp_path / job_id / "page-001.png").write_bytes(b"png")
    (tmp_path / "secret.txt").write_text("no")
    page = tmp_path / job_id / "page-001.png"
    assert jobfiles.output_file(tmp_path, job_id, "page-001.png") == page
    assert jobfiles.output_file(tmp_path, job_id, "../secret.txt") is None
    assert jobfiles.output_file(tmp_path, "..", "secret.txt") is None
    assert jobfiles.output_file(tmp_path, job_id.upper(), "page-001.png") is None
    assert jobfiles.output_file(tmp_path, job_id, "input") is None
