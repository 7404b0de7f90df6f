"""`ocr`: the text of an uploaded image (PNG or JPEG), read by tesseract.

A job kind packaged on its own, as a user's would be: it imports only jobqueue's public API,
and its `pyproject.toml` declares it as the entry point `ocr` of the group `jobqueue.kinds`,
so `JOBQUEUE_KINDS=message,ocr` serves it once the package is installed.

tesseract (Debian's `tesseract-ocr`) runs as a child process through `run_child`: a cancel
kills it, it dies with the server, and it may map at most `OCR_MAX_MB` of memory. Its
`txt` and `tsv` outputs, written into the job's folder, are the job's files; the answer
carries the text and the mean confidence of each line.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobqueue import (
    BadInput,
    JobContext,
    JobKind,
    Output,
    ProcessFailed,
    Settings,
    TooLarge,
    UnsupportedInput,
    run_child,
)

HERE = Path(__file__).resolve().parent


def _limit(name: str, default: int) -> int:
    """A positive whole number from the variable `name`, else `default`."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name}={text!r}: a whole number of at least 1")
    return int(text)


# This kind's own limits, read as the server imports it. Not JOBQUEUE_* variables: those are
# jobqueue's settings, and the server warns about any it does not know.
MAX_PIXELS = _limit("OCR_MAX_PIXELS", 50_000_000)
MEMORY_MB = _limit("OCR_MAX_MB", 1024)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
SEND_AN_IMAGE = "Send a PNG or JPEG image."
# One tesseract language (`eng`, `chi_sim`, `script/Latin`) or several joined by `+`: no
# path can be made of it, nor an option.
LANGUAGE = r"^(script/)?[A-Za-z][A-Za-z_]{1,39}(\+(script/)?[A-Za-z][A-Za-z_]{1,39}){0,7}$"
# What tesseract and leptonica print when an allocation fails (under the memory cap).
OUT_OF_MEMORY = ("malloc fail", "pix not made", "bad_alloc", "Cannot allocate memory",
                 "failed to map segment")
TEXT_NAME = "text"  # tesseract writes text.txt and text.tsv


class OcrOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lang: str = Field("eng", pattern=LANGUAGE,
                      description="Tesseract language(s), as its -l: eng, deu, eng+deu. Each "
                                  "must be installed (apt-get install tesseract-ocr-deu).")
    psm: int = Field(3, ge=1, le=13,
                     description="Tesseract page segmentation mode (--psm): 3 a page of any "
                                 "layout, 6 one block of text, 7 one line, 8 one word.")

    @field_validator("psm")
    @classmethod
    def implemented(cls, value: int) -> int:
        if value == 2:
            raise ValueError("mode 2 is not implemented by tesseract; use 1 or 3 to 13")
        return value


def image_size(path: Path) -> tuple[str, int, int]:
    """The format, width and height of a PNG or JPEG, read from its header (nothing is
    decoded): UnsupportedInput for any other file, TooLarge past OCR_MAX_PIXELS."""
    with open(path, "rb") as file:
        head = file.read(len(PNG_MAGIC))
    if head.startswith(PNG_MAGIC):
        kind = "PNG"
    elif head.startswith(JPEG_MAGIC):
        kind = "JPEG"
    else:
        raise UnsupportedInput("The file is not a PNG or JPEG image. " + SEND_AN_IMAGE)
    try:
        with Image.open(path, formats=[kind]) as image:  # reads the header only
            width, height = image.size
    except Image.DecompressionBombError:
        raise TooLarge(too_large("far more than")) from None
    except Exception as error:  # noqa: BLE001 - Pillow raises many kinds over a bad header
        raise UnsupportedInput(f"The file starts as a {kind} but its header cannot be read "
                               f"({reason(error, path)}). {SEND_AN_IMAGE}") from None
    if width * height > MAX_PIXELS:
        raise TooLarge(too_large(f"{width}x{height} = {width * height},"))
    return kind, width, height


def too_large(pixels: str) -> str:
    return (f"The image has {pixels} pixels; this server reads at most {MAX_PIXELS} "
            "(OCR_MAX_PIXELS).")


def reason(error: Exception, path: Path) -> str:
    """Pillow's message, without the server's path of the upload."""
    return str(error).replace(f"'{path}'", "").replace(str(path), "the file").strip()


def check_upload(path: Path, options: OcrOptions, settings: Settings) -> None:
    """Before POST /jobs queues the job: 415 for a file that is no PNG or JPEG, 413 for one
    too large."""
    image_size(path)


def tesseract_command(source: Path, target: Path, options: OcrOptions) -> list[str]:
    # One thread per tesseract: the kind's workers are the parallelism, one per core.
    return ["env", "OMP_THREAD_LIMIT=1", "tesseract", str(source), str(target),
            "-l", options.lang, "--psm", str(options.psm), "txt", "tsv"]


def recognize(job: JobContext) -> Output:
    options: OcrOptions = job.options
    if job.input_path is None:
        raise BadInput("Send the image to read as the `file` field. " + SEND_AN_IMAGE)
    # /put queues without check_upload: the same answers when the job starts.
    _, width, height = image_size(job.input_path)
    if shutil.which("tesseract") is None:
        raise RuntimeError("tesseract is not installed on this machine "
                           "(apt-get install tesseract-ocr)")
    job.set_progress(0, 1, "images")
    target = job.out_dir / TEXT_NAME
    try:
        run_child(job, tesseract_command(job.input_path, target, options),
                  memory_mb=MEMORY_MB)
    except ProcessFailed as error:
        if any(sign in error.stderr_tail for sign in OUT_OF_MEMORY):
            raise TooLarge(f"tesseract ran out of memory reading this {width}x{height} "
                           f"image under its cap of {MEMORY_MB} MB (OCR_MAX_MB): "
                           f"{error.stderr_tail.strip()}") from None
        # Named for tesseract, not for the `env` it runs through; the tail of its stderr.
        raise ProcessFailed("tesseract", error.returncode, error.stderr_tail) from None
    text_path, words_path = target.with_suffix(".txt"), target.with_suffix(".tsv")
    text = text_path.read_text(encoding="utf-8", errors="replace").rstrip("\f\n")
    words = read_words(words_path)
    job.set_progress(1, 1, "images")
    confidences = [confidence for line in words for _, confidence in line]
    return Output(
        data={"text": text, "lang": options.lang, "psm": options.psm,
              "width": width, "height": height,
              "confidence": mean(confidences) if confidences else None,
              "lines": [{"text": " ".join(word for word, _ in line),
                         "confidence": mean([confidence for _, confidence in line])}
                        for line in words]},
        files=[text_path, words_path],
    )


def read_words(path: Path) -> list[list[tuple[str, float]]]:
    """The words of each line tesseract found, in its order, with their confidence (0-100):
    tesseract's TSV, one row a word at level 5."""
    lines: dict[tuple[str, str, str, str], list[tuple[str, float]]] = {}
    with open(path, encoding="utf-8", errors="replace", newline="") as file:
        for row in csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE):
            word = (row.get("text") or "").strip()
            if row.get("level") != "5" or not word:
                continue
            try:
                confidence = float(row["conf"])
            except (TypeError, ValueError):
                continue
            key = (row["page_num"], row["block_num"], row["par_num"], row["line_num"])
            lines.setdefault(key, []).append((word, confidence))
    return list(lines.values())


def mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 1)


KIND = JobKind(
    name="ocr",
    description="Text from an image (PNG or JPEG), read by tesseract in language `lang`.",
    options=OcrOptions,
    handler=recognize,
    sample=HERE / "sample.png",
    check_input=check_upload,
    accept="image/png,image/jpeg",
    # One tesseract per core of a two-core machine; a page takes a second or more.
    workers=2,
    queue_size=20,
    timeout=120,
)
