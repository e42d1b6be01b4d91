"""Ingest's read-ahead: inputs read on a thread pool (files, S3 objects, URLs), in input order.

URLs are fetched through one shared guarded client (bgq.fetch). The caller bounds how many
inputs are read ahead, so the bytes held never exceed its window.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from bgq import defaults
from bgq.fetch import FetchFailed, fetch_setting_image, guarded_client
from producer.catalog import InputError, Item

if TYPE_CHECKING:
    import httpx

    from bgq.settings import Settings


class Reader:
    """Reads the inputs it is given on `concurrency` threads; `next()` hands them back in order."""

    def __init__(
        self,
        settings: Settings,
        read: Callable[[str], bytes],
        concurrency: int = defaults.FETCH_CONCURRENCY,
    ) -> None:
        self.settings = settings
        self.read = read
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="bgq-read")
        self.ahead: deque[tuple[Item, Future[bytes]]] = deque()
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Inputs added and not handed back yet."""
        return len(self.ahead)

    def add(self, item: Item) -> None:
        """Start reading an input (one that cannot run is handed back as it is)."""
        self.ahead.append((item, self.pool.submit(self._read, item)))

    def next(self) -> tuple[Item, bytes | None, str | None]:
        """The oldest input added: (item, bytes, None), or (item, None, why it cannot be read).

        Anything else a read raises (a store or bucket failing as a whole) is raised here.
        """
        item, future = self.ahead.popleft()
        try:
            return item, future.result(), None
        except (InputError, FetchFailed) as exc:
            return item, None, str(exc)

    def _read(self, item: Item) -> bytes:
        if item.error is not None or item.output is None:
            return b""  # never submitted: the caller reports the item's own error
        if not item.by_url:
            return self.read(item.source)
        return fetch_setting_image(self.settings, item.source, self._shared_client())

    def _shared_client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = guarded_client(
                    self.settings.fetch_allow_private, self.settings.fetch_timeout
                )
            return self._client

    def close(self) -> None:
        """Drop the reads not started, wait for none; close the shared client."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
