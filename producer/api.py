"""The HTTP API (`bgq api`): FastAPI on the same Producer as Python callers.

Hashing, the cache short-circuit, the enqueue guard and the store are the Producer's; this
module only speaks HTTP: request parsing and limits, auth, job views, webhooks, metrics;
producer.page adds the web page at `/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

import bgq
from bgq import contract, defaults, jobs, webhooks
from bgq.errors import BgqError
from bgq.settings import Settings, load_settings
from producer import api_schema
from producer.api_http import (
    RETRY_LATER,
    ApiError,
    BodyLimit,
    Metrics,
    MetricsMiddleware,
    install_error_handlers,
)
from producer.api_request import options_of, read_submission, wait_seconds
from producer.client import Producer
from producer.job import Job
from producer.page import install_page

log = logging.getLogger("bgq.api")

KEY_RE = re.compile(api_schema.KEY_PATTERN)  # what the schema says a job id is
IMMUTABLE = "public, max-age=31536000, immutable"


def create_app(settings: Settings | None = None, producer: Producer | None = None) -> FastAPI:
    """The ASGI app; `bgq api` serves it with uvicorn (a given producer brings its own store)."""
    settings = settings or load_settings()
    # A request rides out a failover of a few seconds; past that it answers 503 at once.
    retry = min(settings.broker_retry_seconds, defaults.API_BROKER_RETRY_SECONDS)
    producer = producer or Producer(settings, retry_seconds=retry)
    store = producer.store
    metrics = Metrics()
    keys = [k.encode() for k in settings.api_key_list]
    max_bytes = settings.max_upload_bytes

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        """Add the batched cache-hit count to Redis every few seconds, and at shutdown."""

        async def flush_forever() -> None:
            while True:
                await asyncio.sleep(defaults.STATS_FLUSH_INTERVAL)
                await run_in_threadpool(producer.flush_stats)

        flusher = asyncio.create_task(flush_forever())
        try:
            yield
        finally:
            flusher.cancel()
            await run_in_threadpool(producer.close)  # flushes the hits too

    app = FastAPI(
        lifespan=lifespan,
        title="bgq",
        version=bgq.__version__,
        description="Background removal on a queue: synchronous and asynchronous jobs, "
        'results, webhooks. Errors are `{"error": {"code", "message"}}`.',
    )
    app.state.producer = producer
    app.state.metrics = metrics

    def openapi() -> dict[str, Any]:
        """FastAPI's document, completed once by api_schema (auth as this app is set up)."""
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            app.openapi_schema = api_schema.complete(document, secured=bool(keys))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    install_error_handlers(app, max_bytes)
    app.add_middleware(BodyLimit, max_bytes=max_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    # -- auth ---------------------------------------------------------------------------------

    async def require_key(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, k) for k in keys):
            raise ApiError(
                401,
                "unauthorized",
                "missing or invalid API key: send `Authorization: Bearer <key>`",
                {"WWW-Authenticate": "Bearer"},
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    # -- helpers ------------------------------------------------------------------------------

    def base_url(request: Request) -> str:
        return (settings.public_url or str(request.base_url)).rstrip("/")

    def result_url(request: Request, key: str) -> str:
        return base_url(request) + jobs.result_path(key)

    async def image_response(output: str, cached: bool) -> Response:
        """The result: a file sent as is from a filesystem store, else streamed from the store.

        The stream's first piece is read before any header is sent, so a store that fails
        answers an error status instead of a broken 200.
        """
        key = contract.name_digest(output)
        headers = {
            "ETag": f'"{key}"',
            "Cache-Control": IMMUTABLE,
            "X-Bgq-Job-Id": key,
            "X-Bgq-Cached": "true" if cached else "false",
        }
        kind = contract.media_type(output)
        path = store.local_path(output)
        if path is not None:
            return FileResponse(path, media_type=kind, headers=headers)
        chunks = store.chunks(output)
        first = await run_in_threadpool(next, chunks, b"")
        body = itertools.chain((first,), chunks)
        return StreamingResponse(body, media_type=kind, headers=headers)

    def job_response(request: Request, key: str, status: str, cached: bool) -> JSONResponse:
        body = {
            "id": key,
            "status": status,
            "cached": cached,
            "result_url": result_url(request, key),
        }
        return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{key}"})

    async def submit(
        request: Request,
        fields: dict[str, str],
        data: bytes,
        callback: str | None,
        record_hits: bool,
    ) -> Job:
        """Validate, hand the image to the Producer, and record the job for GET /v1/jobs."""
        model, options = options_of(fields, settings.model)
        if callback is not None:
            await run_in_threadpool(check_callback, callback)
            if not settings.webhook_secret:
                raise ApiError(
                    422, "invalid_request", "callback_url needs BGQ_WEBHOOK_SECRET to be set"
                )
        job = await run_in_threadpool(producer.submit_data, data, model, options)
        metrics.cache.labels("hit" if job.cached else "miss").inc()
        if record_hits or not job.cached:  # a job to look up later (a hit needs none)
            await run_in_threadpool(record, request, job, callback)
        return job

    def check_callback(url: str) -> None:
        """Refuse a malformed or non-public callback; a host that does not resolve may later."""
        try:
            webhooks.check_callback_url(url, settings.webhook_allow_private)
        except webhooks.CallbackUnresolvable as exc:
            log.info("accepted %s; its deliveries are retried", exc)

    def record(request: Request, job: Job, callback: str | None) -> None:
        assert job.args is not None
        client = producer.app.backend.client
        jobs.register(client, job.args, base_url(request), callback)
        if callback:
            jobs.notify_if_final(producer.app, client, describe(job.key))

    def describe(key: str) -> jobs.JobView | None:
        client = producer.app.backend.client
        record = jobs.read_record(client, key)
        return jobs.describe(key, record, producer.task_meta(key), store)

    async def wait_for(request: Request, job: Job, seconds: float) -> bool:
        """True once the result is in the store, False after `seconds` (or a disconnect).

        Each check reads the job's state in Redis and asks the store only once it reports
        success, all off the event loop: a slow store never stalls other requests.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        delay = defaults.JOB_POLL_FIRST
        while True:
            if await run_in_threadpool(job.poll) is not None:
                return True
            now = loop.time()
            if now >= deadline or await request.is_disconnected():
                return False
            await asyncio.sleep(min(delay, deadline - now))
            delay = min(defaults.JOB_POLL_MAX, delay * 2)

    # -- routes -------------------------------------------------------------------------------

    @v1.post(
        "/remove",
        summary="Remove the background; the result if ready within `wait`, else 202 with the job",
        operation_id="remove",
        response_class=FileResponse,
    )
    async def remove(request: Request) -> Response:
        fields, data = await read_submission(request, settings)
        wait = wait_seconds(fields)
        if "callback_url" in fields:
            raise ApiError(422, "invalid_request", "callback_url belongs to POST /v1/jobs")
        job = await submit(request, fields, data, None, record_hits=False)
        if not (job.cached or await wait_for(request, job, wait)):
            return job_response(request, job.key, "queued", cached=False)
        return await image_response(job.output, job.cached)

    @v1.post(
        "/jobs",
        summary="Submit an asynchronous job (optionally with a webhook)",
        operation_id="create_job",
        status_code=202,
    )
    async def create_job(request: Request) -> JSONResponse:
        fields, data = await read_submission(request, settings)
        if "wait" in fields:
            raise ApiError(422, "invalid_request", "wait belongs to POST /v1/remove")
        job = await submit(request, fields, data, fields.get("callback_url"), record_hits=True)
        return job_response(request, job.key, "done" if job.cached else "queued", job.cached)

    def known_key(key: str) -> str:
        if not KEY_RE.fullmatch(key):
            raise ApiError(404, "not_found", f"no job {key!r}")
        return key

    @v1.get(
        "/jobs/{job_id}",
        summary="A job's status",
        operation_id="get_job",
        response_model=jobs.JobView,
    )
    async def get_job(job_id: str, request: Request) -> jobs.JobView:
        key = known_key(job_id)
        job = await run_in_threadpool(describe, key)
        if job is None:
            raise ApiError(404, "not_found", f"no job {key}")
        if job.result_url and job.result_url.startswith("/"):  # no record (e.g. a Python caller)
            job.result_url = base_url(request) + job.result_url
        if job.status == "queued":
            record = await run_in_threadpool(jobs.read_record, producer.app.backend.client, key)
            args = jobs.record_args(record)
            if args is not None:
                await run_in_threadpool(producer.requeue_if_lost, args)
        return job

    @v1.get(
        "/jobs/{job_id}/result",
        summary="A finished job's result (immutable; ETag is the job id)",
        operation_id="get_result",
        response_class=FileResponse,
    )
    async def get_result(job_id: str, request: Request) -> Response:
        key = known_key(job_id)
        output = await run_in_threadpool(store.use_result, key)
        if output is not None:
            if request.headers.get("if-none-match") == f'"{key}"':
                return Response(status_code=304, headers={"ETag": f'"{key}"'})
            if settings.result_redirect == "presigned":
                url = await run_in_threadpool(store.presigned_url, output, settings.presign_seconds)
                if url is not None:
                    return RedirectResponse(url, status_code=307)
            return await image_response(output, cached=True)
        job = await run_in_threadpool(describe, key)
        if job is None:
            raise ApiError(404, "not_found", f"no job {key}")
        if job.status == "failed":
            raise ApiError(409, "job_failed", f"the job failed: {job.error}")
        raise ApiError(409, "not_ready", f"the job is {job.status}; try again later")

    app.include_router(v1)
    install_page(app, settings, store)

    @app.get("/healthz", summary="The process is alive", operation_id="healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Redis answers, at least one worker is online and the store is usable",
        operation_id="readyz",
    )
    async def readyz() -> JSONResponse:
        def check() -> dict[str, Any]:
            body: dict[str, Any] = {"ready": False, "redis": False, "workers": 0, "store": False}
            problems = []
            try:
                producer.app.backend.client.ping()
                replies = producer.app.control.ping(timeout=1.0) or []
                body["redis"], body["workers"] = True, sum(len(r) for r in replies)
            except Exception as exc:
                problems.append(f"{type(exc).__name__}: {exc}")
            try:
                store.check()  # what the API needs of it: reachable, writable
                body["store"] = True
            except BgqError as exc:
                problems.append(str(exc))
            body["ready"] = body["redis"] and body["workers"] > 0 and body["store"]
            if problems:
                body["error"] = "; ".join(problems)
            return body

        body = await run_in_threadpool(check)
        ready = body["ready"]
        return JSONResponse(
            body, status_code=200 if ready else 503, headers=None if ready else RETRY_LATER
        )

    @app.get(
        "/metrics", summary="Prometheus metrics", operation_id="metrics", response_class=Response
    )
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
