"""pdf: 4 concurrent /put pdf2image uploads of one PDF at 200 dpi, against what a user would
write instead, in the same run:

- the naive peer: pdf2image.convert_from_path(dpi=200, thread_count=4), then Pillow's
  page.save(png) for each page, the 4 documents on two worker threads;
- render only: pdftoppm -r 200 writing PPM (no PNG encoding at all), two at a time;
- the render program alone: src/jobqueue/kinds/pdfrender.py, the child the server runs, on each
  whole document, two at a time (the server's own overhead is the server's wall against this);
- the server with each engine and PNG level.

Runs are interleaved (one of each, then the next round), so a slow spell hits all of them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

import httpx

from common import ROOT, SHARED, server, spread, table, timed

CONCURRENT = 4
DPI = 200
RENDER_PROGRAM = ROOT / "src" / "jobqueue" / "kinds" / "pdfrender.py"
# The server configurations measured; the first is the default.
SERVERS = {
    "jobqueue /put, pdfium, PNG level 3 (default)": {},
    "jobqueue /put, pdfium, PNG level 1": {"png_compression": 1},
    "jobqueue /put, pdfium, PNG level 6": {"png_compression": 6},
    "jobqueue /put, pdfium, smoothed images, level 3": {"pdf_smooth_images": "true"},
    "jobqueue /put, pdfium, smoothed images, level 6": {"pdf_smooth_images": "true",
                                                        "png_compression": 6},
    "jobqueue /put, poppler (pdftoppm -png)": {"pdf_engine": "poppler"},
}
DEFAULT = next(iter(SERVERS))


def two_at_a_time(work, pdf: Path, folder: Path) -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda n: work(pdf, folder / str(n)), range(CONCURRENT)))


def naive_peer(pdf: Path, folder: Path) -> None:
    from pdf2image import convert_from_path

    folder.mkdir()
    for number, page in enumerate(convert_from_path(pdf, dpi=DPI, thread_count=4), 1):
        page.save(folder / f"page-{number:03d}.png")


def render_only(pdf: Path, folder: Path) -> None:
    folder.mkdir()
    subprocess.run(["pdftoppm", "-r", str(DPI), str(pdf), str(folder / "page")], check=True)


def render_program(pdf: Path, folder: Path) -> None:
    folder.mkdir()
    pages = ",".join(str(page) for page in range(1, page_count(pdf) + 1))
    subprocess.run([sys.executable, "-I", str(RENDER_PROGRAM), str(pdf), str(folder),
                    "--pages", pages, "--dpi", str(DPI)], check=True, stdout=subprocess.DEVNULL)


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
    return int(next(line.split()[1] for line in info.stdout.splitlines()
                    if line.startswith("Pages:")))


def megabytes(folder: Path, pattern: str) -> float:
    return sum(path.stat().st_size for path in folder.rglob(pattern)) / 1e6


def run(runs: int, pdf: Path = SHARED / "regal-17pages.pdf", every_setting: bool = True) -> dict:
    """`every_setting=False`: the default server and poppler's only (the smoke run)."""
    pages = page_count(pdf) * CONCURRENT
    walls: dict[str, list[float]] = {}
    sizes: dict[str, float] = {}
    local = {"naive peer: convert_from_path + page.save, 2 threads": (naive_peer, "*.png"),
             "render only: pdftoppm -r 200 (PPM), 2 at a time": (render_only, "*.ppm"),
             "render program alone (pdfium, level 3), 2 at a time": (render_program, "*.png")}
    peer, pdftoppm, alone = local
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(server(pdf2image_timeout=3600, **settings))
                   for name, settings in SERVERS.items()
                   if every_setting or name == DEFAULT or "poppler" in name}
        for _ in range(runs):
            for name, (work, pattern) in local.items():
                with tempfile.TemporaryDirectory() as folder:
                    walls.setdefault(name, []).append(timed(two_at_a_time, work, pdf,
                                                            Path(folder)))
                    sizes[name] = megabytes(Path(folder), pattern)
            for name, srv in servers.items():
                walls.setdefault(name, []).append(timed(through_server, srv.url, pdf))
        for name, srv in servers.items():
            sizes[name] = megabytes(srv.out_dir, "page-*.png") / runs
    wall = {name: median(samples) for name, samples in walls.items()}
    rows = [[name, spread(walls[name]), f"{pages / wall[name]:.2f}",
             f"{sizes[name] / pages:.3f}", f"{wall[name] / wall[peer]:.2f}"]
            for name in walls]
    ratios = {
        "default / naive peer": (wall[DEFAULT] / wall[peer], 0.5),
        "default / render only": (wall[DEFAULT] / wall[pdftoppm], 0.75),
        "default / render program alone (server overhead)": (wall[DEFAULT] / wall[alone], 1.1),
        "default / naive peer, PNG bytes": (sizes[DEFAULT] / sizes[peer], 1.15),
    }
    text = table(
        [f"pdf: {CONCURRENT} × {pdf.name} at {DPI} dpi", "wall s, median (min–max)", "pages/s",
         "MB per page", "wall / peer"], rows)
    text += "\n\n" + table(["pdf ratio", "value", "target"],
                           [[name, f"**{value:.2f}**", f"≤ {target}"]
                            for name, (value, target) in ratios.items()])
    return {"name": "pdf", "text": text, "ratios": {k: v for k, (v, _) in ratios.items()},
            "chart": ("pdf wall s", {"jobqueue": wall[DEFAULT], "naive peer": wall[peer],
                                     "pdftoppm render only": wall[pdftoppm],
                                     "render program alone": wall[alone]})}


if __name__ == "__main__":
    print(run(int(sys.argv[1]) if len(sys.argv) > 1 else 3)["text"])
