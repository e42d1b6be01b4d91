"""The store: `open_store(settings)` gives the backend BGQ_STORE_URL names (see base.Store).

Callers import the store's names from here; the store's layout (kinds, object names) is the
contract's (`bgq.contract`), and writing local files whole is `bgq.fileio`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bgq.store.base import Entry, Store
from bgq.store.files import FileStore
from bgq.store.s3 import (  # boto3 itself is imported on an S3 store's first request
    S3Store,
    list_s3_objects,
    make_s3_client,
    raise_s3_error,
    s3_error_code,
)

if TYPE_CHECKING:
    from bgq.settings import Settings

__all__ = [
    "Entry",
    "FileStore",
    "S3Store",
    "Store",
    "list_s3_objects",
    "make_s3_client",
    "open_store",
    "raise_s3_error",
    "s3_error_code",
]


def open_store(settings: Settings) -> Store:
    """The configured store: a directory (the default, $BGQ_HOME/store) or an S3 bucket."""
    bucket = settings.store_bucket
    if bucket is not None:
        return S3Store(settings, *bucket)
    setting = "BGQ_STORE_URL" if settings.store_url else "BGQ_HOME"
    return FileStore(settings.store_dir, setting)
