"""`pdf2image`: a PDF becomes one PNG per page (`page-001.png`, ...) through pdf2image and poppler."""

from __future__ import annotations

from pdf2image import convert_from_path, pdfinfo_from_path
from pdf2image.exceptions import PDFPageCountError, PDFPopplerTimeoutError
from pydantic import BaseModel, ConfigDict, Field

from pathlib import Path

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


def convert_pdf(job: Job) -> Output:
    options: PdfOptions = job.options
    pages = page_count(job.input_path)
    digits = max(3, len(str(pages)))
    files = []
    # One page per pdftoppm run, so a cancel is noticed within a page's time.
    for page in range(1, pages + 1):
        job.raise_if_cancelled()
        job.set_progress(page - 1, pages, "pages")
        name = f"page-{page:0{digits}d}"
        convert_from_path(
            str(job.input_path), dpi=options.dpi, first_page=page, last_page=page,
            output_folder=str(job.out_dir), output_file=name, single_file=True,
            fmt="png", paths_only=True,
        )
        path = job.out_dir / f"{name}.png"
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
    check_input=check_pdf,
)
