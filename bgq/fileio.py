"""Writing local files whole: no reader ever sees part of one (the store, state files, weights).

Standard library only, at the bottom of bgq: the file store, the embedded Redis's state file and
model weights all write through here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

FILE_MODE = 0o644  # results are read by other processes and users (api, flower, ops)
TMP_PREFIX = "."  # a temporary file is hidden: `.<name>.<random>.tmp` beside its target
TMP_SUFFIX = ".tmp"


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that no reader ever sees a partial file.

    A temporary file in the same directory is written and fsynced, then renamed over `path`;
    the directory is fsynced so the rename survives a crash.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.", suffix=TMP_SUFFIX
    )
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


def link_or_copy(source: Path, dest: Path) -> None:
    """Put `source` at `dest` atomically: a hard link when possible, else a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        if dest.exists() and os.path.samefile(source, dest):
            return
        tmp = dest.with_name(f"{TMP_PREFIX}{dest.name}.{os.getpid()}{TMP_SUFFIX}")
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, dest)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        atomic_write(dest, source.read_bytes())


def is_temporary(name: str) -> bool:
    """Whether a file name is one of atomic_write's or link_or_copy's temporaries."""
    return name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX)
