"""The store: `open_store(settings)` gives the backend BGQ_STORE_URL names (see base.Store)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bgq.contract import MASKS
from bgq.store.base import INPUTS, RESULTS, Entry, Store, object_name
from bgq.store.files import FILE_MODE, FileStore, atomic_write

if TYPE_CHECKING:
    from bgq.settings import Settings

__all__ = [
    "FILE_MODE",
    "INPUTS",
    "MASKS",
    "RESULTS",
    "Entry",
    "FileStore",
    "Store",
    "atomic_write",
    "object_name",
    "open_store",
]


def open_store(settings: Settings) -> Store:
    """The configured store: a directory (the default, $BGQ_HOME/store) or an S3 bucket."""
    bucket = settings.store_bucket
    if bucket is not None:
        from bgq.store.s3 import S3Store

        return S3Store(settings, *bucket)
    setting = "BGQ_STORE_URL" if settings.store_url else "BGQ_HOME"
    return FileStore(settings.store_dir, setting)
