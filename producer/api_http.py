"""The HTTP plumbing of `bgq api`: the JSON error shape, the body limit, per-process metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from bgq import defaults
from bgq.errors import (
    BgqError,
    BrokerError,
    ConfigError,
    ImageTooLarge,
    InvalidImage,
    InvalidRequest,
    JobFailed,
    StoreError,
    UnsupportedImage,
)
from bgq.fetch import FetchFailed
from bgq.webhooks import CallbackNotAllowed

log = logging.getLogger("bgq.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ApiError(Exception):
    """An error answered as `{"error": {"code", "message"}}` with an HTTP status."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


RETRY_LATER = {"Retry-After": str(defaults.API_RETRY_AFTER)}  # with every 503


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def api_error(exc: BgqError) -> ApiError:
    """The HTTP answer to one of bgq's errors."""
    if isinstance(exc, InvalidImage):
        return ApiError(415, "unsupported_media_type", f"not an image: {exc}")
    if isinstance(exc, ImageTooLarge):
        return ApiError(413, "image_too_large", str(exc))
    if isinstance(exc, UnsupportedImage):
        return ApiError(422, "unsupported_image", str(exc))
    if isinstance(exc, CallbackNotAllowed):
        return ApiError(422, "callback_not_allowed", str(exc))
    if isinstance(exc, FetchFailed):
        return ApiError(422, "fetch_failed", f"cannot fetch image_url ({exc.reason}): {exc}")
    if isinstance(exc, InvalidRequest):
        return ApiError(422, "invalid_request", str(exc))
    if isinstance(exc, JobFailed):
        return ApiError(422 if exc.permanent else 500, "job_failed", exc.error)
    if isinstance(exc, BrokerError | ConfigError | StoreError):
        return ApiError(503, "unavailable", str(exc), RETRY_LATER)
    return ApiError(500, "internal", str(exc))


class BodyTooLarge(Exception):
    pass


def install_error_handlers(app: FastAPI, max_bytes: int) -> None:
    """One JSON error shape for every failure, never a stack trace."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(BgqError)
    async def _bgq_error(_: Request, exc: BgqError) -> JSONResponse:
        err = api_error(exc)
        return error_response(err.status, err.code, err.message, err.headers)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, __: BodyTooLarge) -> JSONResponse:
        return error_response(413, "payload_too_large", too_large(max_bytes))

    @app.exception_handler(redis.RedisError)
    async def _redis_down(_: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("Redis error: %s", exc)
        return error_response(
            503, "unavailable", "Redis is unavailable; try again later", RETRY_LATER
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", exc_info=exc)
        return error_response(500, "internal", "internal server error")


def too_large(max_bytes: int) -> str:
    return f"request body over the BGQ_MAX_UPLOAD_MB limit of {max_bytes / 2**20:g} MiB"


class BodyLimit:
    """Refuse request bodies over the limit: by Content-Length at once, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                response = error_response(413, "payload_too_large", too_large(self.max_bytes))
                await response(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge
            return message

        await self.app(scope, limited, send)


class Metrics:
    """Prometheus metrics of one API process (its own registry)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "bgq_api_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "bgq_api_request_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.cache = Counter(
            "bgq_api_cache_lookups",
            "Submissions answered from the store (hit) or enqueued (miss).",
            ["result"],
            registry=self.registry,
        )
        for result in ("hit", "miss"):
            self.cache.labels(result)


class MetricsMiddleware:
    """Count every request and its latency under its route template (not the raw path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
