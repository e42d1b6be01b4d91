"""Cache-hit counts reach Redis: at a one-shot `bgq submit`'s exit, at close(), on a timer."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis

from bgq import defaults
from bgq.contract import Counter, TaskArgs, input_digest
from bgq.errors import PermanentError
from bgq.options import Options
from bgq.settings import Settings, settings_env
from bgq.stack import LocalStack
from producer import Producer, client
from tests.helpers import bgq, stats, variant, wait_for


def hits(client: redis.Redis) -> int:
    return stats(client).get(Counter.CACHE_HITS, 0)


def test_one_shot_submit_counts_its_hit(
    stack: LocalStack, redis_client: redis.Redis, env: dict[str, str], tmp_path: Path
) -> None:
    env = {**env, **settings_env(stack.settings)}
    image = tmp_path / "a.jpg"
    image.write_bytes(variant("car-1.jpg", (10, 10, 170, 150)))
    first = bgq("submit", str(image), env=env)
    assert first.returncode == 0 and "cached: no" in first.stdout, first.stderr
    before = hits(redis_client)
    second = bgq("submit", str(image), "--out", str(tmp_path / "b.png"), env=env)
    assert second.returncode == 0 and "cached: yes" in second.stdout, second.stderr
    assert hits(redis_client) == before + 1  # at once: flushed when the process exited


def test_close_and_with_block_flush(stack: LocalStack, redis_client: redis.Redis) -> None:
    data = variant("car-1.jpg", (30, 10, 190, 150))
    with Producer(stack.settings) as producer:
        producer.submit(data).wait(timeout=120)
        before = hits(redis_client)
        for _ in range(3):
            assert producer.submit(data).cached
    assert hits(redis_client) == before + 3


def test_a_long_lived_producer_flushes_without_another_submit(
    stack: LocalStack, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch lasts an hour here, however slow the machine: the hit below is never written at
    # once (as the next hit after an interval would be); its timer, made to fire at once, is.
    monkeypatch.setattr(defaults, "STATS_FLUSH_INTERVAL", 3600.0)
    data = variant("car-1.jpg", (50, 10, 210, 150))
    producer = Producer(stack.settings)
    timer_fired, let_flush = threading.Event(), threading.Event()
    timed_flush, new_timer = producer._timed_flush, producer._new_timer

    def prompt_timer() -> threading.Timer:
        """The producer's own timer (armed for the interval), started with no wait."""
        timer = new_timer()
        assert timer.interval == defaults.STATS_FLUSH_INTERVAL
        timer.interval = 0
        return timer

    def held_timed_flush() -> None:
        """The timer's flush, held until the test has read the counters (30 s at most)."""
        timer_fired.set()
        let_flush.wait(timeout=30)
        timed_flush()

    monkeypatch.setattr(producer, "_timed_flush", held_timed_flush)
    monkeypatch.setattr(producer, "_new_timer", prompt_timer)
    try:
        producer.submit(data).wait(timeout=120)
        before = hits(redis_client)
        producer.flush_stats()  # a batch starts: hits within the interval are only counted here
        assert producer.submit(data).cached
        assert hits(redis_client) == before  # batched, not written per hit
        let_flush.set()
        wait_for(lambda: hits(redis_client) == before + 1, timeout=30, what="the timed flush")
        assert timer_fired.is_set()  # written by the timer, with no further submit
    finally:
        let_flush.set()
        producer.close()


def test_a_closed_producer_refuses_submits_and_counts_nothing(tmp_path: Path) -> None:
    """Even a submit that would be a cache hit (no Redis needed) is refused after close()."""
    producer = Producer(Settings(home=tmp_path))
    data = variant("car-1.jpg", (70, 10, 230, 150))
    args = TaskArgs.build(input_digest(data), producer.settings.model, Options())
    producer.store.put_output(args.output, b"a stored result")
    producer.close()
    with pytest.raises(PermanentError, match="closed"):
        producer.submit(data)
    with pytest.raises(PermanentError, match="closed"):
        producer.submit_many([data])
    assert producer._hits == 0 and producer._timer is None
    assert producer not in client._unflushed  # nothing left for the exit's flush either


def test_hits_a_close_could_not_flush_stay_for_the_exit_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() with no Redis to reach keeps the hit counted, and the exit's flush retries it."""
    monkeypatch.delenv("BGQ_REDIS_URL", raising=False)
    producer = Producer(Settings(home=tmp_path))  # no BGQ_REDIS_URL, no `bgq up`: no Redis
    data = variant("car-1.jpg", (80, 20, 240, 160))
    args = TaskArgs.build(input_digest(data), producer.settings.model, Options())
    producer.store.put_output(args.output, b"a stored result")
    assert producer.submit(data).cached
    producer.close()
    assert producer._hits == 1
    assert producer in client._unflushed
    client._unflushed.discard(producer)  # this test's producer: not for the real exit's flush
