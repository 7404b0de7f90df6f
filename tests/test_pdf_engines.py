"""Both PDF engines render the same pages: the faster default (pdfium) never means wrong pages.

Each test PDF goes through a server running pdfium and one running poppler; every page must
come out at the same size, and the pages, in greyscale and scaled down 8 times (so the
engines' own anti-aliasing and font hinting wash out), must differ by less than
MAX_MEAN_DIFFERENCE grey levels of 255 on average.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageStat

import pdfs
from conftest import DATA, run_server
from media import png_size

DPI = 150
# Measured: at most 3.3 (the colour photo scan), 2.7 for text, 2.4 for the 1-bit scan, 1.0
# for the charts; two different pages differ by 30 and more.
MAX_MEAN_DIFFERENCE = 6.0
SHRINK = 8

DOCUMENTS = {
    "text.pdf": pdfs.text_pdf,
    "charts.pdf": pdfs.vector_pdf,
    "photo-scan.pdf": pdfs.photo_scan_pdf,
    "bw-scan.pdf": pdfs.fax_scan_pdf,
}


def greyscale_thumbnail(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png)).convert("L")
    return image.resize((image.width // SHRINK, image.height // SHRINK), Image.Resampling.BOX)


def mean_difference(one: Image.Image, other: Image.Image) -> float:
    return ImageStat.Stat(ImageChops.difference(one, other.resize(one.size))).mean[0]


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pdfs")
    made = {name: make(folder / name) for name, make in DOCUMENTS.items()}
    return {**made, "sample.pdf": DATA / "sample.pdf"}


def render_all(tmp_path: Path, engine: str, documents: dict[str, Path]) -> dict[str, list[bytes]]:
    """Every page of every document as the server with `engine` renders it at DPI."""
    pages = {}
    with run_server(tmp_path / engine, pdf_engine=engine) as server, server.client() as client:
        for name, path in documents.items():
            with path.open("rb") as pdf:
                response = client.post("/put", data={"jobType": "pdf2image", "dpi": str(DPI)},
                                       files={"file": (name, pdf)})
            assert response.status_code == 200, response.text
            pages[name] = [client.get(url).content
                           for url in response.json()["data"]["result"]["files"]]
    return pages


def test_pdfium_and_poppler_render_the_same_pages(tmp_path, documents):
    pdfium = render_all(tmp_path, "pdfium", documents)
    poppler = render_all(tmp_path, "poppler", documents)
    differences = {}
    for name in documents:
        assert len(pdfium[name]) == len(poppler[name]) >= 1, name
        for number, (ours, theirs) in enumerate(zip(pdfium[name], poppler[name]), 1):
            (width, height), (their_width, their_height) = png_size(ours), png_size(theirs)
            assert abs(width - their_width) <= 1 and abs(height - their_height) <= 1, name
            differences[f"{name} page {number}"] = mean_difference(
                greyscale_thumbnail(ours), greyscale_thumbnail(theirs))
    assert max(differences.values()) < MAX_MEAN_DIFFERENCE, differences
    # The measure tells pages apart: the text page against the charts is far over the limit.
    unlike = mean_difference(greyscale_thumbnail(pdfium["text.pdf"][0]),
                             greyscale_thumbnail(poppler["charts.pdf"][0]))
    assert unlike > 3 * MAX_MEAN_DIFFERENCE, unlike
