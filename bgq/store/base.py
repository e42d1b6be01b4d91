"""The store interface: content-addressed input blobs and result PNGs, one backend per module.

Backends implement a few primitives on (kind, name) pairs; the store's rules (write inputs once,
stamp a result's last use on a hit, delete only what was not used since it was scanned) live
here, once, on top of them. Callers hold a `Store` and never ask which backend it is, except
for the features that only one has (a local path to hard-link, a presigned URL).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bgq import defaults
from bgq.contract import INPUTS, RESULTS, object_name
from bgq.errors import ConfigError, StoreError


@dataclass(frozen=True)
class Entry:
    """One object of the store; `mtime` is its last write or recorded use (prune's LRU clock)."""

    kind: str  # INPUTS or RESULTS
    name: str  # input digest or result key
    size: int
    mtime: float


def entry_name(kind: str, object_base: str) -> str:
    """The digest or key of an object's base name (the inverse of object_name's last part)."""
    return object_base.removesuffix(".png") if kind == RESULTS else object_base


class Store(abc.ABC):
    """Where inputs and results live; `url` says where, for messages (never with secrets)."""

    url: str

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}  # result key -> its last use, as this process saw it

    # -- primitives each backend implements ------------------------------------------------

    @abc.abstractmethod
    def check(self) -> None:
        """Raise ConfigError (one line naming the setting) if the store cannot be used."""

    @abc.abstractmethod
    def stat(self, kind: str, name: str) -> Entry | None:
        """The object's size and last use, or None if it is not there."""

    @abc.abstractmethod
    def read(self, kind: str, name: str) -> bytes:
        """The object's bytes; StoreError if it is missing or unreadable."""

    @abc.abstractmethod
    def write(self, kind: str, name: str, data: bytes) -> None:
        """Write the object whole: no reader ever sees part of it."""

    @abc.abstractmethod
    def touch(self, kind: str, name: str) -> None:
        """Record a use of the object as its last-use time."""

    @abc.abstractmethod
    def delete(self, kind: str, name: str) -> None:
        """Remove the object (missing is fine)."""

    @abc.abstractmethod
    def scan(self, kind: str) -> Iterator[Entry]:
        """Every object of a kind."""

    def chunks(self, key: str) -> Iterator[bytes]:
        """A result's bytes in pieces, for streaming it out."""
        yield self.read(RESULTS, key)

    def save(self, key: str, dest: Path, link: bool = False) -> None:
        """Put a result at the local path `dest` atomically (never a partial file).

        With `link`, a filesystem store may hard-link instead of copying (ingest's outputs).
        """
        from bgq.store.files import atomic_write

        try:
            atomic_write(dest, self.read(RESULTS, key))
        except OSError as exc:
            raise StoreError(f"cannot write {dest}: {exc}") from exc

    def local_path(self, key: str) -> Path | None:
        """The result as a local file, on a filesystem store; None on object storage."""
        return None

    def s3_object(self, key: str) -> tuple[str, str] | None:
        """(bucket, object key) of a result on S3, for server-side copies; None elsewhere."""
        return None

    def presigned_url(self, key: str, seconds: int) -> str | None:
        """A URL that serves the result for `seconds` without credentials; None if unsupported."""
        return None

    def remove_temporaries(self, older_than: float, now: float, dry_run: bool) -> int:
        """Remove leftovers of interrupted writes older than `older_than` seconds."""
        return 0

    # -- the store's rules, shared by every backend ----------------------------------------

    def location(self, key: str) -> Path | str:
        """Where a result is: its local Path, or its URL on object storage."""
        return self.local_path(key) or f"{self.url.rstrip('/')}/{object_name(RESULTS, key)}"

    def has_output(self, key: str) -> bool:
        return self.stat(RESULTS, key) is not None

    def use_output(self, key: str) -> bool:
        """True if the result exists; then record this use (at most once per USE_RESOLUTION s).

        The last use is prune's LRU clock. A store that refuses the stamp (read-only) still
        answers the hit; a result that vanished while it was stamped is a miss. A result this
        process saw used less than USE_RESOLUTION seconds ago is
        trusted without asking the store again: prune never deletes one used in the last
        PRUNE_MIN_IDLE seconds, which is longer.
        """
        seen = self._seen.get(key)
        if seen is not None and time.time() - seen < defaults.USE_RESOLUTION:
            return True
        entry = self.stat(RESULTS, key)
        if entry is None:
            self._seen.pop(key, None)
            return False
        used = min(entry.mtime, time.time())  # a store clock ahead of ours never extends trust
        if time.time() - used > defaults.USE_RESOLUTION:
            try:
                self.touch(RESULTS, key)
                used = time.time()
            except (StoreError, ConfigError):  # refused (read-only), or deleted meanwhile
                if self.stat(RESULTS, key) is None:
                    return False
        if len(self._seen) >= defaults.SEEN_RESULTS:
            self._seen.clear()
        self._seen[key] = used
        return True

    def put_input(self, input_sha256: str, data: bytes) -> None:
        """Store an input blob once (content addressing makes a concurrent write harmless).

        An existing blob is stamped, so that prune's grace period covers the new job too.
        """
        entry = self.stat(INPUTS, input_sha256)
        if entry is None:
            self.write(INPUTS, input_sha256, data)
        elif time.time() - entry.mtime > defaults.USE_RESOLUTION:
            self.touch(INPUTS, input_sha256)

    def read_input(self, input_sha256: str) -> bytes:
        return self.read(INPUTS, input_sha256)

    def put_output(self, key: str, png: bytes) -> None:
        self.write(RESULTS, key, png)

    def read_output(self, key: str) -> bytes:
        return self.read(RESULTS, key)

    def delete_if_unused(self, entry: Entry, now: float) -> bool:
        """Delete a scanned entry unless it was used since the scan or within PRUNE_MIN_IDLE."""
        current = self.stat(entry.kind, entry.name)
        if current is None or current.mtime > entry.mtime:
            return False
        if now - current.mtime < defaults.PRUNE_MIN_IDLE:
            return False
        self.delete(entry.kind, entry.name)
        return True
