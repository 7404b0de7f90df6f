"""`pdf2image`: a PDF becomes one PNG per page (`page-001.png`, ...).

Nothing of the PDF is parsed inside the server. poppler's pdfinfo reads the page count and
sizes, so limits are checked before any page is rendered. The pages are rendered in child
processes, under a memory cap (JOBQUEUE_RENDER_MAX_MB), by one of two engines:

- `pdfium` (the default): `kinds/pdfrender.py`, which opens the document once and renders
  its share of the pages with PDFium (pypdfium2) and writes them as PNGs with libpng (imagecodecs);
- `poppler`: one pdftoppm run per page, the command pdf2image's convert_from_path builds.

A job that renders alone spreads its pages over every core; one that starts while others render
gets one child (see Cores). A cancel kills the children.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from jobqueue import (
    BadInput,
    ChildSlots,
    JobContext,
    JobKind,
    Output,
    ProcessFailed,
    Settings,
    TooLarge,
    UnsupportedInput,
    child_output,
    run_child,
    run_children,
)
from jobqueue.kinds import pdfrender

PDFINFO_TIMEOUT_SECONDS = 30
RENDER_PROGRAM = Path(pdfrender.__file__)
SEND_A_PDF = "Send a PDF document that opens without a password."


class PdfOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    dpi: int = Field(200, ge=10, le=600, description="Resolution of the PNG pages.")


@dataclass(frozen=True)
class PdfInfo:
    """The page count, and the width and height in points of each page as it is shown (its
    crop box, turned by its rotation), read by pdfinfo; `rotations`: each page's turn as
    poppler takes it (0, 90, 180 or 270), which the pdfium engine is told to render by."""

    pages: int
    sizes: list[tuple[float, float]]
    rotations: list[int] = field(default_factory=list)

    def pixel_size(self, page: int, dpi: float) -> tuple[int, int]:
        return pdfrender.pixel_size(*self.sizes[page - 1], dpi)

    def rotation(self, page: int) -> int:
        return self.rotations[page - 1] if page <= len(self.rotations) else 0

    def file_names(self) -> list[str]:
        digits = max(3, len(str(self.pages)))
        return [f"page-{page:0{digits}d}.png" for page in range(1, self.pages + 1)]


_PAGES = re.compile(r"^Pages:\s+(\d+)\s*$", re.MULTILINE)
# Any word for the numbers: poppler prints "inf" for a size it cannot hold.
_PAGE_SIZE = re.compile(r"^Page\s+(\d+) size:\s+(\S+) x (\S+) pts", re.MULTILINE)
_PAGE_ROTATION = re.compile(r"^Page\s+(\d+) rot:\s+(-?\d+)", re.MULTILINE)


def pdfinfo_command(path: Path, settings: Settings) -> list[str]:
    # Sizes of one page more than the limit allows at most: enough to refuse, never unbounded.
    return ["pdfinfo", "-f", "1", "-l", str(settings.pdf_max_pages + 1), str(path)]


def parse_pdfinfo(text: str) -> PdfInfo:
    """pdfinfo's answer. Metadata (the title, ...) comes first and may hold lines that look
    like the ones read here, so for each the last one counts: pdfinfo's own."""
    counts = _PAGES.findall(text)
    if not counts:
        raise BadInput("poppler could not read the PDF's page count. " + SEND_A_PDF)
    pages = int(counts[-1])
    sizes = {int(page): (_points(width), _points(height))
             for page, width, height in _PAGE_SIZE.findall(text)}
    rotations = {int(page): int(rotation) for page, rotation in _PAGE_ROTATION.findall(text)}
    shown, turns = [], []
    # Not range(pages): a PDF may claim any count. pdfinfo listed at most one page past the
    # limit, and check_limits refuses a PDF over it before looking at sizes.
    for page in range(1, min(pages, max(sizes, default=0)) + 1):
        width, height = sizes.get(page, (0.0, 0.0))
        rotation = rotations.get(page, 0)
        if rotation % 180 == 90:
            width, height = height, width
        shown.append((width, height))
        # poppler turns a page only by a multiple of 90, and draws it upright otherwise.
        turns.append(rotation if rotation % 90 == 0 else 0)
    return PdfInfo(pages, shown, turns)


def _points(text: str) -> float:
    """A page size as pdfinfo printed it; NaN for what is no number (a title's imitation)."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _unreadable(stderr_tail: str) -> BadInput:
    lines = stderr_tail.strip().splitlines()
    reason = lines[-1] if lines else "unknown error"
    return BadInput(f"The file is not a PDF that poppler can read ({reason}). " + SEND_A_PDF)


def read_info(path: Path, settings: Settings, job: JobContext | None = None) -> PdfInfo:
    """PdfInfo of the PDF at `path`; run for `job` (killed with it) when given."""
    args = pdfinfo_command(path, settings)
    if job is not None:
        lines: list[str] = []
        try:
            run_child(job, args, on_line=lines.append, memory_mb=settings.render_max_mb)
        except ProcessFailed as error:
            raise _unreadable(error.stderr_tail) from None
        return parse_pdfinfo("\n".join(lines))
    try:
        done = child_output(args, PDFINFO_TIMEOUT_SECONDS, settings.render_max_mb)
    except subprocess.TimeoutExpired:
        raise BadInput(f"poppler could not read the PDF within {PDFINFO_TIMEOUT_SECONDS} s; "
                       "the file may be damaged.") from None
    if done.returncode != 0:
        raise _unreadable(done.stderr.decode(errors="replace"))
    return parse_pdfinfo(done.stdout.decode(errors="replace"))


def check_limits(info: PdfInfo, dpi: int, settings: Settings) -> None:
    """TooLarge for more pages than JOBQUEUE_PDF_MAX_PAGES or a page with more pixels at `dpi`
    than JOBQUEUE_PDF_MAX_PIXELS; BadInput for a page with no area."""
    if info.pages > settings.pdf_max_pages:
        raise TooLarge(f"The PDF has {info.pages} pages; this server takes at most "
                       f"{settings.pdf_max_pages} (JOBQUEUE_PDF_MAX_PAGES). Split it and send "
                       "the parts.")
    if info.pages == 0:
        raise BadInput("The PDF has no pages. " + SEND_A_PDF)
    for page in range(1, info.pages + 1):
        if page > len(info.sizes) or any(map(math.isnan, info.sizes[page - 1])):
            raise BadInput(f"poppler could not read the size of page {page} of the PDF; the "
                           "PDF may be damaged.")
        if any(map(math.isinf, info.sizes[page - 1])):
            raise TooLarge(f"Page {page} of the PDF is too large for poppler to measure (its "
                           f"size is {info.sizes[page - 1][0]:g} x {info.sizes[page - 1][1]:g} "
                           "points); the PDF may be damaged.")
        width, height = info.pixel_size(page, dpi)
        if width < 1 or height < 1:
            raise BadInput(f"Page {page} of the PDF has no area ({width}x{height} pixels at "
                           f"{dpi} dpi); the PDF may be damaged.")
        if width * height > settings.pdf_max_pixels:
            raise too_many_pixels(page, f"{width}x{height}", dpi, settings)


def too_many_pixels(page: int, size: str, dpi: int, settings: Settings) -> TooLarge:
    return TooLarge(f"Page {page} would be {size} pixels at {dpi} dpi; this server renders at "
                    f"most {settings.pdf_max_pixels} pixels a page (JOBQUEUE_PDF_MAX_PIXELS). "
                    "Ask for a lower dpi.")


def inspect_pdf(path: Path, options: PdfOptions, settings: Settings,
                job: JobContext | None = None) -> PdfInfo:
    """The one look at a PDF, before queueing (POST /jobs) and when the job starts (so /put
    gets the same answers): UnsupportedInput for a file that is no PDF poppler can read,
    TooLarge past the page and pixel limits. Runs pdfinfo for `job` when given."""
    with path.open("rb") as file:
        if file.read(5) != b"%PDF-":
            raise UnsupportedInput("The upload is not a PDF (it does not start with %PDF-). "
                                   "Send a PDF document.")
    try:
        info = read_info(path, settings, job)
    except UnsupportedInput:
        raise
    except BadInput as error:
        raise UnsupportedInput(str(error)) from None
    check_limits(info, options.dpi, settings)
    return info


def check_pdf(path: Path, options: PdfOptions, settings: Settings) -> None:
    inspect_pdf(path, options, settings)


class Cores:
    """The machine's cores, shared by the render children of every pdf2image job.

    A job always gets its first child. It may start another while fewer jobs run than there
    are cores, a core is free, and it has pages left that no child has taken. So a job that
    renders alone spreads over every core, one that starts while others render gets one
    child, and the last job running takes the cores the others leave. (While jobs wait in the
    queue, a worker that frees up starts the next of them at once, so the jobs running rarely
    fall below the cores.) pdfium children share a job's pages as they go, see pdfrender.
    """

    def __init__(self, count: int):
        self.count = count
        self.jobs = 0
        self.busy = 0
        self._lock = threading.Lock()

    @contextmanager
    def job(self) -> Iterator[None]:
        """Count a job as running from its start, before its first child."""
        with self._lock:
            self.jobs += 1
        try:
            yield
        finally:
            with self._lock:
                self.jobs -= 1

    def for_job(self, wanted: Callable[[int], bool]) -> JobCores:
        return JobCores(self, wanted)


class JobCores(ChildSlots):
    """One job's children on the shared cores; `wanted(running)` says whether another would
    have work."""

    def __init__(self, cores: Cores, wanted: Callable[[int], bool]):
        super().__init__()
        self.cores = cores
        self.wanted = wanted

    def take(self, running: int) -> bool:
        if not self.wanted(running):
            return False
        with self.cores._lock:
            if running and (self.cores.jobs >= self.cores.count
                            or self.cores.busy >= self.cores.count):
                return False
            self.cores.busy += 1
            return True

    def give(self) -> None:
        with self.cores._lock:
            self.cores.busy -= 1


CORES = Cores(len(os.sched_getaffinity(0)))


def render_with_pdfium(job: JobContext, info: PdfInfo, page_done: Callable[[], None]) -> None:
    """Render children that share the job's pages: each takes the next page no other has
    taken, until none is left."""
    options: PdfOptions = job.options
    settings: Settings = job.settings
    digits = max(3, len(str(info.pages)))
    command = [
        sys.executable, "-I", str(RENDER_PROGRAM), str(job.input_path), str(job.out_dir),
        "--pages", ",".join(str(page) for page in range(1, info.pages + 1)),
        "--rotations", ",".join(str(info.rotation(page)) for page in range(1, info.pages + 1)),
        "--dpi", str(options.dpi), "--digits", str(digits),
        "--max-pixels", str(settings.pdf_max_pixels), "--png-level", str(settings.png_compression),
        *(["--smooth-images"] if settings.pdf_smooth_images else []),
    ]
    done: set[int] = set()
    rendering: dict[int, int] = {}  # child -> the page it took last
    refusals: dict[int, dict] = {}
    finished = False  # a child has run out of pages to take: so would any new one

    def on_line(child: int, line: str) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return  # not ours: PDFium may print to stdout
        if not isinstance(message, dict):
            return
        if "error" in message:
            refusals[child] = message
        elif isinstance(message.get("start"), int):
            rendering[child] = message["start"]
        elif isinstance(message.get("page"), int):
            done.add(message["page"])
            page_done()

    def child_finished(_: int) -> None:
        nonlocal finished
        finished = True

    def wanted(running: int) -> bool:
        if finished:
            return False
        if running and not rendering:
            # A second child only once the first is under way (about 0.15 s in): jobs that
            # arrive together with this one get a core each first.
            return False
        # Pages no child has taken yet: each running child holds at most one. A second child
        # costs a start-up, so it starts only with two or more pages to take.
        untaken = info.pages - len(done) - running
        return untaken >= (2 if running else 1)

    try:
        run_children(job, itertools.repeat(command), CORES.for_job(wanted),
                           on_line=on_line, on_exit=child_finished,
                           memory_mb=settings.render_max_mb)
    except ProcessFailed as error:
        page = rendering.get(error.index)
        refusal = refusals.get(error.index)
        if refusal is None:
            raise render_failed(job, page, info, "the PDFium renderer", error) from None
        raise refused(job, refusal, page or 0, info) from None


def _how(error: ProcessFailed) -> str:
    how = (f"was killed by signal {-error.returncode}" if error.returncode < 0
           else f"exited with code {error.returncode}")
    tail = error.stderr_tail.strip().splitlines()
    return f"{how} ({tail[-1]})" if tail else how


def _ran_out_of_memory(error: ProcessFailed) -> bool:
    """A renderer that says it ran out of memory under its cap (pdftoppm prints "Out of
    memory", the render program reports a MemoryError)."""
    return "out of memory" in error.stderr_tail.lower()


def refused(job: JobContext, refusal: dict, page: int, info: PdfInfo) -> BadInput:
    """The error a refusal of the render program stands for."""
    settings: Settings = job.settings
    page = refusal.get("page") or page
    reason, detail = refusal.get("error"), str(refusal.get("detail", ""))
    if reason == "too_large":
        return too_many_pixels(page, detail, job.options.dpi, settings)
    if reason == "out_of_memory":
        return out_of_memory(job, page, info)
    if reason == "wrong_size":
        return BadInput(f"Page {page} of {info.pages} came out {detail}; the PDF may be "
                        "damaged.")
    return BadInput(f"PDFium could not read the PDF ({detail}). " + SEND_A_PDF)


def out_of_memory(job: JobContext, page: int | None, info: PdfInfo) -> TooLarge:
    which = f"Page {page} of {info.pages}" if page else "A page of the PDF"
    return TooLarge(f"{which} needs more memory than a renderer may use "
                    f"({job.settings.render_max_mb:g} MB, JOBQUEUE_RENDER_MAX_MB); it may be a "
                    "decompression bomb. Ask for a lower dpi, or send a simpler PDF.")


def render_failed(job: JobContext, page: int | None, info: PdfInfo, renderer: str,
                  error: ProcessFailed) -> BadInput:
    """The error a renderer's death stands for: out of memory under its cap, or a crash."""
    if _ran_out_of_memory(error):
        return out_of_memory(job, page, info)
    which = f"Page {page} of {info.pages}" if page else "The PDF"
    if error.returncode == -signal.SIGABRT:  # PDFium aborts when its allocator is refused
        return BadInput(f"{which} could not be rendered: {renderer} gave up (it aborted). "
                        "Most often that is running out of the memory a renderer may use "
                        f"({job.settings.render_max_mb:g} MB, JOBQUEUE_RENDER_MAX_MB): a "
                        "decompression bomb, or a page that draws itself over and over.")
    return BadInput(f"{which} could not be rendered: {renderer} {_how(error)}. The PDF may "
                    "be damaged.")


def render_with_poppler(job: JobContext, info: PdfInfo, page_done: Callable[[], None]) -> None:
    """One pdftoppm per page, on as many cores as CORES gives the job. `-cropbox`: the page as
    viewers show it, the size pdfinfo gave (without it pdftoppm renders the media box, which
    may be far larger)."""
    options: PdfOptions = job.options
    commands = [
        ["pdftoppm", "-r", str(options.dpi), "-f", str(page), "-l", str(page), "-png",
         "-cropbox", "-singlefile", str(job.input_path),
         str(job.out_dir / Path(name).stem)]
        for page, name in enumerate(info.file_names(), 1)
    ]
    try:
        run_children(job, commands, CORES.for_job(lambda running: True),
                           on_exit=lambda _: page_done(), memory_mb=job.settings.render_max_mb)
    except ProcessFailed as error:
        raise render_failed(job, error.index + 1, info, "pdftoppm", error) from None


ENGINES = {"pdfium": render_with_pdfium, "poppler": render_with_poppler}


def png_size(path: Path) -> tuple[int, int] | None:
    """Width and height from a PNG's header; None when the file is missing or no PNG."""
    try:
        with path.open("rb") as file:
            header = file.read(24)
    except OSError:
        return None
    if len(header) < 24 or header[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return struct.unpack(">II", header[16:24])


def convert_pdf(job: JobContext) -> Output:
    with CORES.job():
        return _convert(job)


def _convert(job: JobContext) -> Output:
    options: PdfOptions = job.options
    settings: Settings = job.settings
    info = inspect_pdf(job.input_path, options, settings, job)
    job.set_progress(0, info.pages, "pages")
    finished = 0

    def page_done() -> None:  # called on this thread: run_many reads every child's output here
        nonlocal finished
        finished += 1
        job.set_progress(finished, info.pages, "pages")

    ENGINES[settings.pdf_engine](job, info, page_done)
    files = [job.out_dir / name for name in info.file_names()]
    # A renderer that could not allocate a page may still exit 0 (pdftoppm writes a 1x1 PNG).
    for page, path in enumerate(files, 1):
        expected, found = info.pixel_size(page, options.dpi), png_size(path)
        if found is None or not pdfrender.same_size(found, expected):
            what = "no PNG" if found is None else f"{found[0]}x{found[1]} pixels"
            raise BadInput(f"Page {page} of {info.pages} came out as {what} instead of "
                           f"{expected[0]}x{expected[1]}; the PDF may be damaged.")
    return Output(data={"pages": info.pages, "dpi": options.dpi}, files=files)


KIND = JobKind(
    name="pdf2image",
    description="Renders each page of a PDF to a PNG at `dpi`.",
    options=PdfOptions,
    handler=convert_pdf,
    sample=Path(__file__).parent / "samples" / "sample.pdf",
    accept="application/pdf,.pdf",
    workers=2,
    queue_size=20,
    timeout=60,
    check_input=check_pdf,
)
