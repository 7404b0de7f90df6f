"""JOBQUEUE_PDF_ENGINE=pdfium renders the same pages as poppler, at the same size."""

from __future__ import annotations

from conftest import DATA, run_server
from media import pdf_page_points, png_size


def test_pdfium_engine_gives_the_same_pages(tmp_path):
    pages, width_pt, height_pt = pdf_page_points(DATA / "sample.pdf")
    with run_server(tmp_path, pdf_engine="pdfium", png_compression=1) as server, \
            server.client() as client:
        with open(DATA / "sample.pdf", "rb") as pdf:
            response = client.post("/put", data={"jobType": "pdf2image", "dpi": "100"},
                                   files={"file": ("scan.pdf", pdf)})
        assert response.status_code == 200, response.text
        files = response.json()["data"]["result"]["files"]
        assert len(files) == pages
        for url in files:
            width, height = png_size(client.get(url).content)
            assert abs(width - width_pt / 72 * 100) <= 1 and abs(height - height_pt / 72 * 100) <= 1
        bad = client.post("/put", data={"jobType": "pdf2image"},
                          files={"file": ("x.pdf", b"not a pdf")})
        assert bad.status_code == 422
