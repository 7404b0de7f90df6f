"""pdf: 4 concurrent /put pdf2image uploads against pdftoppm alone, 4 runs two at a time."""

from __future__ import annotations

import concurrent.futures
import subprocess
import tempfile
from pathlib import Path

import httpx

from statistics import median

from common import SHARED, server, spread, table, timed

CONCURRENT = 4
DPI = 200


def engine_alone(pdf: Path) -> None:
    """pdftoppm on the same file CONCURRENT times, two at a time (one per core)."""
    with tempfile.TemporaryDirectory() as folder:
        def convert(n: int) -> None:
            subprocess.run(["pdftoppm", "-r", str(DPI), "-png", str(pdf), f"{folder}/run{n}"],
                           check=True)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(convert, range(CONCURRENT)))


def through_server(url: str, pdf: Path) -> None:
    def put(_: int) -> None:
        with open(pdf, "rb") as file:
            response = httpx.post(f"{url}/put", data={"jobType": "pdf2image", "dpi": str(DPI)},
                                  files={"file": (pdf.name, file)}, timeout=600)
        response.raise_for_status()
    with concurrent.futures.ThreadPoolExecutor(CONCURRENT) as pool:
        list(pool.map(put, range(CONCURRENT)))


def page_count(pdf: Path) -> int:
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True)
    return int(next(l.split()[1] for l in info.stdout.splitlines() if l.startswith("Pages:")))


def output_megabytes(folder) -> float:
    return sum(p.stat().st_size for p in folder.rglob("page-*.png")) / 1e6


def run(runs: int, pdf: Path = SHARED / "regal-17pages.pdf") -> dict:
    pages = page_count(pdf) * CONCURRENT
    served, alone = [], []
    with server(pdf2image_timeout=3600) as srv:
        for _ in range(runs):  # interleaved, so a slow spell of the machine hits both
            served.append(timed(through_server, srv.url, pdf))
            alone.append(timed(engine_alone, pdf))
        poppler_mb = output_megabytes(srv.out_dir) / runs
    levels = {}
    for level in (1, 3, 6):
        with server(pdf2image_timeout=3600, pdf_engine="pdfium", png_compression=level) as srv:
            levels[level] = ([timed(through_server, srv.url, pdf) for _ in range(runs)],
                             output_megabytes(srv.out_dir) / runs)
    pdfium = levels[3][0]
    ratio = median(served) / median(alone)
    text = table(
        [f"pdf: {CONCURRENT} × {pdf.name} at {DPI} dpi", "wall s, median (min–max)", "pages/s",
         "MB of PNG"],
        [["jobqueue /put, poppler (default)", spread(served), f"{pages / median(served):.2f}",
          f"{poppler_mb:.1f}"],
         ["pdftoppm alone, 2 at a time", spread(alone), f"{pages / median(alone):.2f}", ""],
         ["**ratio server / engine** (target ≤ 1.35)", f"**{ratio:.2f}**", "", ""],
         *[[f"jobqueue /put, pdfium, PNG level {level}", spread(walls),
            f"{pages / median(walls):.2f}", f"{mb:.1f}"] for level, (walls, mb) in levels.items()],
         ["pdfium (level 3) / pdftoppm alone", f"{median(pdfium) / median(alone):.2f}", "", ""]])
    return {"name": "pdf", "text": text, "ratio": ratio,
            "chart": ("pdf wall s", median(served), median(alone))}


if __name__ == "__main__":
    print(run(3)["text"])
