"""What a route of `bgq api` depends on, read from `app.state` (create_app puts it there).

Every dependency is `async`: FastAPI runs a plain `def` one on a worker thread, a hop each
request would pay for nothing here.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from bgq.settings import Settings
from bgq.store import Store
from producer.api.errors import ApiError
from producer.api.metrics import Metrics
from producer.api.ratelimit import Limiter
from producer.client import Producer


async def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


async def get_producer(request: Request) -> Producer:
    """The app's Producer: hashing, the cache short-circuit, the enqueue guard."""
    producer: Producer = request.app.state.producer
    return producer


async def get_store(request: Request) -> Store:
    """The Producer's store (a given producer brings its own)."""
    store: Store = request.app.state.producer.store
    return store


async def get_metrics(request: Request) -> Metrics:
    """This process's Prometheus metrics."""
    metrics: Metrics = request.app.state.metrics
    return metrics


async def get_limiter(request: Request) -> Limiter:
    """The per-key limits (BGQ_API_LIMITS) and their counters in Redis."""
    limiter: Limiter = request.app.state.limiter
    return limiter


SettingsDep = Annotated[Settings, Depends(get_settings)]
ProducerDep = Annotated[Producer, Depends(get_producer)]
StoreDep = Annotated[Store, Depends(get_store)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
LimiterDep = Annotated[Limiter, Depends(get_limiter)]


async def require_key(request: Request) -> None:
    """Refuse a request without one of BGQ_API_KEYS as its bearer token (none set: no check).

    The caller is then known by its key's short id (`request.state.caller`; None without keys).
    """
    keys: dict[str, bytes] = request.app.state.api_keys  # short id -> key
    request.state.caller = None
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    caller = match_key(keys, token.strip())
    if scheme.lower() == "bearer" and caller is not None:
        request.state.caller = caller
        return
    raise ApiError(
        401,
        "unauthorized",
        "missing or invalid API key: send `Authorization: Bearer <key>`",
        {"WWW-Authenticate": "Bearer"},
    )


def match_key(keys: dict[str, bytes], given: str) -> str | None:
    """The short id of the key `given` is, if any (every key compared, in constant time, so the
    time taken says nothing of which matched)."""
    token = given.encode()
    matches = [caller for caller, key in keys.items() if hmac.compare_digest(token, key)]
    return matches[0] if matches else None
