"""Redis as deployments run it: TLS, an ACL user, Sentinel with a failover mid-ingest.

Each test starts the system redis-server(s) on loopback, real prefork workers with the real
u2netp model, and then every other part of bgq on the same settings: `bgq ingest`,
`bgq status`, `bgq cache stats` / prune, the exporter and Flower.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
import trustme

from bgq.exporter import Exporter
from bgq.process import free_port
from bgq.settings import Settings, settings_env
from bgq.stack import LocalStack
from tests.helpers import BGQ, assert_same_pixels, bgq, variant, wait_for
from tests.redis_servers import Server, Servers, master_port, servers

MASTER = "bgqmaster"
PASSWORD = "n0t-in-any-log"


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Servers]:
    with servers(tmp_path / "redis") as started:
        yield started


def catalog(folder: Path, count: int, size: int = 160) -> list[str]:
    """`count` small new images (never seen by any cache) as a folder to ingest."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        box = (i * 7, i * 5, i * 7 + size, i * 5 + size)
        (folder / f"{i}.jpg").write_bytes(variant("anime-girl-1.jpg", box))
    return sorted(f"{i}.png" for i in range(count))


def stack_settings(tmp_path: Path, model_home: Path, **values: object) -> Settings:
    return Settings(
        home=tmp_path / "home",
        models_dir=model_home,
        concurrency=2,
        flower_basic_auth=f"ops:{PASSWORD}",
        **values,  # type: ignore[arg-type]
    )


@contextlib.contextmanager
def every_part_checked(settings: Settings, env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """Workers, ingest, status, cache stats, prune, exporter and Flower on `settings`' Redis.

    Yields everything they printed once they all passed, while the workers and Flower still
    run (a test may go on with them).
    """
    env = {**env, **settings_env(settings)}
    tmp_path.mkdir(exist_ok=True)
    names = catalog(tmp_path / "in", 4)
    flower = free_port()
    log = tmp_path / "stack.log"
    with LocalStack(settings, log=log, flower_port=flower):
        ingest = bgq("ingest", str(tmp_path / "in"), "--out", str(tmp_path / "out"), env=env)
        assert ingest.returncode == 0, ingest.stdout + ingest.stderr
        assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == names
        status = bgq("status", env=env, timeout=60)
        assert status.returncode == 0 and "1 online" in status.stdout, status.stderr
        stats = bgq("cache", "stats", env=env, timeout=60)
        assert "(0 hits, 4 misses)" in stats.stdout, stats.stdout + stats.stderr
        prune = bgq("cache", "prune", "--dry-run", env=env, timeout=60)
        assert prune.returncode == 0 and "kept 4 result(s)" in prune.stdout, prune.stderr
        exporter = Exporter(settings, "127.0.0.1", 0)
        try:
            metrics = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics", timeout=30).text
        finally:
            exporter.stop()
        assert "bgq_redis_up 1.0" in metrics and "bgq_cache_misses_total 4.0" in metrics
        queues = f"http://127.0.0.1:{flower}/api/queues/length"
        wait_for(lambda: _flower_lists_queue(queues), timeout=60, what="Flower's queue lengths")
        outputs = [ingest, status, stats, prune]
        yield "".join(r.stdout + r.stderr for r in outputs) + metrics


def check_every_part(settings: Settings, env: dict[str, str], tmp_path: Path) -> str:
    """every_part_checked() on a stack of its own; returns everything they printed or logged
    (for the secrets check), the stack's whole log included."""
    with every_part_checked(settings, env, tmp_path) as printed:
        pass
    return printed + (tmp_path / "stack.log").read_text()


def _flower_lists_queue(url: str) -> bool:
    try:
        response = httpx.get(url, timeout=10, auth=("ops", PASSWORD))
    except httpx.TransportError:
        return False
    return response.status_code == 200 and "bgq" in response.text


def test_tls_with_client_certificates(
    group: Servers, tmp_path: Path, model_home: Path, env: dict[str, str]
) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    client_cert = ca.issue_cert("bgq-client")
    files = tmp_path / "tls"
    files.mkdir()
    ca.cert_pem.write_to_path(str(files / "ca.pem"))
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(files / "server.pem"))
    client_cert.cert_chain_pems[0].write_to_path(str(files / "client.crt"))
    client_cert.private_key_pem.write_to_path(str(files / "client.key"))
    port = free_port()
    group.start(
        "tls",
        *("--port", "0", "--tls-port", str(port)),
        *("--tls-cert-file", str(files / "server.pem")),
        *("--tls-key-file", str(files / "server.pem")),
        *("--tls-ca-cert-file", str(files / "ca.pem"), "--tls-auth-clients", "yes"),
        port=port,
    )
    settings = stack_settings(
        tmp_path,
        model_home,
        redis_url=f"rediss://localhost:{port}/0",
        redis_tls_ca=files / "ca.pem",
        redis_tls_cert=files / "client.crt",
        redis_tls_key=files / "client.key",
    )
    check_every_part(settings, env, tmp_path)
    # Without the client certificate the server refuses us: the settings really are used.
    refused = bgq("status", env={**env, **settings_env(settings), "BGQ_REDIS_TLS_CERT": ""})
    assert refused.returncode != 0


def test_acl_user_and_no_password_in_any_output(
    group: Servers, tmp_path: Path, model_home: Path, env: dict[str, str]
) -> None:
    server = group.start(
        "acl",
        *("--user", "default", "off"),
        *("--user", "bgq", "on", f">{PASSWORD}", "~*", "&*", "+@all"),
    )
    url = f"redis://bgq:{PASSWORD}@127.0.0.1:{server.port}/0"
    settings = stack_settings(tmp_path, model_home, redis_url=url)
    printed = check_every_part(settings, env, tmp_path)
    assert PASSWORD not in printed
    assert f"redis://bgq:**@127.0.0.1:{server.port}/0" in printed  # `bgq status`
    wrong = bgq("status", env={**env, **settings_env(settings), "BGQ_REDIS_URL": url + "x"})
    assert wrong.returncode == 1 and PASSWORD not in wrong.stdout + wrong.stderr


def test_sentinel_failover_during_ingest(
    group: Servers,
    tmp_path: Path,
    model_home: Path,
    env: dict[str, str],
    reference: Callable[..., bytes],
) -> None:
    master = group.start("master")
    replica = group.start("replica", "--replicaof", "127.0.0.1", str(master.port))
    sentinels = [group.sentinel(f"sentinel-{i}", MASTER, master.port) for i in (1, 2)]
    wait_for(lambda: _replicating(replica.port), timeout=60, what="the replica to sync")
    wait_for(lambda: _sentinels_ready(sentinels), timeout=60, what="the Sentinels to meet")
    url = ";".join(f"sentinel://127.0.0.1:{s.port}" for s in sentinels) + "/0"
    settings = stack_settings(tmp_path, model_home, redis_url=url, redis_sentinel_master=MASTER)
    env = {**env, **settings_env(settings)}
    src, out = tmp_path / "in", tmp_path / "out"
    names = catalog(src, 12, size=150)
    with every_part_checked(settings, env, tmp_path / "parts"):  # the same workers go on
        ingest = subprocess.Popen(
            [BGQ, "ingest", str(src), "--out", str(out), "--window", "4"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: len(list(out.glob("*.png"))) >= 2, what="the first results")
            master.kill()
            stdout, stderr = ingest.communicate(timeout=300)
        finally:
            ingest.kill()
            ingest.wait()
        assert ingest.returncode == 0, stdout + stderr
        assert master_port(sentinels[0].port, MASTER) == replica.port
        status = bgq("status", env=env, timeout=60)
        assert status.returncode == 0 and "1 online" in status.stdout, status.stderr
    assert stderr.count("broker unreachable, retrying for up to 120 s") == 1, stderr
    assert sorted(p.name for p in out.glob("*.png")) == names
    for name in names:
        data = (src / name.replace(".png", ".jpg")).read_bytes()
        assert_same_pixels(out / name, reference(data))


def _replicating(port: int) -> bool:
    with redis.Redis(port=port, socket_timeout=2) as client:
        return client.info("replication").get("master_link_status") == "up"


def _sentinels_ready(sentinels: list[Server]) -> bool:
    """Each Sentinel knows the replica and the other Sentinel (so they can elect a leader)."""
    for sentinel in sentinels:
        with redis.Redis(port=sentinel.port, socket_timeout=2) as client:
            if not client.sentinel_slaves(MASTER) or not client.sentinel_sentinels(MASTER):
                return False
    return True
