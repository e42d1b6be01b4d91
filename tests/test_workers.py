"""Worker lifecycle: pool-process recycling, and jobs that kill their worker (no crash loops)."""

from __future__ import annotations

import io
import os
import signal
import time

import psutil
import pytest
import redis
from celery import Celery
from PIL import Image

from bgq import contract, defaults
from bgq.contract import Counter
from bgq.errors import JobFailed
from bgq.stack import LocalStack
from producer import Producer
from tests.helpers import inspect_worker, settle, stats, variant, wait_for
from tests.stacks import StackFactory, both_stores


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
@pytest.mark.parametrize("lane", contract.LANES)
def test_job_that_kills_its_worker_fails_for_good(
    make_stack: StackFactory, store_settings: dict[str, object], lane: str
) -> None:
    """Like the OOM killer: SIGKILL the pool process on every delivery; it must stop retrying.
    In either lane: a bulk job killed is redelivered from the bulk queue it was let into."""
    stack = make_stack(concurrency=1, **store_settings)
    producer = Producer(stack.settings)
    app = producer.app
    # Alpha matting on a large image keeps the pool process busy for seconds.
    job = producer.submit(variant("cloth-1.jpg", (0, 0, 739, 1134)), lane=lane, alpha_matting=True)
    client = redis.Redis.from_url(stack.url)
    killed: set[int] = set()
    for death in range(1, defaults.MAX_DELIVERIES + 1):
        pid = _active_pid(app, stack, job.key, killed)
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
        if death == defaults.MAX_DELIVERIES:
            break  # the next start fails the job and clears the counter
        # The worker's main process counts the death (before it requeues the job).
        wait_for(
            lambda death=death: int(client.get(contract.attempts_key(job.key)) or 0) == death,
            timeout=30,
            what=f"death {death} counted",
        )
    with pytest.raises(JobFailed, match="died 3 times") as failure:
        job.wait(timeout=120)
    assert failure.value.permanent
    # The worker survived and serves the next job.
    assert producer.submit(variant("car-1.jpg", (5, 5, 200, 200))).read(timeout=120)
    client.close()


def accepted(producer: Producer, stack: LocalStack) -> dict[str, int]:
    """How many tasks of each name the worker has taken (a retry is taken again)."""
    return dict(inspect_worker(producer.app, stack.hostname, "stats")["total"])


def test_memory_error_fails_for_good_and_the_pool_process_serves_on(
    make_stack: StackFactory,
) -> None:
    """An allocation the OS refuses: the pool process under an address-space limit, as
    `ulimit -v` or `prlimit --as` sets one. MemoryError is permanent (no retry), and the same
    pool process serves the next job: Celery, given a MemoryError, would stop the worker."""
    stack = make_stack(concurrency=1)
    assert stack.worker is not None
    producer = Producer(stack.settings)
    client = redis.Redis.from_url(stack.url)
    warm = producer.submit(variant("car-1.jpg", (0, 0, 210, 150)))
    warm.wait(timeout=120)  # the session has done its first run: its memory is mapped
    (pool,) = psutil.Process(stack.worker.pid).children()
    assert producer.task_meta(warm.key)["result"]["pid"] == pool.pid
    soft, hard = pool.rlimit(psutil.RLIMIT_AS)
    pool.rlimit(psutil.RLIMIT_AS, (pool.memory_info().vms + 256 * 2**20, hard))
    buf = io.BytesIO()
    Image.new("L", (6000, 6000), 128).save(buf, "PNG")  # 36 MP: about 500 MiB more to process
    try:
        big = producer.submit(buf.getvalue())  # within BGQ_MAX_MEGAPIXELS and the estimate
        with pytest.raises(JobFailed, match="OutOfMemory: ran out of memory") as failure:
            big.wait(timeout=120)
        assert failure.value.permanent
        settle(client, big.key)
        after = producer.submit(variant("car-1.jpg", (0, 0, 211, 150)))
        after.wait(timeout=120)
    finally:
        pool.rlimit(psutil.RLIMIT_AS, (soft, hard))
    assert producer.task_meta(after.key)["result"]["pid"] == pool.pid  # the same process
    assert accepted(producer, stack)[contract.TASK_NAME] == 3  # no retry of the big one
    assert stats(client)[Counter.FAILED] == 1 and not client.exists(contract.attempts_key(big.key))
    client.close()
