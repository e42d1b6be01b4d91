"""The task and the producer around failure paths, against a real Redis with no worker running."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from bgq import contract
from bgq.contract import Options, TaskArgs
from bgq.errors import JobTimeout, OutOfMemory
from bgq.settings import Settings
from producer import Producer
from tests.helpers import variant


@pytest.fixture
def idle(redis_url: str, tmp_path: Path) -> Iterator[tuple[Producer, redis.Redis]]:
    """A producer on the test Redis with no worker consuming; Redis flushed afterwards."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield Producer(Settings(home=tmp_path, redis_url=redis_url)), client
    client.flushdb()
    client.close()


def test_a_waiter_requeues_a_lost_job(idle: tuple[Producer, redis.Redis]) -> None:
    producer, client = idle
    job = producer.submit(variant("car-1.jpg", (0, 0, 222, 111)))
    assert client.llen(contract.QUEUE) == 1
    client.delete(contract.QUEUE, contract.guard_key(job.key))  # e.g. Redis lost its last writes
    with pytest.raises(JobTimeout):
        job.wait(timeout=0.3)
    assert client.llen(contract.QUEUE) == 1
    assert client.exists(contract.guard_key(job.key))


def test_a_held_job_is_not_requeued(idle: tuple[Producer, redis.Redis]) -> None:
    producer, client = idle
    first = producer.submit(variant("car-1.jpg", (0, 0, 223, 111)))
    second = producer.submit(variant("car-1.jpg", (0, 0, 223, 111)))
    assert first.key == second.key
    with pytest.raises(JobTimeout):
        second.wait(timeout=0.3)
    assert client.llen(contract.QUEUE) == 1


def test_memory_error_fails_permanently_and_releases_the_guard(
    idle: tuple[Producer, redis.Redis], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """Raised as is, a MemoryError would stop the whole Celery worker (an 'unrecoverable error')."""
    _, client = idle
    monkeypatch.setenv("BGQ_REDIS_URL", redis_url)
    from workers import tasks

    def exhausted(args: TaskArgs) -> dict[str, Any]:
        raise MemoryError

    monkeypatch.setattr(tasks, "process", exhausted)
    args = TaskArgs.build("ab" * 32, "u2netp", Options())
    client.set(contract.guard_key(args.key), "1")
    result = tasks.remove_background.apply(kwargs=args.to_kwargs(), task_id=args.key)
    assert result.state == "FAILURE"
    assert isinstance(result.result, OutOfMemory)
    assert not client.exists(contract.guard_key(args.key))
    assert not client.exists(contract.attempts_key(args.key))
    assert int(client.hget(contract.STATS_KEY, "failed") or 0) == 1
