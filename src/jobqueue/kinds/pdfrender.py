"""The PDF render program: opens a PDF once, renders the pages it is given with PDFium
(pypdfium2) and writes each one as a PNG (libpng through imagecodecs).

The pdf2image kind runs it as a child process, one or more per job, under a memory cap
(JOBQUEUE_RENDER_MAX_MB), so a malformed or oversized page can take down only this process,
never the server. It imports nothing of the server, so it starts in about 0.15 s.

PNGs are written with libpng's "Up" filter on every row rather than the adaptive choice per
row that Pillow always makes: on scanned, text and chart pages that is 2-3 times faster to
encode at the same zlib level, for files 3-6% larger (docs/performance.md).

    python -I kinds/pdfrender.py INPUT OUT_DIR --pages 1,2,3 [--rotations 0,90,0] [--dpi 200]
        [--digits 3] [--max-pixels N] [--png-level 3] [--smooth-images]

It writes OUT_DIR/page-001.png ..., each page no other child of the same job has taken (see
render()), and one JSON object a line on stdout: {"start": N} when it takes page N, {"page": N}
once that is written. When it refuses (exit code 2), its last line says why:
{"error": "too_large" | "unreadable" | "out_of_memory" | "wrong_size", "page": N, "detail": ...}
Any other end (a crash, a kill) comes without such a line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

REFUSED = 2


class Refused(Exception):
    def __init__(self, reason: str, page: int, detail: str = ""):
        super().__init__(detail)
        self.reason, self.page, self.detail = reason, page, detail


def emit(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def pixel_size(width_pt: float, height_pt: float, dpi: float) -> tuple[int, int]:
    """The size of a page's bitmap at `dpi`. Renderers round differently by a pixel (216 pt
    at 600 dpi: pdftoppm 1800, pypdfium2 1801), so compare with `same_size`."""
    return math.ceil(width_pt * dpi / 72), math.ceil(height_pt * dpi / 72)


def same_size(found: tuple[int, int], expected: tuple[int, int]) -> bool:
    """Equal but for the renderers' rounding."""
    return abs(found[0] - expected[0]) <= 1 and abs(found[1] - expected[1]) <= 1


def render(args: argparse.Namespace) -> None:
    # numpy's OpenBLAS would map a buffer for each core: address space the cap counts.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import imagecodecs
    import pypdfium2

    try:
        document = pypdfium2.PdfDocument(args.input)
    except pypdfium2.PdfiumError as error:
        raise Refused("unreadable", 0, str(error)) from None
    count = len(document)
    # Every page of ours is checked before the first is rendered, so a job over the limit
    # fails before it has spent any time.
    sizes = {}
    for page in args.pages:
        if not 1 <= page <= count:
            raise Refused("unreadable", page, f"the document has {count} pages")
        width, height = pixel_size(*document.get_page_size(page - 1), args.dpi)
        if width * height > args.max_pixels:
            raise Refused("too_large", page, f"{width}x{height}")
        sizes[page] = width, height
    rotations = dict(zip(args.pages, args.rotations or [], strict=False))
    for page in args.pages:
        path = Path(args.out_dir) / f"page-{page:0{args.digits}d}.png"
        try:
            # Creating the page's file is how a child takes the page: children of one job
            # share its pages this way, so one started later takes its share of the rest.
            file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        with open(file, "wb") as png_file:
            emit(start=page)
            try:
                png = render_page(document, page, args, sizes[page], rotations.get(page),
                                  imagecodecs)
            except MemoryError:
                # main() reports it once it has let go of this exception and the pixels.
                raise Refused("out_of_memory", page) from None
            except pypdfium2.PdfiumError as error:
                # PDFium fails to make a bitmap it cannot allocate; anything else is the page.
                reason = "out_of_memory" if "bitmap" in str(error).lower() else "unreadable"
                raise Refused(reason, page, str(error)) from None
            png_file.write(png)
            del png
        emit(page=page)


def render_page(document, page: int, args: argparse.Namespace, expected: tuple[int, int],
                rotation: int | None, imagecodecs) -> bytes:
    """The page as PNG bytes, turned by `rotation` when given (the turn the server measured
    the page with) rather than by PDFium's reading of /Rotate. Its pixels are held once (3
    bytes each, as PDFium drew them)."""
    pdf_page = document[page - 1]
    try:
        own = pdf_page.get_rotation()
        # PDFium reads /Rotate 90.0 (a real, where the PDF reference asks for an integer) as
        # 90, poppler as no /Rotate: the page must come out as poppler measured it.
        if rotation is not None and rotation != own:
            pdf_page.set_rotation(rotation)
            if (rotation - own) % 180:
                expected = expected[1], expected[0]
        bitmap = pdf_page.render(scale=args.dpi / 72, rev_byteorder=True,
                                 no_smoothimage=not args.smooth_images)
        try:
            if not same_size((bitmap.width, bitmap.height), expected):
                raise Refused("wrong_size", page, f"{bitmap.width}x{bitmap.height} instead "
                                                  f"of {expected[0]}x{expected[1]}")
            return imagecodecs.png_encode(bitmap.to_numpy(), level=args.png_level,
                                          filter=imagecodecs.PNG.FILTER.UP)
        finally:
            bitmap.close()
    finally:
        pdf_page.close()


def page_list(text: str) -> list[int]:
    return [int(page) for page in text.split(",")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input")
    parser.add_argument("out_dir")
    parser.add_argument("--pages", type=page_list, required=True, help="1-based, comma-separated")
    parser.add_argument("--rotations", type=page_list, default=None,
                        help="the turn of each page of --pages, by default PDFium's own")
    parser.add_argument("--dpi", type=float, default=200)
    parser.add_argument("--digits", type=int, default=3, help="of the page number in file names")
    parser.add_argument("--max-pixels", type=int, default=100_000_000)
    parser.add_argument("--png-level", type=int, default=3, choices=range(10))
    parser.add_argument("--smooth-images", action="store_true",
                        help="anti-alias images as they are scaled (larger PNGs, slower)")
    args = parser.parse_args()
    refusal = None
    try:
        render(args)
    except Refused as error:
        refusal = {"error": error.reason, "page": error.page, "detail": error.detail}
    if refusal is None:
        return 0
    emit(**refusal)
    return REFUSED


if __name__ == "__main__":
    sys.exit(main())
