"""The errors of `bgq api`: one JSON shape, `{"error": {"code", "message"}}`, for every failure."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
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
    ModelNotServed,
    StoreError,
    UnsupportedImage,
)
from bgq.fetch import FetchFailed
from bgq.webhooks import CallbackNotAllowed

log = logging.getLogger("bgq.api")


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
NOT_SERVED_RETRY = {"Retry-After": str(defaults.API_MODEL_RETRY_AFTER)}  # but model_not_served's
# The codes of the framework's own HTTP errors (a route or a method that is not there).
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
OTHER_HTTP_CODE = "http_error"  # any other status Starlette raises


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
    if isinstance(exc, ModelNotServed):
        return ApiError(503, "model_not_served", str(exc), NOT_SERVED_RETRY)
    if isinstance(exc, BrokerError | ConfigError | StoreError):
        return ApiError(503, "unavailable", str(exc), RETRY_LATER)
    return ApiError(500, "internal", str(exc))


class BodyTooLarge(Exception):
    """A body that grew past the limit while being read (limits.BodyLimit raises it)."""


def install_error_handlers(app: FastAPI) -> None:
    """One JSON error shape for every failure, never a stack trace."""
    for kind, handler in HANDLERS.items():
        app.add_exception_handler(kind, handler)


async def on_api_error(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def on_bgq_error(_: Request, exc: BgqError) -> JSONResponse:
    err = api_error(exc)
    return error_response(err.status, err.code, err.message, err.headers)


async def on_too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
    return error_response(413, "payload_too_large", str(exc))


async def on_redis_down(_: Request, exc: redis.RedisError) -> JSONResponse:
    log.warning("Redis error: %s", exc)
    return error_response(503, "unavailable", "Redis is unavailable; try again later", RETRY_LATER)


async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = HTTP_CODES.get(exc.status_code, OTHER_HTTP_CODE)
    return error_response(exc.status_code, code, str(exc.detail), exc.headers)


async def on_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return error_response(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}")


async def on_internal(_: Request, exc: Exception) -> JSONResponse:
    log.error("internal error", exc_info=exc)
    return error_response(500, "internal", "internal server error")


HANDLERS: dict[type[Exception], Callable[[Request, Any], Awaitable[JSONResponse]]] = {
    ApiError: on_api_error,
    BgqError: on_bgq_error,
    BodyTooLarge: on_too_large,
    redis.RedisError: on_redis_down,
    StarletteHTTPException: on_http_error,
    RequestValidationError: on_invalid,
    Exception: on_internal,
}
