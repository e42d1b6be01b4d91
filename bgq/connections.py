"""Every Redis connection bgq opens, from the one settings object.

BGQ_REDIS_URL is `redis://` (optionally `redis://user:password@host`, Redis ACLs), `rediss://`
(TLS, with BGQ_REDIS_TLS_CA / _CERT / _KEY) or Celery's Sentinel form
`sentinel://h1:26379;sentinel://h2:26379/0` with BGQ_REDIS_SENTINEL_MASTER. The Celery config
(broker and result backend) and the plain redis-py clients (guard, stats, exporter, prune) are
both built here, so every part of bgq talks to the same server the same way.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from bgq import defaults

if TYPE_CHECKING:
    import redis

    from bgq.settings import Settings

SENTINEL_SEPARATOR = ";"  # between the sentinels of a sentinel:// URL (Celery's form)
SENTINEL_PORT = 26379


def safe_url(url: str) -> str:
    """The URL with any password masked (each part of a sentinel:// list), for logs and output."""
    return SENTINEL_SEPARATOR.join(_mask(part) for part in url.split(SENTINEL_SEPARATOR))


def _mask(url: str) -> str:
    try:
        split = urlsplit(url)
    except ValueError:
        return "(unparsable URL)"
    if split.password is None:
        return url
    userinfo, host = split.netloc.rsplit("@", 1)
    user = userinfo.split(":", 1)[0]
    return split._replace(netloc=f"{user}:**@{host}").geturl()


def is_sentinel(url: str) -> bool:
    """Whether the URL names Sentinels (which then name the master) rather than a server."""
    return url.startswith("sentinel://")


def tls_options(settings: Settings) -> dict[str, Any] | None:
    """The ssl_* keywords redis-py, kombu and Celery take for a rediss:// URL; None otherwise."""
    if not settings.broker_url().startswith("rediss://"):
        return None
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if settings.redis_tls_ca:
        options["ssl_ca_certs"] = str(settings.redis_tls_ca)
    if settings.redis_tls_cert and settings.redis_tls_key:
        options["ssl_certfile"] = str(settings.redis_tls_cert)
        options["ssl_keyfile"] = str(settings.redis_tls_key)
    return options


def sentinel_kwargs() -> dict[str, float]:
    """How bgq talks to the Sentinels themselves: short timeouts, so a dead one is skipped."""
    timeout = defaults.SENTINEL_SOCKET_TIMEOUT
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout}


def celery_connection(settings: Settings) -> dict[str, Any]:
    """The broker and result-backend entries of the Celery config (URL, TLS, Sentinel)."""
    url = settings.broker_url()
    broker_options: dict[str, Any] = {"visibility_timeout": defaults.VISIBILITY_TIMEOUT}
    backend_options: dict[str, Any] = {}
    if is_sentinel(url):
        sentinel = {
            "master_name": settings.redis_sentinel_master,
            "sentinel_kwargs": sentinel_kwargs(),
        }
        broker_options.update(sentinel)
        backend_options.update(sentinel)
    conf: dict[str, Any] = {
        "broker_url": url,
        "result_backend": url,
        "broker_transport_options": broker_options,
        "result_backend_transport_options": backend_options,
        "redis_socket_connect_timeout": defaults.REDIS_CONNECT_TIMEOUT,
        "redis_socket_timeout": defaults.REDIS_SOCKET_TIMEOUT,
    }
    tls = tls_options(settings)
    if tls is not None:
        conf["broker_use_ssl"] = tls
        conf["redis_backend_use_ssl"] = tls
    return conf


def redis_client(
    settings: Settings,
    timeout: float = defaults.REDIS_SOCKET_TIMEOUT,
    connect_timeout: float = defaults.REDIS_CONNECT_TIMEOUT,
) -> redis.Redis:
    """A redis-py client of the cluster's Redis (the current master behind Sentinel)."""
    import redis

    url = settings.broker_url()
    if is_sentinel(url):
        master = settings.redis_sentinel_master or ""
        return _sentinel_master(url, master, timeout, connect_timeout)
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=connect_timeout,
        **(tls_options(settings) or {}),
    )


def _sentinel_master(url: str, master: str, timeout: float, connect_timeout: float) -> redis.Redis:
    """A client that asks the Sentinels for the master on each (re)connect."""
    from redis.sentinel import Sentinel

    parts = [urlsplit(part) for part in url.split(SENTINEL_SEPARATOR)]
    first = parts[0]  # Celery's rule: credentials and database come from the first part
    sentinels = [(p.hostname or "localhost", p.port or SENTINEL_PORT) for p in parts]
    manager = Sentinel(
        sentinels,
        sentinel_kwargs=sentinel_kwargs(),
        db=int(first.path.strip("/") or 0),
        socket_timeout=timeout,
        socket_connect_timeout=connect_timeout,
    )
    return manager.master_for(
        master,
        username=unquote(first.username) if first.username else None,
        password=unquote(first.password) if first.password else None,
    )
