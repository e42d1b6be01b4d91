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

import redis
from redis.sentinel import Sentinel

from bgq import defaults, redis_server
from bgq.errors import NoBroker
from bgq.urls import SENTINEL_PORT, SENTINEL_SEPARATOR, is_sentinel, is_tls

if TYPE_CHECKING:
    from bgq.settings import Settings


def broker_url(settings: Settings) -> str:
    """BGQ_REDIS_URL, else the running embedded server of this BGQ_HOME; raises if neither.

    Without BGQ_REDIS_URL this reads the embedded server's state file and pings it: call it
    once per connection made, and pass the URL on.
    """
    if settings.redis_url:
        return settings.redis_url
    url = redis_server.discover(settings.run_dir)
    if url is None:
        raise NoBroker(
            f"no Redis to talk to: BGQ_REDIS_URL is unset and no `bgq up` is running for "
            f"BGQ_HOME={settings.home}. Start a local stack with `bgq up` in another shell, "
            f"or set BGQ_REDIS_URL=redis://host:6379/0."
        )
    return url


def tls_options(settings: Settings, url: str) -> dict[str, Any] | None:
    """The ssl_* keywords redis-py, kombu and Celery take for a rediss:// `url`; None otherwise."""
    if not is_tls(url):
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


def lease_options(lease: int) -> dict[str, Any]:
    """kombu's unacked restore as bgq's leases (workers/leases.py renews them): a message not
    renewed for `lease` seconds is swept back to the head of its queue by any live worker, which
    looks every lease/6 s; a sweeper killed mid-sweep holds the sweep mutex LEASE_MUTEX_EXPIRE s."""
    return {
        "visibility_timeout": lease,
        "unacked_restore_interval": renew_interval(lease),
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": min(defaults.LEASE_MUTEX_EXPIRE, lease),
    }


def renew_interval(lease: float) -> int:
    """Seconds between a worker's lease renewals, and between its sweeps: a sixth of the lease."""
    return max(1, int(lease // 6))


def celery_connection(settings: Settings) -> dict[str, Any]:
    """The broker and result-backend entries of the Celery config (URL, TLS, Sentinel)."""
    url = broker_url(settings)
    broker_options: dict[str, Any] = {
        **lease_options(settings.lease),
        # Lanes: a worker tries its queues strictly in contract.CONSUME_ORDER (interactive
        # first; kombu's default round-robin would alternate with bulk), and a message's
        # priority is ignored: with one priority step every message lands in its queue's one
        # list, so no priority can reorder the lanes (on Redis 0 is the highest: it would).
        "queue_order_strategy": "bgq.lanes:LaneOrder",
        "priority_steps": [0],
        # A Redis gone without closing the connection (a network cut) must not hang a worker's
        # loop (its acks, lease renewals, sweeps) until TCP gives up: kombu waits forever.
        "socket_timeout": defaults.REDIS_SOCKET_TIMEOUT,
        "socket_connect_timeout": defaults.REDIS_CONNECT_TIMEOUT,
    }
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
    tls = tls_options(settings, url)
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
    url = broker_url(settings)
    if is_sentinel(url):
        master = settings.redis_sentinel_master or ""
        return _sentinel_master(url, master, timeout, connect_timeout)
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=connect_timeout,
        **(tls_options(settings, url) or {}),
    )


def _sentinel_master(url: str, master: str, timeout: float, connect_timeout: float) -> redis.Redis:
    """A client that asks the Sentinels for the master on each (re)connect."""
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
