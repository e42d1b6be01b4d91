"""The shared store: atomic writes, file mode, content-addressed inputs, results."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from bgq import contract, store
from bgq.errors import StoreError, TransientError
from bgq.store import FILE_MODE, Store, atomic_write

DIGEST = contract.input_digest(b"input")


def fail_fsync(fd: int) -> None:
    raise OSError(5, "simulated I/O error")


@pytest.fixture
def blobs(tmp_path: Path) -> Store:
    return Store(tmp_path / "blobs")


@pytest.fixture
def strict_umask() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def test_atomic_write_writes_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "out.png"
    atomic_write(path, b"payload")
    assert path.read_bytes() == b"payload"
    assert os.listdir(path.parent) == ["out.png"]


def test_atomic_write_replaces_existing_content(tmp_path: Path) -> None:
    path = tmp_path / "out.png"
    atomic_write(path, b"old")
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.png"]


@pytest.mark.usefixtures("strict_umask")
def test_atomic_write_sets_mode_644_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "out.png"
    atomic_write(path, b"x")
    assert FILE_MODE == 0o644
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_failed_write_leaves_no_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "out.png"
    monkeypatch.setattr(os, "fsync", fail_fsync)
    with pytest.raises(OSError, match="simulated"):
        atomic_write(path, b"partial")
    assert not path.exists()
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_the_old_content(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "out.png"
    atomic_write(path, b"old")
    monkeypatch.setattr(os, "fsync", fail_fsync)
    with pytest.raises(OSError, match="simulated"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_interrupted_write_cleans_up(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def interrupt(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "out.png", b"x")
    assert os.listdir(tmp_path) == []


def test_store_paths_follow_the_contract(blobs: Store) -> None:
    assert blobs.input_path(DIGEST) == contract.input_path(blobs.root, DIGEST)
    assert blobs.output_path("ab" * 32) == contract.output_path(blobs.root, "ab" * 32)


def test_put_input_then_read_input(blobs: Store) -> None:
    path = blobs.put_input(DIGEST, b"input")
    assert path == blobs.root / "inputs" / DIGEST[:2] / DIGEST[2:4] / DIGEST
    assert blobs.read_input(DIGEST) == b"input"


def test_put_input_is_idempotent(blobs: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    first = blobs.put_input(DIGEST, b"input")

    def no_rewrite(path: Path, data: bytes) -> None:
        raise AssertionError("an existing input blob must not be rewritten")

    monkeypatch.setattr(store, "atomic_write", no_rewrite)
    assert blobs.put_input(DIGEST, b"input") == first
    assert blobs.read_input(DIGEST) == b"input"


def test_read_input_of_a_missing_blob_is_a_transient_store_error(blobs: Store) -> None:
    with pytest.raises(StoreError, match="store") as info:
        blobs.read_input(DIGEST)
    assert isinstance(info.value, TransientError)
    assert DIGEST in str(info.value)


def test_read_input_of_an_unreadable_blob_is_a_store_error(blobs: Store) -> None:
    blobs.input_path(DIGEST).mkdir(parents=True)
    with pytest.raises(StoreError, match="cannot read"):
        blobs.read_input(DIGEST)


def test_put_output_then_has_output(blobs: Store) -> None:
    key = "cd" * 32
    assert not blobs.has_output(key)
    path = blobs.put_output(key, b"\x89PNG fake")
    assert path == blobs.output_path(key)
    assert path.read_bytes() == b"\x89PNG fake"
    assert blobs.has_output(key)
    assert not blobs.has_output("ef" * 32)


def test_put_output_overwrites_a_previous_result(blobs: Store) -> None:
    key = "cd" * 32
    blobs.put_output(key, b"one")
    blobs.put_output(key, b"two")
    assert blobs.output_path(key).read_bytes() == b"two"


def test_a_failed_store_write_is_a_store_error(
    blobs: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "cd" * 32
    monkeypatch.setattr(os, "fsync", fail_fsync)
    with pytest.raises(StoreError, match="cannot write"):
        blobs.put_output(key, b"png")
    assert not blobs.has_output(key)
    assert os.listdir(blobs.output_path(key).parent) == []
