"""The store interface: content-addressed inputs, masks and results, one backend per module.

Backends implement a few primitives on (kind, name) pairs; the store's rules (write inputs once,
stamp a result's or a mask's last use when it is used, delete only what was not used since it
was scanned) live here, once, on top of them. Results and masks are named with their
extension (`contract.result_name`, `contract.mask_name`). Callers hold a `Store` and never
ask which backend it is, except for the features that only one has (a local path to
hard-link, a presigned URL).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bgq import defaults
from bgq.contract import INPUTS, RESULTS, object_name, result_names
from bgq.errors import ConfigError, StoreError
from bgq.fileio import atomic_write


@dataclass(frozen=True)
class Entry:
    """One object of the store; `mtime` is its last write or recorded use (prune's LRU clock)."""

    kind: str  # INPUTS, MASKS or RESULTS
    name: str  # input digest, or a mask's or result's name
    size: int
    mtime: float


class Store(abc.ABC):
    """Where inputs and results live; `url` says where, for messages (never with secrets)."""

    url: str

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], float] = {}  # (kind, name) -> last use we saw

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

    def chunks(self, name: str) -> Iterator[bytes]:
        """A result's bytes in pieces, for streaming it out."""
        yield self.read(RESULTS, name)

    def save(self, name: str, dest: Path, link: bool = False) -> None:
        """Put a result at the local path `dest` atomically (never a partial file).

        With `link`, a filesystem store may hard-link instead of copying (ingest's outputs).
        """
        try:
            atomic_write(dest, self.read(RESULTS, name))
        except OSError as exc:
            raise StoreError(f"cannot write {dest}: {exc}") from exc

    def local_path(self, name: str) -> Path | None:
        """The result as a local file, on a filesystem store; None on object storage."""
        return None

    def s3_object(self, name: str) -> tuple[str, str] | None:
        """(bucket, object key) of a result on S3, for server-side copies; None elsewhere."""
        return None

    def presigned_url(self, name: str, seconds: int) -> str | None:
        """A URL that serves the result for `seconds` without credentials; None if unsupported."""
        return None

    def remove_temporaries(self, older_than: float, now: float, dry_run: bool) -> int:
        """Remove leftovers of interrupted writes older than `older_than` seconds."""
        return 0

    # -- the store's rules, shared by every backend ----------------------------------------

    def location(self, name: str) -> Path | str:
        """Where a result is: its local Path, or its URL on object storage."""
        return self.local_path(name) or f"{self.url.rstrip('/')}/{object_name(RESULTS, name)}"

    def has_output(self, name: str) -> bool:
        return self.stat(RESULTS, name) is not None

    def use_output(self, name: str) -> bool:
        """True if the result exists; then record this use (see `use`)."""
        return self.use(RESULTS, name)

    def use(self, kind: str, name: str) -> bool:
        """True if the object exists; then record this use (at most once per USE_RESOLUTION s).

        The last use is prune's LRU clock. A store that refuses the stamp (read-only) still
        answers the hit; an object that vanished while it was stamped is a miss. One this
        process saw used less than USE_RESOLUTION seconds ago is trusted without asking the
        store again: prune never deletes one used in the last PRUNE_MIN_IDLE seconds, which is
        longer.
        """
        seen = self._seen.get((kind, name))
        if seen is not None and time.time() - seen < defaults.USE_RESOLUTION:
            return True
        entry = self.stat(kind, name)
        if entry is None:
            self._seen.pop((kind, name), None)
            return False
        used = min(entry.mtime, time.time())  # a store clock ahead of ours never extends trust
        if time.time() - used > defaults.USE_RESOLUTION:
            try:
                self.touch(kind, name)
                used = time.time()
            except (StoreError, ConfigError):  # refused (read-only), or deleted meanwhile
                if self.stat(kind, name) is None:
                    return False
        if len(self._seen) >= defaults.SEEN_RESULTS:
            self._seen.clear()
        self._seen[(kind, name)] = used
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

    def put_output(self, name: str, data: bytes) -> None:
        self.write(RESULTS, name, data)

    def read_output(self, name: str) -> bytes:
        return self.read(RESULTS, name)

    def use_result(self, key: str) -> str | None:
        """The name of `key`'s result, in whichever format it was made, recording a use."""
        return next((name for name in result_names(key) if self.use(RESULTS, name)), None)

    def find_output(self, key: str) -> Entry | None:
        """The result of `key` in whichever format it was made (for lookups by job id alone)."""
        for name in result_names(key):
            entry = self.stat(RESULTS, name)
            if entry is not None:
                return entry
        return None

    def delete_if_unused(self, entry: Entry, now: float) -> bool:
        """Delete a scanned entry unless it was used since the scan or within PRUNE_MIN_IDLE."""
        current = self.stat(entry.kind, entry.name)
        if current is None or current.mtime > entry.mtime:
            return False
        if now - current.mtime < defaults.PRUNE_MIN_IDLE:
            return False
        self.delete(entry.kind, entry.name)
        return True
