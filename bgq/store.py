"""The shared store: content-addressed input blobs and result PNGs, written atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

from bgq import contract, defaults
from bgq.errors import StoreError

FILE_MODE = 0o644  # results are read by other processes and users (api, flower, ops)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that no reader ever sees a partial file.

    A temporary file in the same directory is written and fsynced, then renamed over `path`;
    the directory is fsynced so the rename survives a crash.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), FILE_MODE)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Store:
    """The store under one root directory (BGQ_HOME/store), laid out by bgq.contract."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def input_path(self, input_sha256: str) -> Path:
        return contract.input_path(self.root, input_sha256)

    def output_path(self, key: str) -> Path:
        return contract.output_path(self.root, key)

    def has_output(self, key: str) -> bool:
        return self.output_path(key).is_file()

    def use_output(self, key: str) -> bool:
        """True if the result exists; then record this use as its mtime (prune's LRU clock).

        Access times are unreliable (noatime mounts), so a hit stamps the mtime itself, at most
        once per USE_RESOLUTION seconds per result. A read-only store is not stamped.
        """
        path = self.output_path(key)
        try:
            mtime = path.stat().st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return False
        if time.time() - mtime > defaults.USE_RESOLUTION:
            with contextlib.suppress(OSError):
                os.utime(path)
        return True

    def put_input(self, input_sha256: str, data: bytes) -> Path:
        """Store an input blob once; content addressing makes an existing blob correct.

        An existing blob is touched, so that prune's grace period covers this new job too.
        """
        path = self.input_path(input_sha256)
        try:
            os.utime(path)
        except FileNotFoundError:
            self._write(path, data)
        except OSError as exc:
            raise StoreError(f"cannot touch {path}: {exc}") from exc
        return path

    def put_output(self, key: str, png: bytes) -> Path:
        path = self.output_path(key)
        self._write(path, png)
        return path

    def read_input(self, input_sha256: str) -> bytes:
        path = self.input_path(input_sha256)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise StoreError(
                f"input blob {path} not found: producer and workers must share BGQ_HOME's store"
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        try:
            atomic_write(path, data)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc}") from exc
