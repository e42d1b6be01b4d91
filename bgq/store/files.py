"""The filesystem store: a directory every process sees (one machine, or a shared volume/NFS)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bgq import defaults
from bgq.contract import RESULTS, object_name
from bgq.errors import ConfigError, NotInStore, StoreError
from bgq.fileio import atomic_write, is_temporary, link_or_copy
from bgq.store.base import Entry, Store


class FileStore(Store):
    """The store under one root directory, laid out by `object_name`."""

    def __init__(self, root: Path, setting: str = "BGQ_HOME") -> None:
        super().__init__()
        self.root = root
        self.url = str(root)
        self.setting = setting  # named in errors: the variable that chose this directory

    def path(self, kind: str, name: str) -> Path:
        return self.root / object_name(kind, name)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".check.", suffix=".tmp"):
                pass
        except OSError as exc:
            raise ConfigError(
                f"{self.setting}: the store {self.root} is not writable: {exc.strerror or exc}"
            ) from None

    def stat(self, kind: str, name: str) -> Entry | None:
        try:
            st = self.path(kind, name).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StoreError(f"cannot stat {self.path(kind, name)}: {exc}") from exc
        return Entry(kind, name, st.st_size, st.st_mtime)

    def read(self, kind: str, name: str) -> bytes:
        path = self.path(kind, name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise NotInStore(f"{path} not found in the store") from None
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc

    def write(self, kind: str, name: str, data: bytes) -> None:
        path = self.path(kind, name)
        try:
            atomic_write(path, data)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc}") from exc

    def touch(self, kind: str, name: str) -> None:
        try:
            os.utime(self.path(kind, name))
        except OSError as exc:
            raise StoreError(f"cannot touch {self.path(kind, name)}: {exc}") from exc

    def delete(self, kind: str, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(kind, name).unlink()

    def scan(self, kind: str) -> Iterator[Entry]:
        for dirpath, dirnames, filenames in os.walk(self.root / kind):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for base in filenames:
                if base.startswith("."):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = Path(dirpath, base).stat()
                    yield Entry(kind, base, st.st_size, st.st_mtime)

    def chunks(self, name: str) -> Iterator[bytes]:
        path = self.path(RESULTS, name)
        try:
            with path.open("rb") as fh:
                while piece := fh.read(defaults.STORE_STREAM_CHUNK):
                    yield piece
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc

    def save(self, name: str, dest: Path, link: bool = False) -> None:
        if not link:
            super().save(name, dest)
            return
        try:
            link_or_copy(self.path(RESULTS, name), dest)
        except FileNotFoundError:
            raise NotInStore(f"{self.path(RESULTS, name)} not found in the store") from None
        except OSError as exc:
            raise StoreError(f"cannot write {dest}: {exc}") from exc

    def local_path(self, name: str) -> Path:
        return self.path(RESULTS, name)

    def remove_temporaries(self, older_than: float, now: float, dry_run: bool) -> int:
        removed = 0
        for dirpath, _, filenames in os.walk(self.root):
            for base in filenames:
                if not is_temporary(base):
                    continue
                path = Path(dirpath, base)
                with contextlib.suppress(FileNotFoundError):
                    if now - path.stat().st_mtime > older_than:
                        if not dry_run:
                            path.unlink()
                        removed += 1
        return removed
