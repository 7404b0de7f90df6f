"""`pdf2image`: a PDF becomes one PNG per page (`page-001.png`, ...).

Rendered by poppler's pdftoppm through pdf2image (the default), or by PDFium through pypdfium2
(JOBQUEUE_PDF_ENGINE=pdfium: about three times faster on scanned pages, see bench/).
"""

from __future__ import annotations

import threading
from pathlib import Path

from pdf2image import convert_from_path, pdfinfo_from_path
from pdf2image.exceptions import PDFPageCountError, PDFPopplerTimeoutError
from pydantic import BaseModel, ConfigDict, Field

from ..jobs import BadInput, Job, JobKind, Output, UnsupportedInput
from ..settings import DATA_DIR

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


def check_pdf(path: Path) -> None:
    with path.open("rb") as file:
        if file.read(5) != b"%PDF-":
            raise UnsupportedInput("The upload is not a PDF (it does not start with %PDF-). "
                                   "Send a PDF document.")
    try:
        page_count(path)
    except BadInput as error:
        raise UnsupportedInput(str(error)) from None


def render_with_poppler(job: Job, page: int, path: Path) -> None:
    """pdftoppm writes the PNG itself: no round trip of the pixels through Python."""
    convert_from_path(
        str(job.input_path), dpi=job.options.dpi, first_page=page, last_page=page,
        output_folder=str(path.parent), output_file=path.stem, single_file=True,
        fmt="png", paths_only=True,
    )


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
    render = ENGINES[job.settings.pdf_engine if job.settings else "poppler"]
    pages = page_count(job.input_path)
    digits = max(3, len(str(pages)))
    files = []
    # One page at a time, so a cancel is noticed within a page's time.
    for page in range(1, pages + 1):
        job.raise_if_cancelled()
        job.set_progress(page - 1, pages, "pages")
        path = job.out_dir / f"page-{page:0{digits}d}.png"
        render(job, page, path)
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
