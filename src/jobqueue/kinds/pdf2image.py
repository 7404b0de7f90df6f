"""`pdf2image`: a PDF becomes one PNG per page (`page-001.png`, ...).

pdf2image reads the page count (pdfinfo). Pages are rendered by poppler's pdftoppm (the default),
with the command pdf2image's convert_from_path builds, but started through `processes.run` so
that a cancel kills it and a failure reports its stderr (convert_from_path keeps both to itself).
Or by PDFium through pypdfium2 (JOBQUEUE_PDF_ENGINE=pdfium: about three times faster on scanned
pages, see bench/).
"""

from __future__ import annotations

import threading
from pathlib import Path

from pdf2image import pdfinfo_from_path
from pdf2image.exceptions import PDFPageCountError, PDFPopplerTimeoutError
from pydantic import BaseModel, ConfigDict, Field

from .. import processes
from ..jobs import BadInput, Job, JobKind, Output, TooLarge, UnsupportedInput
from ..settings import DATA_DIR, Settings

PDFINFO_TIMEOUT_SECONDS = 30


class PdfOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    dpi: int = Field(200, ge=10, le=600, description="Resolution of the PNG pages.")


def page_count(path: Path) -> int:
    try:
        info = pdfinfo_from_path(str(path), timeout=PDFINFO_TIMEOUT_SECONDS)
    except PDFPageCountError as error:
        reason = str(error).strip().splitlines()[-1]
        raise BadInput(f"The file is not a PDF that poppler can read ({reason}). "
                       "Send an unencrypted PDF document.") from None
    except PDFPopplerTimeoutError:
        raise BadInput(f"poppler could not read the PDF's page count within "
                       f"{PDFINFO_TIMEOUT_SECONDS} s; the file may be damaged.") from None
    return info["Pages"]


def check_page_count(pages: int, settings: Settings) -> None:
    if pages > settings.pdf_max_pages:
        raise TooLarge(f"The PDF has {pages} pages; this server takes at most "
                       f"{settings.pdf_max_pages} (JOBQUEUE_PDF_MAX_PAGES). Split it and send "
                       "the parts.")


def check_pdf(path: Path, settings: Settings) -> None:
    with path.open("rb") as file:
        if file.read(5) != b"%PDF-":
            raise UnsupportedInput("The upload is not a PDF (it does not start with %PDF-). "
                                   "Send a PDF document.")
    try:
        pages = page_count(path)
    except BadInput as error:
        raise UnsupportedInput(str(error)) from None
    check_page_count(pages, settings)


def render_with_poppler(job: Job, page: int, path: Path) -> None:
    """pdftoppm writes the PNG itself: no round trip of the pixels through Python."""
    processes.run(job, [
        "pdftoppm", "-r", str(job.options.dpi), "-f", str(page), "-l", str(page), "-png",
        "-singlefile", str(job.input_path), str(path.with_suffix("")),
    ])


# PDFium may not be called from two threads at once; the PNG encoding needs no lock.
_pdfium_lock = threading.Lock()


def render_with_pdfium(job: Job, page: int, path: Path) -> None:
    import pypdfium2

    with _pdfium_lock:
        document = pypdfium2.PdfDocument(str(job.input_path))
        try:
            bitmap = document[page - 1].render(scale=job.options.dpi / 72)
            try:
                image = bitmap.to_pil().copy()  # own the pixels before PDFium frees its bitmap
            finally:
                bitmap.close()  # here, under the lock, not later in a finalizer on any thread
        except pypdfium2.PdfiumError as error:
            raise BadInput(f"Page {page} could not be rendered ({error}); the PDF may be "
                           "damaged.") from None
        finally:
            document.close()
    image.save(path, "PNG", compress_level=job.settings.png_compression)


ENGINES = {"poppler": render_with_poppler, "pdfium": render_with_pdfium}


def convert_pdf(job: Job) -> Output:
    options: PdfOptions = job.options
    settings = job.settings or Settings()
    render = ENGINES[settings.pdf_engine]
    pages = page_count(job.input_path)
    check_page_count(pages, settings)  # also for /put, which skips check_pdf
    digits = max(3, len(str(pages)))
    files = []
    # One page at a time, so a cancel is noticed within a page's time.
    for page in range(1, pages + 1):
        job.raise_if_cancelled()
        job.set_progress(page - 1, pages, "pages")
        path = job.out_dir / f"page-{page:0{digits}d}.png"
        try:
            render(job, page, path)
        except processes.ProcessFailed as error:
            damaged = " The PDF may be damaged." if error.returncode > 0 else ""
            raise BadInput(f"Page {page} of {pages} could not be rendered: {error}{damaged}"
                           ) from None
        if not path.is_file():
            raise BadInput(f"Page {page} of {pages} could not be rendered; the PDF may be damaged.")
        files.append(path)
    job.set_progress(pages, pages, "pages")
    return Output(data={"pages": pages, "dpi": options.dpi}, files=files)


KIND = JobKind(
    name="pdf2image",
    description="Renders each page of a PDF to a PNG at `dpi`.",
    options=PdfOptions,
    handler=convert_pdf,
    sample=DATA_DIR / "sample.pdf",
    accept="application/pdf,.pdf",
    check_input=check_pdf,
)
