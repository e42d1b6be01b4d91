"""The shared store: atomic writes, file mode, content-addressed inputs, results."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from bench.s3server import S3Server
from bgq import contract, defaults, jobs
from bgq.contract import INPUTS, RESULTS
from bgq.errors import ConfigError, StoreError, TransientError
from bgq.fileio import FILE_MODE, atomic_write
from bgq.settings import Settings
from bgq.store import FileStore, Store, open_store
from tests.stacks import s3_settings

DIGEST = contract.input_digest(b"input")


def fail_fsync(fd: int) -> None:
    raise OSError(5, "simulated I/O error")


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


def test_layout_follows_the_contract(tmp_path: Path) -> None:
    files = FileStore(tmp_path)
    assert files.local_path("ab" * 32) == tmp_path / contract.object_name(RESULTS, "ab" * 32)
    assert files.path(INPUTS, DIGEST) == tmp_path / "inputs" / DIGEST[:2] / DIGEST[2:4] / DIGEST


def test_put_input_then_read_input(store: Store) -> None:
    store.put_input(DIGEST, b"input")
    assert store.read_input(DIGEST) == b"input"
    entry = store.stat(INPUTS, DIGEST)
    assert entry is not None and entry.size == len(b"input")


def test_put_input_writes_once(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store.put_input(DIGEST, b"input")

    write = store.write

    def no_rewrite(*args: Any, **kwargs: Any) -> None:
        if kwargs.get("if_none_match") == "*":  # a create-only PUT: the server refuses it
            return write(*args, **kwargs)
        raise AssertionError("an existing input blob must not be rewritten")

    monkeypatch.setattr(store, "write", no_rewrite)
    store.put_input(DIGEST, b"input")
    assert store.read_input(DIGEST) == b"input"


def test_read_input_of_a_missing_blob_is_a_transient_store_error(store: Store) -> None:
    with pytest.raises(StoreError, match="store") as info:
        store.read_input(DIGEST)
    assert isinstance(info.value, TransientError)
    assert DIGEST in str(info.value)


def test_read_input_of_an_unreadable_blob_is_a_store_error(tmp_path: Path) -> None:
    files = FileStore(tmp_path)
    files.path(INPUTS, DIGEST).mkdir(parents=True)
    with pytest.raises(StoreError, match="cannot read"):
        files.read_input(DIGEST)


def test_put_output_then_has_output(store: Store, tmp_path: Path) -> None:
    key = "cd" * 32
    assert not store.has_output(key)
    store.put_output(key, b"\x89PNG fake")
    assert store.read_output(key) == b"\x89PNG fake"
    assert b"".join(store.chunks(key)) == b"\x89PNG fake"
    assert store.has_output(key)
    assert not store.has_output("ef" * 32)
    assert [(e.name, e.size) for e in store.scan(RESULTS)] == [(key, 9)]
    store.save(key, tmp_path / "copy" / "out.png")
    assert (tmp_path / "copy" / "out.png").read_bytes() == b"\x89PNG fake"


def test_put_output_overwrites_a_previous_result(store: Store) -> None:
    key = "cd" * 32
    store.put_output(key, b"one")
    store.put_output(key, b"two")
    assert store.read_output(key) == b"two"


def test_a_hit_stamps_the_last_use(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    key = "cd" * 32
    store.put_output(key, b"png")
    before = store.stat(RESULTS, key)
    assert before is not None
    time.sleep(1.1)  # S3's Last-Modified has whole seconds
    assert store.use_output(key)
    unchanged = store.stat(RESULTS, key)
    assert unchanged is not None and unchanged.mtime == before.mtime  # used just now: no stamp
    monkeypatch.setattr(defaults, "USE_RESOLUTION", 0.0)
    assert store.use_output(key)
    after = store.stat(RESULTS, key)
    assert after is not None and after.mtime > before.mtime
    assert store.read_output(key) == b"png"  # the stamp keeps the bytes
    assert not store.use_output("ef" * 32)


def test_a_recent_hit_is_trusted_without_another_lookup(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "cd" * 32
    store.put_output(key, b"png")
    assert store.use_output(key)

    def no_lookup(*args: object) -> None:
        raise AssertionError("a result used seconds ago was looked up again")

    monkeypatch.setattr(store, "stat", no_lookup)
    assert store.use_output(key)
    # Safe only because prune keeps whatever was used more recently than that.
    assert defaults.USE_RESOLUTION < defaults.PRUNE_MIN_IDLE


def test_delete_if_unused_keeps_what_was_used_since_the_scan(store: Store) -> None:
    key = "cd" * 32
    store.put_output(key, b"png")
    (entry,) = store.scan(RESULTS)
    assert not store.delete_if_unused(entry, now=entry.mtime + 10)  # used within PRUNE_MIN_IDLE
    stale = dataclasses.replace(entry, mtime=entry.mtime - 5)  # scanned before a later use
    assert not store.delete_if_unused(stale, now=entry.mtime + 3600)
    assert store.delete_if_unused(entry, now=entry.mtime + 3600)
    assert not store.has_output(key)
    assert list(store.scan(RESULTS)) == []


def test_locations(store: Store) -> None:
    key = "cd" * 32 + ".webp"
    where = store.location(key)
    if isinstance(store, FileStore):
        assert where == store.local_path(key) and store.s3_object(key) is None
        assert store.presigned_url(key, 60) is None
    else:
        assert where == f"{store.url}results/cd/cd/{key}"
        assert store.local_path(key) is None
        assert store.s3_object(key) == (store.url[5:].split("/")[0], f"bgq/results/cd/cd/{key}")


def test_a_failed_store_write_is_a_store_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files, key = FileStore(tmp_path), "cd" * 32
    monkeypatch.setattr(os, "fsync", fail_fsync)
    with pytest.raises(StoreError, match="cannot write"):
        files.put_output(key, b"png")
    assert not files.has_output(key)
    assert os.listdir(files.local_path(key).parent) == []


def test_s3_inputs_are_written_once_by_a_conditional_put(
    tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new blob costs one request (PUT If-None-Match: *); an existing one is not rewritten."""
    store = open_store(Settings(home=tmp_path, **s3_settings(s3_server)))  # type: ignore[arg-type]
    calls: list[str] = []
    client = store.client  # type: ignore[attr-defined]
    client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    store.put_input(DIGEST, b"input")
    assert calls == ["PutObject"]
    store.put_input(DIGEST, b"other bytes, same digest: a race of identical content")
    assert store.read_input(DIGEST) == b"input"


@pytest.mark.parametrize(
    ("code", "raised"),
    [
        ("PreconditionFailed", None),  # the blob is there: stamped, as on any store
        ("412", None),
        ("ConditionalRequestConflict", None),  # another such PUT is under way
        ("409", None),
        ("NotImplemented", None),  # the server does not know the condition: HEAD + PUT
        ("AccessDenied", ConfigError),
        ("InternalError", StoreError),
    ],
)
def test_s3_put_input_reads_a_refused_conditional_put(
    tmp_path: Path,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
    code: str,
    raised: type[Exception] | None,
) -> None:
    store = open_store(Settings(home=tmp_path, **s3_settings(s3_server)))  # type: ignore[arg-type]
    store.put_input(DIGEST, b"input")
    write = store.write

    def refuse(kind: str, name: str, data: bytes, if_none_match: str | None = None) -> None:
        if if_none_match:
            raise ClientError({"Error": {"Code": code, "Message": "refused"}}, "PutObject")
        write(kind, name, data)

    monkeypatch.setattr(store, "write", refuse)
    if raised is None:
        store.put_input(DIGEST, b"input")
        assert store.read_input(DIGEST) == b"input"
    else:
        with pytest.raises(raised):
            store.put_input(DIGEST, b"input")


def test_a_job_record_from_another_bgq_version_still_finds_its_result(store: Store) -> None:
    """describe() needs only the recorded format, not task arguments this version accepts."""
    key = "e" * 64
    store.write(RESULTS, contract.result_name(key, "webp"), b"webp")
    record = {"args": json.dumps({"pipeline_version": "0", "options": {"format": "webp"}})}
    view = jobs.describe(key, record, {}, store)
    assert view is not None and view.status == "done"
    assert jobs.describe(key, {}, {}, store).status == "done"  # no record: any format is found
