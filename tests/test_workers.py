"""Worker lifecycle: pool-process recycling, and jobs that kill their worker (no crash loops)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis
from celery import Celery

from bgq import contract, defaults
from bgq.errors import JobFailed
from bgq.stack import LocalStack
from producer import Producer
from tests.conftest import StackFactory, both_stores
from tests.helpers import variant


def test_max_tasks_per_child_recycles_pool_processes(make_stack: StackFactory) -> None:
    stack = make_stack(max_tasks_per_child=2, concurrency=1)
    producer = Producer(stack.settings)
    jobs = [producer.submit(variant("car-1.jpg", (0, 0, 160 + i, 120))) for i in range(6)]
    pids = set()
    for job in jobs:
        job.wait(timeout=120)
        pids.add(producer.task_meta(job.key)["result"]["pid"])
    assert len(pids) >= 3  # one process, replaced after every second task


def _active_pid(
    app: Celery, stack: LocalStack, key: str, killed: set[int], timeout: float = 60
) -> int:
    """The pid of the pool process now running `key` (not one already killed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = app.control.inspect(destination=[stack.hostname], timeout=1).active() or {}
        for task in replies.get(stack.hostname, []):
            pid = task.get("worker_pid")
            if task["id"] == key and pid and pid not in killed:
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"job {key} never became active")


@both_stores
def test_job_that_kills_its_worker_fails_for_good(
    make_stack: StackFactory, store_settings: dict[str, object]
) -> None:
    """Like the OOM killer: SIGKILL the pool process on every delivery; it must stop retrying."""
    stack = make_stack(concurrency=1, **store_settings)
    producer = Producer(stack.settings)
    app = producer.app
    # Alpha matting on a large image keeps the pool process busy for seconds.
    job = producer.submit(variant("cloth-1.jpg", (0, 0, 739, 1134)), alpha_matting=True)
    client = redis.Redis.from_url(stack.url)
    killed: set[int] = set()
    for delivery in range(1, defaults.MAX_DELIVERIES + 1):
        pid = _active_pid(app, stack, job.key, killed)
        while int(client.get(contract.attempts_key(job.key)) or 0) < delivery:
            time.sleep(0.01)  # kill only once this delivery has been counted
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
    with pytest.raises(JobFailed, match="died 3 times") as failure:
        job.wait(timeout=120)
    assert failure.value.permanent
    # The worker survived and serves the next job.
    assert producer.submit(variant("car-1.jpg", (5, 5, 200, 200))).read(timeout=120)
    client.close()
