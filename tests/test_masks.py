"""One inference, many outputs: masks are computed once per (input, model) and kept in the store."""

from __future__ import annotations

import io
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from bgq import cache, contract, defaults
from bgq.contract import INPUTS, MASKS, RESULTS, Counter
from bgq.exporter import Exporter
from bgq.options import Options
from bgq.stack import LocalStack
from bgq.store import FileStore, Store
from producer import Producer
from tests.helpers import Gate, bgq, pixels, settle, stats, variant
from tests.stacks import both_stores
from workers import masks, shaping

# Variants of one photo: each is its own job and cache entry, all from the same masks.
VARIANTS: list[dict[str, Any]] = [
    {},
    {"bgcolor": (255, 255, 255, 255)},
    {"only_mask": True},
    {"post_process_mask": True},
    {"alpha_matting": True, "alpha_matting_erode_size": 5},
    {"format": "webp"},
    {"format": "jpeg", "quality": 80},
    {"format": "webp", "quality": 60, "bgcolor": (0, 0, 255, 128)},
    {"crop": True, "crop_margin": "5%"},
    {"crop": True, "crop_margin": "12px", "format": "jpeg", "bgcolor": (240, 240, 240, 255)},
    {"canvas": "400x400", "padding": "5%", "position": "bottom", "bgcolor": (255, 255, 255, 255)},
    {"crop": True, "canvas": "300x500", "padding": "20px", "position": "top", "format": "webp"},
    {"crop": True, "canvas": "500x300", "format": "jpeg", "quality": 70},
    {"only_mask": True, "crop": True, "canvas": "256x256", "padding": "10%"},
    {"post_process_mask": True, "crop": True, "canvas": "320x320", "format": "webp"},
    {"alpha_matting": True, "crop": True, "crop_margin": "10%", "canvas": "300x300"},
]


def expected(reference: Any, data: bytes, values: dict[str, Any]) -> bytes:
    """What the output should be: rembg.remove() here, then the documented shaping."""
    options = Options.parse(values)
    cutout = Image.open(io.BytesIO(reference(data, **options.rembg_kwargs())))
    return shaping.render(cutout, options, "pillow", 6)


def inferences(client: redis.Redis) -> int:
    return stats(client).get(Counter.INFERENCES, 0)


def finish(producer: Producer, client: redis.Redis, jobs: list[Any]) -> list[bytes]:
    results = [job.read(timeout=180) for job in jobs]
    for job in jobs:
        settle(client, job.key)
    return results


@both_stores
def test_variants_submitted_together_run_the_model_once(
    stack: LocalStack, producer: Producer, redis_client: redis.Redis, reference: Any
) -> None:
    data = variant("car-1.jpg", (0, 0, 400, 300))
    before = inferences(redis_client)
    jobs = [producer.submit(data, **options) for options in VARIANTS]
    assert len({job.key for job in jobs}) == len(VARIANTS)  # one cache entry per variant
    results = finish(producer, redis_client, jobs)
    assert inferences(redis_client) - before == 1
    for options, result in zip(VARIANTS, results, strict=True):
        # Derived from stored masks: rembg.remove()'s output exactly, shaped as documented.
        assert np.array_equal(pixels(result)[1], pixels(expected(reference, data, options))[1])
    digest = contract.input_digest(data)
    assert producer.store.stat(MASKS, contract.mask_name(digest, "u2netp")) is not None
    exporter = Exporter(stack.settings, "127.0.0.1", 0)
    try:
        text = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics").text
    finally:
        exporter.stop()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("bgq_inferences_total ")]
    assert float(line.split()[1]) == inferences(redis_client)


@both_stores
def test_a_later_variant_reuses_the_stored_masks_and_a_lost_one_is_remade(
    producer: Producer, redis_client: redis.Redis, reference: Any
) -> None:
    data = variant("anime-girl-1.jpg", (0, 0, 600, 500))
    name = contract.mask_name(contract.input_digest(data), "u2netp")
    before = inferences(redis_client)
    finish(producer, redis_client, [producer.submit(data)])
    finish(producer, redis_client, [producer.submit(data, only_mask=True)])
    assert inferences(redis_client) - before == 1

    producer.store.write(MASKS, name, b"not a png")  # corrupt: the model runs again
    (got,) = finish(producer, redis_client, [producer.submit(data, post_process_mask=True)])
    assert inferences(redis_client) - before == 2
    assert np.array_equal(pixels(got)[1], pixels(reference(data, post_process_mask=True))[1])

    producer.store.delete(MASKS, name)  # pruned: made again
    (got,) = finish(producer, redis_client, [producer.submit(data, bgcolor=(0, 0, 0, 255))])
    assert inferences(redis_client) - before == 3
    assert np.array_equal(pixels(got)[1], pixels(reference(data, bgcolor=(0, 0, 0, 255)))[1])
    assert producer.store.stat(MASKS, name) is not None


def test_masks_stack_and_unstack_losslessly() -> None:
    rng = np.random.default_rng(7)
    sheets = [Image.fromarray(rng.integers(0, 256, (30, 40), np.uint8), "L") for _ in range(3)]
    for group in (sheets[:1], sheets):
        data = masks.stack(group)
        assert data is not None
        back = masks.unstack(data, (40, 30))
        assert back is not None and len(back) == len(group)
        assert all(
            np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(group, back, strict=True)
        )
    assert masks.unstack(masks.stack(sheets) or b"", (40, 31)) is None  # not this image's
    assert masks.unstack(b"junk", (40, 30)) is None
    assert masks.stack([sheets[0].convert("RGB")]) is None  # would not come back the same


def test_prune_treats_masks_like_results_and_keeps_those_in_flight(
    store: Store, redis_client: redis.Redis
) -> None:
    old_mask = contract.mask_name("a" * 64, "u2netp")
    busy_mask = contract.mask_name("b" * 64, "u2netp")
    old_result = contract.result_name("c" * 64, "webp")
    for kind, name in ((MASKS, old_mask), (MASKS, busy_mask), (RESULTS, old_result)):
        store.write(kind, name, b"x" * 100)
    redis_client.sadd(contract.input_refs_key("b" * 64), "some-job")  # a job in flight needs it
    try:
        report = cache.prune(store, redis_client, max_age=86400, now=time.time() + 2 * 86400)
    finally:
        redis_client.delete(contract.input_refs_key("b" * 64))
    assert store.stat(MASKS, old_mask) is None and store.stat(RESULTS, old_result) is None
    assert store.stat(MASKS, busy_mask) is not None
    assert (report.removed, report.masks_removed, report.skipped_in_flight) == (2, 1, 1)
    assert (cache.store_stats(store).masks, cache.store_stats(store).results) == (1, 0)


class CountingSession:
    """A stand-in model: one mask per image, counting its runs."""

    def __init__(self) -> None:
        self.runs = 0

    def predict(self, img: Image.Image, *args: Any, **kwargs: Any) -> list[Image.Image]:
        self.runs += 1
        time.sleep(0.3)
        return [Image.new("L", img.size, 200)]


def source(store: Store, client: redis.Redis, model: CountingSession, owner: str) -> Any:
    return masks.MaskSource(store, "m" * 64 + "-u2netp-v1.png", lambda: model, client, owner)


def test_concurrent_variants_wait_for_one_model_run(
    tmp_path: Path, redis_client: redis.Redis
) -> None:
    store, model = FileStore(tmp_path), CountingSession()
    img = Image.new("RGB", (40, 30))
    got: list[Any] = []
    threads = [
        threading.Thread(
            target=lambda o=owner: got.append(source(store, redis_client, model, o).predict(img))
        )
        for owner in ("job-a", "job-b", "job-c")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert model.runs == 1 and len(got) == 3
    assert not redis_client.keys(contract.mask_lock_key("*"))  # released


def test_a_dead_delivery_s_lock_is_taken_over_by_its_redelivery(
    tmp_path: Path, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(defaults, "MASK_WAIT", 5.0)
    store, model = FileStore(tmp_path), CountingSession()
    key = contract.mask_lock_key("m" * 64 + "-u2netp-v1.png")
    redis_client.set(key, "job-a", ex=60)  # job-a's process died holding it
    start = time.monotonic()
    source(store, redis_client, model, "job-a").predict(Image.new("RGB", (4, 3)))
    # The bug: waiting its own dead lock out (MASK_WAIT, 5 s here; the lock's TTL is longer).
    assert time.monotonic() - start < defaults.MASK_WAIT and model.runs == 1
    assert not redis_client.exists(key)
    start = time.monotonic()  # before the lock's TTL starts: its whole second is counted below
    redis_client.set(key, "job-x", ex=1)  # another job's lock: waited for, until it expires
    store.delete(MASKS, "m" * 64 + "-u2netp-v1.png")
    source(store, redis_client, model, "job-b").predict(Image.new("RGB", (4, 3)))
    assert time.monotonic() - start > 0.8 and model.runs == 2


def test_a_redelivery_takes_over_the_lock_of_its_killed_predecessor(
    stack: LocalStack, producer: Producer, redis_client: redis.Redis, reference: Any
) -> None:
    """A pool process SIGKILLed while it holds a mask's lock (as the OOM killer would): the
    redelivered job takes the lock at once, not after MASK_WAIT, and runs the model once."""
    data = variant("cloth-1.jpg", (0, 0, 420, 380))
    name = contract.mask_name(contract.input_digest(data), "u2netp")
    lock = contract.mask_lock_key(name)
    assert isinstance(producer.store, FileStore) and stack.worker is not None
    gate = Gate(producer.store.path(MASKS, name))  # its lookup of stored masks, under the lock
    before = inferences(redis_client)
    try:
        job = producer.submit(data)
        gate.wait_for_reader()  # the pool process is in the lookup, holding the lock
        assert redis_client.get(lock) == job.key.encode()
        holder = gate.reader(stack.worker.pid)
        gate.path.unlink()  # the redelivery finds no stored masks; the holder stays blocked
        holder.kill()
        holder.wait(timeout=30)
        assert redis_client.get(lock) == job.key.encode()  # it died holding the lock
        gate.close()
        # Waiting for the dead lock would take MASK_WAIT (its TTL is as long).
        got = job.read(timeout=defaults.MASK_WAIT / 2)
    finally:
        gate.remove()
    settle(redis_client, job.key)
    assert inferences(redis_client) - before == 1
    assert not redis_client.exists(lock)
    assert stack.log is not None and f"masks {name} still locked" not in stack.log.read_text()
    assert np.array_equal(pixels(got)[1], pixels(reference(data))[1])


def test_a_prune_while_a_job_runs_keeps_its_input_and_masks(
    stack: LocalStack,
    producer: Producer,
    redis_client: redis.Redis,
    reference: Any,
    env: dict[str, str],
) -> None:
    """`bgq cache prune` while a worker runs a job, held as it reads its input: the input and
    the masks the job needs stay, though unused for days, and the job completes from them."""
    data = variant("anime-girl-1.jpg", (40, 0, 540, 460))
    first = producer.submit(data)  # makes the masks
    first.wait(timeout=120)
    settle(redis_client, first.key)
    store = producer.store
    assert isinstance(store, FileStore) and first.args is not None
    digest = first.args.input_sha256
    mask = store.path(MASKS, contract.mask_name(digest, "u2netp"))
    unused = store.path(RESULTS, first.output)  # no job needs it: prune must take it
    days_ago = time.time() - 3 * 86400
    for path in (mask, unused):
        os.utime(path, (days_ago, days_ago))
    store.path(INPUTS, digest).unlink()
    gate = Gate(store.path(INPUTS, digest))
    before = inferences(redis_client)
    white = {"bgcolor": (255, 255, 255, 255)}
    try:
        job = producer.submit(data, **white)  # the blob is there: the producer keeps the pipe
        gate.wait_for_reader()
        assert producer.task_meta(job.key)["status"] == "STARTED"
        assert redis_client.sismember(contract.input_refs_key(digest), job.key)
        os.utime(gate.path, (days_ago, days_ago))
        home = {"BGQ_REDIS_URL": stack.url, "BGQ_HOME": str(stack.settings.home)}
        pruned = bgq("cache", "prune", "--max-age", "1d", env={**env, **home})
        assert pruned.returncode == 0, pruned.stderr
        assert re.search(r"removed 1 result\(s\) and 0 mask\(s\) .*, 0 input\(s\)", pruned.stdout)
        assert "0 used in the last minute, 1 in flight" in pruned.stdout
        assert not unused.exists() and mask.exists() and gate.path.exists()
        gate.let_through(data)
        got = job.read(timeout=120)
    finally:
        gate.remove()
    settle(redis_client, job.key)
    assert inferences(redis_client) == before  # derived from the masks prune kept
    assert np.array_equal(pixels(got)[1], pixels(reference(data, **white))[1])
