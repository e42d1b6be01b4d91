"""bgq.connections and the Redis settings: URL forms, TLS, Sentinel, secrets kept out of errors."""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path

import pytest
from redis.sentinel import SentinelConnectionPool

import celeryconfig
from bgq import redis_server
from bgq.connections import broker_url, celery_connection, redis_client
from bgq.errors import ConfigError, NoBroker
from bgq.settings import load_settings
from bgq.urls import safe_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://bgq:s3cret@h:6379/0", "redis://bgq:**@h:6379/0"),
        ("rediss://:s3cret@h/1", "rediss://:**@h/1"),
        (
            "sentinel://:s3cret@a:26379;sentinel://:s3cret@b:26379/0",
            "sentinel://:**@a:26379;sentinel://:**@b:26379/0",
        ),
    ],
)
def test_safe_url_masks_every_password(url: str, shown: str) -> None:
    assert safe_url(url) == shown


def test_sentinel_needs_its_master_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BGQ_REDIS_URL", "sentinel://:s3cret@a:26379;sentinel://b:26379/0")
    with pytest.raises(ConfigError, match="BGQ_REDIS_SENTINEL_MASTER") as info:
        load_settings()
    assert "s3cret" not in str(info.value)


def test_tls_files_need_rediss(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BGQ_REDIS_URL", "redis://h:6379/0")
    monkeypatch.setenv("BGQ_REDIS_TLS_CA", str(tmp_path / "ca.pem"))
    with pytest.raises(ConfigError, match=r"need a rediss://"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value"),
    [("BGQ_REDIS_URL", "http://bgq:s3cret@h/0"), ("BGQ_FLOWER_BASIC_AUTH", ":s3cret")],
)
def test_a_bad_secret_setting_is_named_not_shown(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable) as info:
        load_settings()
    assert "s3cret" not in str(info.value)


def test_celery_config_for_tls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BGQ_REDIS_URL", "rediss://h:6380/0")
    monkeypatch.setenv("BGQ_REDIS_TLS_CA", str(tmp_path / "ca.pem"))
    monkeypatch.setenv("BGQ_REDIS_TLS_CERT", str(tmp_path / "c.crt"))
    monkeypatch.setenv("BGQ_REDIS_TLS_KEY", str(tmp_path / "c.key"))
    conf = celeryconfig.build(load_settings())
    expected = {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": str(tmp_path / "ca.pem"),
        "ssl_certfile": str(tmp_path / "c.crt"),
        "ssl_keyfile": str(tmp_path / "c.key"),
    }
    assert conf["broker_use_ssl"] == conf["redis_backend_use_ssl"] == expected


def test_celery_config_for_sentinel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BGQ_REDIS_URL", "sentinel://a:26379;sentinel://b:26380/2")
    monkeypatch.setenv("BGQ_REDIS_SENTINEL_MASTER", "mymaster")
    conf = celery_connection(load_settings())
    assert conf["broker_url"] == conf["result_backend"]
    for options in (conf["broker_transport_options"], conf["result_backend_transport_options"]):
        assert options["master_name"] == "mymaster"
    assert "broker_use_ssl" not in conf


def test_plain_celery_config_has_no_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BGQ_REDIS_URL", "redis://bgq:pw@h:6379/0")
    conf = celery_connection(load_settings())
    assert conf["broker_url"] == "redis://bgq:pw@h:6379/0"
    assert "broker_use_ssl" not in conf and "master_name" not in conf["broker_transport_options"]


def test_sentinel_client_asks_the_sentinels_for_the_master(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As Celery and kombu read it: credentials and database from the first part.
    monkeypatch.setenv("BGQ_REDIS_URL", "sentinel://u:pw@a:26379/3;sentinel://b/3")
    monkeypatch.setenv("BGQ_REDIS_SENTINEL_MASTER", "mymaster")
    client = redis_client(load_settings())  # connects lazily: nothing is contacted here
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "mymaster"
    sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
    assert [(c["host"], c["port"]) for c in sentinels] == [
        ("a", 26379),
        ("b", 26379),
    ]
    kwargs = pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("u", "pw", 3)
    client.close()


# --- the broker: BGQ_REDIS_URL, else the embedded server of this BGQ_HOME ---------------------


def test_broker_url_is_bgq_redis_url_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_discovery(run_dir: Path) -> str | None:
        raise AssertionError("discover() must not run when BGQ_REDIS_URL is set")

    monkeypatch.setattr(redis_server, "discover", no_discovery)
    monkeypatch.setenv("BGQ_REDIS_URL", "redis://elsewhere:6379/3")
    assert broker_url(load_settings()) == "redis://elsewhere:6379/3"


@pytest.fixture
def discovered(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """An embedded server found at redis://127.0.0.1:4242/0; the run dirs it was looked up for."""
    seen: list[Path] = []

    def discover(run_dir: Path) -> str | None:
        seen.append(run_dir)
        return "redis://127.0.0.1:4242/0"

    monkeypatch.setattr(redis_server, "discover", discover)
    monkeypatch.setenv("BGQ_HOME", str(tmp_path / "home"))
    return seen


def test_broker_url_finds_the_embedded_server_of_this_home(
    discovered: list[Path], tmp_path: Path
) -> None:
    seen = discovered
    assert broker_url(load_settings()) == "redis://127.0.0.1:4242/0"
    assert seen == [tmp_path / "home" / "run"]


def test_broker_url_without_any_redis_says_to_run_bgq_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BGQ_HOME", str(tmp_path / "home"))
    with pytest.raises(NoBroker) as info:
        broker_url(load_settings())
    message = str(info.value)
    assert "`bgq up`" in message
    assert "BGQ_REDIS_URL" in message
    assert str(tmp_path / "home") in message
    assert isinstance(info.value, ConfigError)


def test_one_connection_discovers_the_embedded_server_once(discovered: list[Path]) -> None:
    """Each discovery reads redis.json and pings Redis: a client or a Celery config does it once."""
    seen = discovered
    settings = load_settings()
    redis_client(settings).close()  # connects lazily: nothing is contacted here
    assert len(seen) == 1
    assert celery_connection(settings)["broker_url"] == "redis://127.0.0.1:4242/0"
    assert len(seen) == 2


@pytest.mark.parametrize(
    ("state", "found"),
    [
        ({"url": "redis://127.0.0.1:4242/0"}, False),  # no pid: nothing to check
        ({"url": "redis://127.0.0.1:4242/0", "pid": 0}, False),  # our own process group
        ({"url": "redis://127.0.0.1:4242/0", "pid": "me"}, False),
        ({"pid": "ours"}, False),
        ({"url": "redis://127.0.0.1:4242/0", "pid": "ours"}, True),
    ],
)
def test_discover_needs_the_recorded_server_process_alive(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, state: dict[str, object], found: bool
) -> None:
    monkeypatch.setattr(redis_server, "_ping", lambda url: True)  # a server answers there
    if state.get("pid") == "ours":
        state["pid"] = os.getpid()
    (tmp_path / redis_server.STATE_FILE).write_text(json.dumps(state))
    assert redis_server.discover(tmp_path) == (state["url"] if found else None)


def test_discover_ignores_a_dead_server_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(redis_server, "_ping", lambda url: True)
    monkeypatch.setattr(redis_server, "_alive", lambda pid: False)
    state = {"url": "redis://127.0.0.1:4242/0", "pid": 12345}
    (tmp_path / redis_server.STATE_FILE).write_text(json.dumps(state))
    assert redis_server.discover(tmp_path) is None
