"""`GET /readyz` of a real API: ready with Redis answering, a worker online and the store usable."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from bench.s3server import S3Server
from bgq import contract, defaults
from bgq.redis_server import EmbeddedRedis
from bgq.settings import Settings
from bgq.stack import LocalStack
from tests.helpers import ApiServer
from tests.stacks import StackFactory, s3_settings


@pytest.fixture(scope="module")
def upkeep(make_stack: StackFactory) -> LocalStack:
    """One worker online, on the maintenance queue only (it loads no model)."""
    return make_stack(queues=[contract.MAINTENANCE_QUEUE])


def test_not_ready_while_no_worker_is_online(tmp_path: Path) -> None:
    """A Redis of its own that answers, with no worker on it: 503."""
    redis_server = EmbeddedRedis.start(tmp_path / "run")
    try:
        api = ApiServer(Settings(home=tmp_path, redis_url=redis_server.url)).start()
        try:
            ready = httpx.get(api.url + "/readyz", timeout=60)
        finally:
            api.stop()
    finally:
        redis_server.stop()
    assert ready.status_code == 503
    assert ready.json() == {"ready": False, "redis": True, "workers": 0, "store": True}
    assert ready.headers["retry-after"] == str(defaults.API_RETRY_AFTER)


def test_not_ready_while_the_store_is_unreachable(upkeep: LocalStack, s3_server: S3Server) -> None:
    """Redis up and a worker online, the S3 server frozen: 503 until it answers again."""
    overrides = {"redis_url": upkeep.url, "s3_timeout": 1.0, **s3_settings(s3_server)}
    api = ApiServer(upkeep.settings.model_copy(update=overrides)).start()
    try:
        with httpx.Client(base_url=api.url, timeout=60) as http:
            before = http.get("/readyz")
            with s3_server.paused():
                frozen = http.get("/readyz")
            after = http.get("/readyz")
    finally:
        api.stop()
    assert before.status_code == after.status_code == 200, before.text
    assert before.json() == {"ready": True, "redis": True, "workers": 1, "store": True}
    assert frozen.status_code == 503, frozen.text
    body = frozen.json()
    assert (body["ready"], body["redis"], body["workers"], body["store"]) == (False, True, 1, False)
    assert s3_server.url in body["error"]
    assert frozen.headers["retry-after"] == str(defaults.API_RETRY_AFTER)
