"""The task and the producer around failure paths, against a real Redis with no worker running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu.exceptions
import pytest
import redis

from bgq import contract, defaults
from bgq.contract import Counter, TaskArgs
from bgq.errors import BrokerError, JobTimeout, OutOfMemory
from bgq.options import Options
from bgq.settings import Settings
from producer import Producer
from tests.helpers import StandInWorker, variant, wait_for


@pytest.fixture
def idle(redis_url: str, tmp_path: Path) -> Iterator[tuple[Producer, redis.Redis]]:
    """A producer on the test Redis with no worker consuming (a stand-in entry serves the
    model); Redis flushed afterwards."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    with StandInWorker(redis_url):
        yield Producer(Settings(home=tmp_path, redis_url=redis_url)), client
    client.flushdb()
    client.close()


def test_a_held_job_is_not_requeued(idle: tuple[Producer, redis.Redis]) -> None:
    producer, client = idle
    first = producer.submit(variant("car-1.jpg", (0, 0, 223, 111)))
    second = producer.submit(variant("car-1.jpg", (0, 0, 223, 111)))
    assert first.key == second.key
    with pytest.raises(JobTimeout):
        second.wait(timeout=0.3)
    assert client.llen(contract.QUEUE) == 1


def test_a_failed_send_releases_only_its_own_guard(
    idle: tuple[Producer, redis.Redis], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send that fails drops the guard it took; one that outlived its guard (which another
    producer has taken since) leaves that other guard alone."""
    client = idle[1]
    producer = Producer(idle[0].settings, retry_seconds=0)  # a failed send is final
    data = variant("car-1.jpg", (0, 0, 225, 111))
    key = TaskArgs.build(contract.input_digest(data), "u2netp", Options()).key
    guard = contract.guard_key(key)
    taken_over: list[str] = []

    def send_task(*args: Any, **kwargs: Any) -> None:
        if taken_over:  # this send was slow: its guard expired and another producer took it
            client.set(guard, taken_over[0])
        raise kombu.exceptions.OperationalError("the publish failed")

    monkeypatch.setattr(producer.app, "send_task", send_task)
    with pytest.raises(BrokerError):
        producer.submit(data)
    assert not client.exists(guard)  # its own: released, a rerun may enqueue at once
    taken_over.append("another-producers-token")
    with pytest.raises(BrokerError):
        producer.submit(data)
    assert client.get(guard) == b"another-producers-token"


# A producer process SIGKILLed inside send_task: after its guard is taken, before the message.
KILLED_PRODUCER = """
import os, signal, sys
from pathlib import Path
from celery import Celery
from bgq import defaults
from bgq.settings import Settings
from producer import Producer

defaults.GUARD_PUBLISH_TTL = 3
Celery.send_task = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
Producer(Settings(home=Path(sys.argv[1]), redis_url=sys.argv[2])).submit(sys.argv[3])
"""


def test_a_producer_killed_before_sending_holds_the_job_up_briefly(
    idle: tuple[Producer, redis.Redis], redis_url: str, tmp_path: Path
) -> None:
    """Its guard expires after GUARD_PUBLISH_TTL (3 s here), not GUARD_TTL; then a waiter for
    the job enqueues it again, and the guard of a sent task lasts GUARD_TTL."""
    producer, client = idle
    producer.app.backend.client.ping()  # connected before the clock starts: the submit is quick
    image = tmp_path / "in.jpg"
    image.write_bytes(variant("car-1.jpg", (0, 0, 224, 111)))
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_PRODUCER, str(tmp_path), redis_url, str(image)],
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL
    job = producer.submit(image)  # the dead producer's guard: not enqueued again
    guard = contract.guard_key(job.key)
    assert client.llen(contract.QUEUE) == 0 and 0 < client.pttl(guard) <= 3000
    wait_for(lambda: not client.exists(guard), 10, "the dead producer's guard to expire")
    assert job.poll() is None  # pending without a guard: lost, so enqueued again
    assert client.llen(contract.QUEUE) == 1
    assert client.ttl(guard) > defaults.GUARD_TTL - 60


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
    assert int(client.hget(contract.STATS_KEY, Counter.FAILED) or 0) == 1


# A delivery (a worker's pool process, as Celery's trace runs it) whose receiver refuses the
# connection, on a worker whose Redis is out of reach: its retry cannot be published.
UNPUBLISHED_RETRY = """
import sys
from celery._state import _set_task_join_will_block
from celery.exceptions import Reject
from workers.webhooks import deliver_webhook

_set_task_join_will_block(True)  # as in a pool process: no result consumer to set up
args = [sys.argv[1], '{"status": "done"}']
deliver_webhook.push_request(id="hook-1", args=args, kwargs={}, retries=0, called_directly=False)
try:
    deliver_webhook.run(*args)
except Reject as rejected:
    print("requeue" if rejected.requeue else "dropped", rejected.reason)
"""


def test_a_webhook_whose_retry_cannot_be_published_is_requeued(tmp_path: Path) -> None:
    """Celery's own retry would reject the message for good (FAILURE, the delivery dropped):
    it is requeued instead, or left to its lease, as the image task's retries are."""
    with socket.socket() as closed:  # bound, never listening: every connection is refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        env = {
            **os.environ,
            "BGQ_HOME": str(tmp_path),
            "BGQ_REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "BGQ_WEBHOOK_SECRET": "a-secret",
            "BGQ_WEBHOOK_ALLOW_PRIVATE": "true",
        }
        url = f"http://127.0.0.1:{port}/hooks"
        run = subprocess.run(
            [sys.executable, "-c", UNPUBLISHED_RETRY, url],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("requeue "), run.stdout + run.stderr
    assert "refused" in run.stdout, run.stdout  # the publish's own error, Redis's port
    assert f"delivery to {url} failed" in run.stderr  # its own failure was logged, then retried
