"""Job files: a folder per job under the output directory, `out/<job-id>/`, with the job's
outputs and, in `input/`, its upload.

Every path here is built from a job id that parsed as a UUID and a file name that passed
`safe_name`, so nothing a client sends can point outside its job's folder.
"""

from __future__ import annotations

import os
import re
import shutil
import unicodedata
import uuid
from pathlib import Path

INPUT_DIR = "input"
# In every job folder: what the orphan sweep looks for before it removes one (so it never
# touches a folder this server did not make, whatever its name).
JOB_MARK = ".job"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME_LENGTH = 120


def new_job_id() -> str:
    return str(uuid.uuid4())


def is_job_id(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


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
    """Create a job's folder (`job_dir`), marked as one."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / JOB_MARK).touch()


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
