"""Job files: a folder per job under the output directory, `out/<job-id>/`, with the job's
outputs and, in `input/`, its upload.

Every path here is built from a job id that parsed as a UUID and a file name that passed
`safe_name`, so nothing a client sends can point outside its job's folder.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import unicodedata
from pathlib import Path

from jobqueue.errors import CannotStart

INPUT_DIR = "input"
# In every job folder: what the orphan sweep looks for before it removes one (so it never
# touches a folder this server did not make, whatever its name). It holds the id of the job
# store whose server made the folder: a store that is new, emptied or another one (a deleted
# jobs.db, JOBQUEUE_DB_PATH changed) has no record of the folder, yet must not remove it.
JOB_MARK = ".job"
# In the output folder: the id of the job store that uses it now (claim_out_dir), which each
# new job folder's mark copies.
STORE_MARK = ".jobqueue-store"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME_LENGTH = 120


# Random bytes for RANDOM_IDS ids at a time: uuid.uuid4() makes a getrandom system call per id,
# and on the event loop each call is a point where a worker thread can take the interpreter
# for up to 5 ms (sys.getswitchinterval) before the request goes on.
RANDOM_IDS = 256
_random_ids: list[bytes] = []
_random_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child draws ids of its own (the parent's pool would give both the same ones),
    with a new lock: one another thread of the parent held at the fork stays held in the
    child, where that thread does not exist to let it go."""
    global _random_lock
    _random_lock = threading.Lock()
    _random_ids.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def new_job_id() -> str:
    """A uuid4 from the operating system's random source, as uuid.uuid4() makes it (its
    version and variant bits set, in its canonical text), without making a UUID object."""
    with _random_lock:
        if not _random_ids:
            pool = os.urandom(16 * RANDOM_IDS)
            _random_ids.extend(pool[i:i + 16] for i in range(0, len(pool), 16))
        random = bytearray(_random_ids.pop())
    random[6] = random[6] & 0x0F | 0x40  # version 4
    random[8] = random[8] & 0x3F | 0x80  # the RFC 4122 variant
    digits = random.hex()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


# A UUID in its canonical text (what str(uuid.UUID(...)) gives): lowercase, with dashes.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_job_id(text: str) -> bool:
    return isinstance(text, str) and _CANONICAL_UUID.fullmatch(text) is not None


def safe_name(name: str, default: str = "upload") -> str:
    """A plain file name made from what a client sent: no folders, no dot files, ASCII only."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    name = _UNSAFE.sub("_", name).lstrip(".")
    if len(name) > MAX_NAME_LENGTH:
        stem, ext = os.path.splitext(name)
        ext = ext[:16]
        name = stem[: MAX_NAME_LENGTH - len(ext)] + ext
    return name or default


def job_dir(out_dir: Path, job_id: str) -> Path:
    if not is_job_id(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return out_dir / job_id


def make_job_dir(folder: Path) -> None:
    """Create a job's folder (`job_dir`), marked as one, with the id of the store its record
    is kept in (the output folder's STORE_MARK; none when nothing claimed it)."""
    folder.mkdir(parents=True, exist_ok=True)
    mark = folder / JOB_MARK
    if not mark.exists():
        try:
            store_id = (folder.parent / STORE_MARK).read_text().strip()
        except FileNotFoundError:
            store_id = ""
        mark.write_text(store_id)


def folder_store(folder: Path) -> str | None:
    """The id of the store whose server made this job folder: "" when unknown (made before
    folders were tied to their store), None when the folder is no job folder (no mark)."""
    try:
        return (folder / JOB_MARK).read_text().strip()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def claim_out_dir(out_dir: Path, store_id: str) -> None:
    """Record that the job folders made in `out_dir` from now on belong to the store
    `store_id`; CannotStart when the folder cannot be written."""
    mark = out_dir / STORE_MARK
    try:
        if mark.is_file() and mark.read_text().strip() == store_id:
            return
    except OSError:
        pass
    _write_mark(out_dir, store_id)


def check_writable(out_dir: Path) -> None:
    """CannotStart, naming the folder, when files cannot be made in `out_dir`."""
    partial = _write_mark(out_dir, None)
    partial.unlink(missing_ok=True)


def _write_mark(out_dir: Path, store_id: str | None) -> Path:
    partial = out_dir / f"{STORE_MARK}.{os.getpid()}.part"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        partial.write_text(store_id or "")
        if store_id is not None:
            os.replace(partial, out_dir / STORE_MARK)  # whole or not at all to its readers
    except OSError as error:
        raise CannotStart(
            f"The output folder {out_dir} cannot be written ({error.strerror or error}): "
            "jobs keep their uploads and results there. Make it writable by this user, or "
            "point JOBQUEUE_OUT_DIR at a folder that is.") from None
    return partial


def output_file(out_dir: Path, job_id: str, name: str) -> Path | None:
    """The output file `name` of job `job_id`, or None when there is no such file."""
    if not is_job_id(job_id) or name != safe_name(name, default=""):
        return None
    path = out_dir / job_id / name
    return path if path.is_file() else None


def discard_output(folder: Path) -> None:
    """Remove what a run of the job wrote (before it runs again), keeping its upload."""
    for path in folder.iterdir() if folder.is_dir() else ():
        if path.name not in (INPUT_DIR, JOB_MARK):  # gone meanwhile (a DELETE) is as good
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(
                missing_ok=True)


def remove_job_dir(out_dir: Path, job_id: str) -> None:
    shutil.rmtree(job_dir(out_dir, job_id), ignore_errors=True)
