"""Prune on a running cluster: one prune at a time, from the command line or on a worker."""

from __future__ import annotations

import subprocess

import pytest
import redis

from bench.s3server import S3Server
from bgq import cache, contract
from bgq.stack import LocalStack
from producer import Producer
from tests.helpers import BGQ, bgq, wait_for
from tests.stacks import StackFactory


@pytest.fixture(scope="module")
def maintenance(make_stack: StackFactory) -> LocalStack:
    """A worker on the maintenance queue only (it loads no model): it runs `bgq.prune_cache`."""
    return make_stack(queues=[contract.MAINTENANCE_QUEUE])


def test_one_prune_at_a_time(
    maintenance: LocalStack, s3_server: S3Server, redis_client: redis.Redis, env: dict[str, str]
) -> None:
    """A prune holds the lock while it lists its bucket (the S3 server frozen, so it stays
    there): a second `bgq cache prune` is refused and the workers' prune task skips; once the
    first one ends, the lock is free and the next prune runs."""
    bucket = {
        **env,
        "BGQ_REDIS_URL": maintenance.url,
        "BGQ_STORE_URL": f"s3://{s3_server.bucket()}/bgq",
        "BGQ_S3_ENDPOINT_URL": s3_server.url,
    }
    app = Producer(maintenance.settings).app
    with s3_server.paused():
        first = subprocess.Popen(
            [BGQ, "cache", "prune", "--max-age", "7d"],
            env=bucket,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            holder = f"{first.pid}-".encode()  # the lock's token starts with its holder's pid
            wait_for(
                lambda: (redis_client.get(cache.LOCK_KEY) or b"").startswith(holder),
                timeout=60,
                what="the first prune to take the lock",
            )
            second = bgq("cache", "prune", "--max-age", "7d", env=bucket, timeout=60)
            skipped = app.send_task(contract.PRUNE_TASK_NAME)
            wait_for(skipped.ready, timeout=60, what="the prune task")  # no .get(): it leaks
        except BaseException:
            first.kill()
            first.communicate()
            raise
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and "removed 0 result(s)" in out, err
    assert second.returncode == 2, second.stdout
    assert "another prune is running" in second.stderr
    assert skipped.result == {"skipped": "another prune is running"}
    assert not redis_client.exists(cache.LOCK_KEY)
    then = app.send_task(contract.PRUNE_TASK_NAME)
    wait_for(then.ready, timeout=60, what="the next prune task")
    assert "removed" in then.result
