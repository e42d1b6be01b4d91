"""Through the whole queue: producer -> Redis -> prefork worker -> store, with the real model."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pytest
import redis
from PIL import Image

from bgq import contract
from bgq.contract import Counter, TaskArgs
from bgq.errors import ImageTooLarge, InvalidImage, JobFailed
from bgq.options import Options
from bgq.stack import LocalStack
from bgq.store import open_store
from producer import Producer
from tests.helpers import (
    GOLDEN,
    SAMPLES,
    inspect_worker,
    pixels,
    sample_bytes,
    settle,
    stats,
    variant,
    wait_for,
)
from tests.stacks import both_stores

PARITY_CASES = [
    ("anime-girl-1.jpg", {}),
    ("car-1.jpg", {}),
    ("cloth-1.jpg", {}),
    ("plants-1.jpg", {}),  # RGBA content behind a .jpg name
    ("car-1.jpg", {"alpha_matting": True, "alpha_matting_erode_size": 5}),
    ("plants-1.jpg", {"only_mask": True, "post_process_mask": True}),
    ("cloth-1.jpg", {"bgcolor": (255, 255, 255, 255), "post_process_mask": True}),
]


@both_stores
@pytest.mark.parametrize(("name", "options"), PARITY_CASES, ids=lambda v: str(v))
def test_pixels_identical_to_rembg(
    producer: Producer, reference: Any, name: str, options: dict[str, Any]
) -> None:
    data = sample_bytes(name)
    result = producer.submit(data, model="u2netp", **options).read(timeout=120)
    got_mode, got = pixels(result)
    want_mode, want = pixels(reference(data, **options))
    assert got_mode == want_mode
    assert got.shape == want.shape
    assert np.array_equal(got, want)


@both_stores
def test_rembg_golden_phash_through_the_queue(producer: Producer) -> None:
    """rembg's own test (phash of anime-girl-1 with u2netp), run through the queue."""
    job = producer.submit(SAMPLES / "anime-girl-1.jpg", model="u2netp")
    result = io.BytesIO(job.read(timeout=120))
    assert imagehash.phash(Image.open(result)) == imagehash.phash(Image.open(GOLDEN))


@both_stores
def test_cache_hit_sends_nothing_to_the_broker(
    stack: LocalStack, producer: Producer, redis_client: redis.Redis
) -> None:
    data = variant("car-1.jpg", (10, 10, 330, 250))
    first = producer.submit(data)
    assert not first.cached
    path = first.wait(timeout=120)
    settle(redis_client, first.key)

    def published() -> int:
        cmd = redis_client.info("commandstats").get("cmdstat_lpush", {})
        return int(cmd.get("calls", 0))

    before, before_stats = published(), stats(redis_client)
    again = producer.submit(data)
    assert again.cached and again.key == first.key
    assert again.wait(timeout=1) == path
    assert published() == before
    after = stats(redis_client)
    hits = after.pop(Counter.CACHE_HITS, 0) - before_stats.pop(Counter.CACHE_HITS, 0)
    assert after == before_stats and hits in (0, 1)  # a hit is only counted, in batches
    assert redis_client.llen(contract.QUEUE) == 0

    # Stronger: a producer whose broker does not even exist still answers a cache hit.
    offline = Producer(stack.settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
    assert offline.submit(data).wait(timeout=1) == path


@both_stores
def test_concurrent_identical_submits_run_one_inference(
    stack: LocalStack, redis_client: redis.Redis
) -> None:
    data = variant("cloth-1.jpg", (0, 100, 600, 900))
    n = 12
    barrier = threading.Barrier(n)
    jobs: list[Any] = [None] * n

    def submit(i: int) -> None:
        producer = Producer(stack.settings)  # an independent producer per thread
        barrier.wait()
        jobs[i] = producer.submit(data)

    before = stats(redis_client).get(Counter.COMPUTED, 0)
    threads = [threading.Thread(target=submit, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    paths = {job.wait(timeout=120) for job in jobs}
    assert len({job.key for job in jobs}) == 1
    assert len(paths) == 1
    settle(redis_client, jobs[0].key)
    assert stats(redis_client).get(Counter.COMPUTED, 0) - before == 1


def send_by_name(stack: LocalStack, data: bytes, **options: Any) -> Any:
    """Enqueue like a non-Python caller would: blob into the store, then the task by name."""
    app = Producer(stack.settings).app
    sha = contract.input_digest(data)
    open_store(stack.settings).put_input(sha, data)
    args = TaskArgs.build(sha, "u2netp", Options.parse(options))
    app.backend.client.set(contract.guard_key(args.key), "1", nx=True)
    return app.send_task(contract.TASK_NAME, kwargs=args.to_kwargs(), task_id=args.key)


def accepted(stack: LocalStack) -> int:
    app = Producer(stack.settings).app
    return sum(inspect_worker(app, stack.hostname, "stats")["total"].values())


def big_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, "PNG")  # 81 MP, a few KB of PNG
    return buf.getvalue()


@both_stores
@pytest.mark.parametrize(
    ("data", "error", "words"),
    [
        (b"", "InvalidImage", "empty"),
        (os.urandom(4096), "InvalidImage", "not a recognised image"),
        (sample_bytes("car-1.jpg")[:30000], "InvalidImage", "truncated"),
        (big_png(), "ImageTooLarge", "megapixels"),
    ],
    ids=["empty", "random-bytes", "truncated-jpeg", "too-many-megapixels"],
)
def test_bad_input_fails_permanently_without_retry(
    stack: LocalStack, redis_client: redis.Redis, data: bytes, error: str, words: str
) -> None:
    before_accepted, before_failed = accepted(stack), stats(redis_client).get(Counter.FAILED, 0)
    result = send_by_name(stack, data)
    wait_for(result.ready, timeout=60, what="the failure")  # no .get(): its subscription leaks
    assert result.state == "FAILURE"
    assert type(result.result).__name__ == error
    assert words in str(result.result)
    settle(redis_client, result.id)  # the guard is released once the failure is stored
    assert accepted(stack) - before_accepted == 1  # a retry would be accepted again
    assert stats(redis_client).get(Counter.FAILED, 0) - before_failed == 1
    # ...and the worker goes on serving.
    good = send_by_name(stack, variant("car-1.jpg", (0, 0, 200 + len(data) % 97, 150)))
    wait_for(good.ready, timeout=120, what="the good job")
    assert good.result["computed"] is True


@both_stores
def test_producer_rejects_bad_input_before_enqueueing(producer: Producer) -> None:
    with pytest.raises(InvalidImage, match="empty"):
        producer.submit(b"")
    with pytest.raises(InvalidImage, match="not a recognised image"):
        producer.submit(b"%PDF-1.4 not an image at all")
    with pytest.raises(ImageTooLarge):
        producer.submit(big_png())
    truncated = producer.submit(sample_bytes("anime-girl-1.jpg")[:20000])
    with pytest.raises(JobFailed, match="truncated") as failure:
        truncated.wait(timeout=60)
    assert failure.value.permanent


@both_stores
def test_submit_many_keeps_going_past_bad_images(producer: Producer, tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    good = tmp_path / "good.png"
    good.write_bytes(variant("anime-girl-1.jpg", (50, 50, 400, 400), "PNG"))
    jobs = producer.submit_many([text, tmp_path / "missing.jpg", good])
    assert [j.source for j in jobs] == [str(text), str(tmp_path / "missing.jpg"), str(good)]
    with pytest.raises(InvalidImage):
        jobs[0].wait()
    with pytest.raises(Exception, match="cannot read"):
        jobs[1].wait()
    assert jobs[2].read(timeout=120).startswith(b"\x89PNG")


def test_result_png_is_written_atomically(stack: LocalStack, producer: Producer) -> None:
    """On the filesystem store (on S3 one PUT is atomic by itself)."""
    path = producer.submit(variant("plants-1.jpg", (0, 0, 500, 500), "PNG")).wait(timeout=120)
    leftovers = [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
