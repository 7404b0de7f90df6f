"""A job's files: its folder on this machine (`jobfiles`), what routes read them through
(`store.FileStore`: `LocalFiles` here, `objects.ObjectFiles` in an S3 bucket) and the sweeps
that remove what no record owns (`retention`)."""

from __future__ import annotations

from jobqueue.files.store import FileStore, LocalFiles
from jobqueue.settings import Settings

__all__ = ["FileStore", "LocalFiles", "make_file_store"]


def make_file_store(settings: Settings) -> FileStore:
    url = settings.storage_url.strip()
    if not url:
        return LocalFiles(settings.out_dir)
    from jobqueue.files.objects import ObjectFiles  # obstore is loaded only when it is used
    return ObjectFiles(settings)
