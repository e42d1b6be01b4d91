"""The ASGI app of `bgq api`: its state, middleware, error handlers and routers, wired once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

import bgq
from bgq import defaults, quotas
from bgq.settings import Settings, load_settings
from producer.api import jobs, ops, removebg
from producer.api.apidocs import install_apidocs
from producer.api.errors import install_error_handlers
from producer.api.limits import BodyLimit
from producer.api.metrics import Metrics, MetricsMiddleware
from producer.api.openapi import install_openapi
from producer.api.page import install_page
from producer.api.ratelimit import Limiter
from producer.api.removebg_openapi import install_removebg_openapi
from producer.client import Producer

DESCRIPTION = (
    "Background removal on a queue: synchronous and asynchronous jobs, "
    'results, webhooks. Errors are `{"error": {"code", "message"}}`.'
)


def create_app(settings: Settings | None = None, producer: Producer | None = None) -> FastAPI:
    """The ASGI app; `bgq api` serves it with uvicorn (a given producer brings its own store)."""
    settings = settings or load_settings()
    # A request rides out a failover of a few seconds; past that it answers 503 at once.
    retry = min(settings.broker_retry_seconds, defaults.API_BROKER_RETRY_SECONDS)
    producer = producer or Producer(settings, retry_seconds=retry)
    metrics = Metrics()
    app = FastAPI(
        lifespan=lifespan,
        title="bgq",
        version=bgq.__version__,
        description=DESCRIPTION,
        docs_url=None,  # /docs comes from producer.api.apidocs, with no CDN
        redoc_url=None,  # off: ReDoc's bundle loads its logo from a CDN
    )
    app.state.settings = settings
    app.state.producer = producer
    app.state.metrics = metrics
    app.state.api_keys = {quotas.key_id(k): k.encode() for k in settings.api_key_list}
    app.state.limiter = Limiter(settings.api_limit_table, producer, metrics)
    install_openapi(app, secured=bool(settings.api_key_list), limited=bool(settings.api_limits))
    install_removebg_openapi(app, bool(settings.api_key_list), bool(settings.api_limits))
    install_error_handlers(app)
    too_large = {path: removebg.too_large_response for path in removebg.PATHS}
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes, responders=too_large)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.include_router(jobs.router)
    app.include_router(removebg.router)
    install_page(app, settings, producer.store)
    app.include_router(ops.router)
    install_apidocs(app)
    return app


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Add the batched cache-hit count to Redis every few seconds, and at shutdown."""
    producer: Producer = app.state.producer
    flusher = asyncio.create_task(flush_forever(producer))
    try:
        yield
    finally:
        flusher.cancel()
        await run_in_threadpool(producer.close)  # flushes the hits too


async def flush_forever(producer: Producer) -> None:
    """Flush the producer's batched stats every STATS_FLUSH_INTERVAL seconds."""
    while True:
        await asyncio.sleep(defaults.STATS_FLUSH_INTERVAL)
        await run_in_threadpool(producer.flush_stats)
