"""`digits`: which digit (0-9) an image shows, answered by a scikit-learn classifier that is
trained once per process, at its `setup`, and runs on batches of jobs.

A job kind packaged on its own, as a user's would be: it imports only jobqueue's public API,
and its `pyproject.toml` declares it as the entry point `digits` of the group
`jobqueue.kinds`, so `JOBQUEUE_KINDS=message,digits` serves it once the package is installed.

- `setup` (`train`) fits a random forest of 200 trees on `sklearn.datasets.load_digits()`
  (1797 images of 8x8 pixels on a 0-16 scale, shipped with scikit-learn: nothing is
  downloaded) in under a second, and another to import scikit-learn; its return
  value is every job's `job.resource`.
- `batch`: the worker hands the handler up to `DIGITS_BATCH_SIZE` (32) queued jobs at once,
  and the handler predicts all of them in one `predict_proba` call. The forest's predict
  costs about the same for 1 image as for 32 (some 10 ms: scikit-learn walks its trees once
  per call, in Python), as a model on a GPU does: that is what batching saves. (An SVC or a
  logistic regression would answer in a tenth of a millisecond, far less than the HTTP
  request around it: batching would have nothing to save there.)
- An image that cannot be read fails its own job (BadInput), never its batch.

`DIGITS_BATCH_SIZE=1` serves the same kind without batching (one job per call), the
benchmark's baseline. It is read when the module is imported, and is not a JOBQUEUE_*
variable: those are jobqueue's settings, and the server warns about any it does not know.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

from jobqueue import (
    BadInput,
    Batch,
    JobContext,
    JobKind,
    Output,
    Settings,
    TooLarge,
    UnsupportedInput,
)

HERE = Path(__file__).resolve().parent
_batch_text = os.environ.get("DIGITS_BATCH_SIZE", "").strip() or "32"
if not _batch_text.isdigit() or int(_batch_text) < 1:
    raise ValueError(f"DIGITS_BATCH_SIZE={_batch_text!r}: a whole number of at least 1 (1 "
                     "turns batching off)")
BATCH_SIZE = int(_batch_text)
MAX_WAIT_SECONDS = 0.01
# A digit needs few pixels; a bigger image is refused before it is decoded.
MAX_PIXELS = 4_000_000
TREES = 200
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
SEND_A_DIGIT = "Send a PNG or JPEG of one digit, dark on light or light on dark."
# load_digits' images: 8x8 blocks of ink counts, 0 (none) to 16 (all ink).
SIDE = 8
SCALE = 16.0

_setups = 0  # how often setup has run in this process (the tests check: once)
_setups_lock = threading.Lock()


class DigitsOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")


@dataclass(frozen=True)
class Model:
    """What `train` returns: each job's `job.resource` in this process."""

    classifier: Any  # a fitted sklearn classifier
    pid: int  # the process setup ran in
    seconds: float  # how long training took, imports included


def setup_count() -> int:
    """How many times setup has run in this process so far."""
    return _setups


def train(settings: Settings | None = None) -> Model:
    """The kind's setup: fit the classifier on scikit-learn's own digits."""
    global _setups
    started = time.perf_counter()
    # Imported here, not at the top: only a process that runs the jobs pays for scikit-learn
    # (an API replica of the distributed mode loads the kind too, to check uploads).
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier

    digits = load_digits()
    classifier = RandomForestClassifier(n_estimators=TREES, random_state=0)
    classifier.fit(digits.data, digits.target)
    with _setups_lock:
        _setups += 1
    return Model(classifier, os.getpid(), time.perf_counter() - started)


def image_format(path: Path) -> str:
    """PNG or JPEG by the file's first bytes; UnsupportedInput for anything else, TooLarge
    past MAX_PIXELS (read from the header, nothing decoded)."""
    with open(path, "rb") as file:
        head = file.read(len(PNG_MAGIC))
    if head.startswith(PNG_MAGIC):
        kind = "PNG"
    elif head.startswith(JPEG_MAGIC):
        kind = "JPEG"
    else:
        raise UnsupportedInput("The file is not a PNG or JPEG image. " + SEND_A_DIGIT)
    try:
        with Image.open(path, formats=[kind]) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        raise TooLarge(too_large("far more than")) from None
    except Exception as error:  # noqa: BLE001 - Pillow raises many kinds over a bad header
        raise UnsupportedInput(f"The file starts as a {kind} but its header cannot be read "
                               f"({reason(error, path)}). {SEND_A_DIGIT}") from None
    if width * height > MAX_PIXELS:
        raise TooLarge(too_large(f"{width}x{height} = {width * height}"))
    return kind


def too_large(pixels: str) -> str:
    return f"The image has {pixels} pixels; this kind reads at most {MAX_PIXELS} (a digit " \
           "needs far fewer)."


def reason(error: Exception, path: Path) -> str:
    """Pillow's message, without the server's path of the upload."""
    return str(error).replace(f"'{path}'", "").replace(str(path), "the file").strip()


def check_upload(path: Path, options: DigitsOptions, settings: Settings) -> None:
    """Before POST /jobs queues the job: 415 for a file that is no PNG or JPEG, 413 for one
    far too large."""
    image_format(path)


def features(path: Path) -> np.ndarray:
    """The image as load_digits has its images: 8x8 blocks, each its share of ink on 0-16.

    Greyscale (transparency over white), turned so ink is bright if the image's border is
    light (dark ink on paper), then each of 8x8 blocks averaged (a box filter, as the data
    set counted the ink pixels of 4x4 blocks of a 32x32 bitmap). The digit should fill the
    image's height, as the data set's fill theirs.
    """
    kind = image_format(path)
    try:
        with Image.open(path, formats=[kind]) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                paper = Image.new("RGBA", image.size, "white")
                image = Image.alpha_composite(paper, image.convert("RGBA"))
            grey = image.convert("L")
    except Exception as error:  # noqa: BLE001 - a broken image: its job fails, not the batch
        raise BadInput(f"The image cannot be read ({reason(error, path)}). "
                       + SEND_A_DIGIT) from None
    pixels = np.asarray(grey, dtype=np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    small = np.asarray(grey.resize((SIDE, SIDE), Image.Resampling.BOX), dtype=np.float64)
    if border.mean() > 127:
        small = 255 - small
    return (small * (SCALE / 255)).reshape(-1)


def recognize(jobs: list[JobContext]) -> list[Output | Exception]:
    """The batch handler: one prediction for every readable image, a BadInput for each
    other, in the jobs' order."""
    model: Model = jobs[0].resource
    results: list[Output | Exception | None] = [None] * len(jobs)
    rows, readable = [], []
    for index, job in enumerate(jobs):
        try:
            if job.input_path is None:
                raise BadInput("Send the image as the `file` field. " + SEND_A_DIGIT)
            rows.append(features(job.input_path))
            readable.append(index)
        except BadInput as error:
            results[index] = error
    if rows:
        # The whole batch in one call: what batching is for.
        probabilities = model.classifier.predict_proba(np.stack(rows))
        count = setup_count()
        for index, row in zip(readable, probabilities, strict=True):
            best = int(row.argmax())
            results[index] = Output(data={
                "digit": int(model.classifier.classes_[best]),
                "probability": round(float(row[best]), 4),
                "batchSize": len(jobs),
                "setupPid": model.pid,
                "setupCount": count,
                "setupSeconds": round(model.seconds, 3),
            })
    return results


def recognize_one(job: JobContext) -> Output:
    """The handler without batching (DIGITS_BATCH_SIZE=1): the same code, one job a call."""
    (result,) = recognize([job])
    if isinstance(result, Exception):
        raise result
    return result


KIND = JobKind(
    name="digits",
    description="Which digit (0-9) an image shows, by a classifier trained on scikit-learn's "
                "digits; jobs run in batches.",
    options=DigitsOptions,
    handler=recognize if BATCH_SIZE > 1 else recognize_one,
    batch=Batch(max_size=BATCH_SIZE, max_wait=MAX_WAIT_SECONDS) if BATCH_SIZE > 1 else None,
    setup=train,
    sample=HERE / "sample.png",
    check_input=check_upload,
    accept="image/png,image/jpeg",
    writes_files=False,
    # One thread: batching, not threads, is how this kind keeps up (and a forest's predict
    # holds the GIL much of the time).
    workers=1,
    queue_size=64,
    timeout=30,
)
