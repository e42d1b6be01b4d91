"""remove.bg's API on bgq: `POST /v1.0/removebg` (and carvekit's `/api/removebg`) and
`GET /v1.0/account`, so remove.bg's clients need only a new base URL.

The parameters are mapped by `removebg_fields`; the job goes through the same Submission as
`/v1/remove` (cache, lanes, per-key limits); answers and errors take remove.bg's shapes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
import zipfile
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, cast

import redis
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from PIL import Image
from starlette.concurrency import run_in_threadpool

from bgq import contract, defaults
from bgq.errors import BgqError
from bgq.options import Options
from bgq.settings import Settings
from producer.api.deps import LimiterDep, MetricsDep, ProducerDep, SettingsDep, match_key
from producer.api.errors import RETRY_LATER, ApiError, BodyTooLarge, api_error
from producer.api.jobs import Submission, wait_for
from producer.api.removebg_fields import (
    CODES,
    FILES,
    NAMES,
    PATHS,
    Mapped,
    RemoveBgError,
    Source,
    error_body,
    mapping,
)
from producer.api.removebg_openapi import json_types
from producer.api.submission import image_of, lane_of, read_fields
from producer.client import Producer
from producer.job import Job

log = logging.getLogger("bgq.api")

# bgq's error codes as remove.bg's: (status, code). A 5xx other than "internal" answers 503
# (`service_unavailable` unless named here).
ERRORS = {
    "unauthorized": (403, "auth_failed"),
    "rate_limited": (429, "rate_limit_exceeded"),
    "payload_too_large": (400, "file_too_large"),
    "image_too_large": (400, "resolution_too_high"),
    "unsupported_media_type": (400, "failed_to_read_image"),
    "unsupported_image": (400, "failed_to_read_image"),
    "fetch_failed": (400, "failed_image_download"),
    "invalid_request": (400, "invalid_parameters"),
    "job_failed": (400, "invalid_image"),
    "unavailable": (503, "service_unavailable"),
    "model_not_served": (503, "model_not_served"),
    "internal": (500, "internal_error"),
}
# What GET /v1.0/account reports: calls are never charged (X-Credits-Charged: 0), so a balance
# that no call runs down, for the clients that check it before calling.
ACCOUNT_CREDITS = 1_000_000
NO_SUBJECT = (0, 0, 0, 0)  # the foreground box of a result with no subject


def error_answer(exc: Exception) -> JSONResponse:
    """Any failure of these routes in remove.bg's shape and statuses."""
    if isinstance(exc, RemoveBgError):
        return JSONResponse(error_body(exc.title, exc.code), status_code=exc.status)
    if isinstance(exc, BodyTooLarge):
        exc = ApiError(413, "payload_too_large", str(exc))
    elif isinstance(exc, redis.RedisError):
        log.warning("Redis error: %s", exc)
        exc = ApiError(503, "unavailable", "Redis is unavailable; try again later")
    elif isinstance(exc, BgqError):
        exc = api_error(exc)
    elif not isinstance(exc, ApiError):
        log.error("internal error", exc_info=exc)
        exc = ApiError(500, "internal", "internal server error")
    status, code = ERRORS.get(exc.code, (400, "invalid_parameters"))
    title = exc.message
    if code == "invalid_parameters":
        title, code = in_remove_bg_terms(title)
    elif exc.code == "fetch_failed":
        title, code = fetch_terms("image_url", title)
    headers = dict(exc.headers or {})
    if exc.status >= 500 and exc.code != "internal":  # Retry-After: the error's own, else 5 s
        code = code if status == 503 else "service_unavailable"
        status, headers = 503, {**RETRY_LATER, **headers}
    if status == 429:
        headers |= rate_headers(headers)
    return JSONResponse(error_body(title, code), status_code=status, headers=headers)


def fetch_terms(name: str, message: str) -> tuple[str, str]:
    """A failed fetch ("cannot fetch image_url (reason): ...") titled with remove.bg's parameter
    name, and its code: invalid_image_url for a malformed image_url, else a download's."""
    rest = message.removeprefix("cannot fetch image_url").strip()
    if name == "bg_image_url":
        return f"{name}: cannot fetch {rest}", "failed_bg_download"
    bad = rest.startswith("(bad_url)")
    return f"{name}: cannot fetch {rest}", "invalid_image_url" if bad else "failed_image_download"


def in_remove_bg_terms(title: str) -> tuple[str, str]:
    """A bgq refusal ("bgcolor: ...") titled with remove.bg's parameter name, and its code."""
    name, sep, rest = title.removeprefix("invalid options: ").partition(":")
    if not sep or " " in name:
        return title, "invalid_parameters"
    name = NAMES.get(name, name)
    return f"{name}:{rest}", CODES.get(name, "invalid_parameters")


def too_large_response(message: str) -> JSONResponse:
    """BodyLimit's answer on these routes: remove.bg's 400 `file_too_large`."""
    return JSONResponse(error_body(message, "file_too_large"), status_code=400)


def rate_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """remove.bg's X-RateLimit-* fields from bgq's RateLimit fields: the limit that is used up
    (on a 429), else its requests a minute, else its jobs outstanding (Reset: Retry-After's)."""
    policy, left = headers.get("RateLimit-Policy", ""), headers.get("RateLimit", "")
    found = [rate_item(k, policy, left) for k in ("-rpm", "-jobs") if k in policy and k in left]
    if not found:
        return {}
    quota, remaining, reset = next((f for f in found if f[1] == "0"), found[0])
    return {
        "X-RateLimit-Limit": quota,
        "X-RateLimit-Remaining": remaining,
        "X-RateLimit-Reset": str(int(time.time()) + int(reset or headers.get("Retry-After", "0"))),
    }


def rate_item(kind: str, policy: str, left: str) -> tuple[str, str, str]:
    """One limit's (quota, remaining, seconds to reset or "") from the RateLimit fields."""
    quota = policy.split(kind)[1].split(";q=")[1].split(";")[0]
    item = left.split(kind)[1].split(",")[0]
    remaining = item.split(";r=")[1].split(";")[0]
    return quota, remaining, item.split(";t=")[1] if ";t=" in item else ""


class RemoveBgRoute(APIRoute):
    """A route whose every failure (its dependencies' too) answers in remove.bg's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # every failure gets remove.bg's shape
                return error_answer(exc)

        return route


async def require_api_key(request: Request) -> None:
    """One of BGQ_API_KEYS as `X-Api-Key` (remove.bg's) or a bearer token; none set: open."""
    keys: dict[str, bytes] = request.app.state.api_keys
    request.state.caller = None
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    caller = match_key(keys, request.headers.get("x-api-key", ""))
    if caller is None and scheme.lower() == "bearer":
        caller = match_key(keys, token.strip())
    if caller is None:
        raise RemoveBgError("API key missing or invalid: send X-Api-Key", "auth_failed", 403)
    request.state.caller = caller


router = APIRouter(
    route_class=RemoveBgRoute, tags=["remove.bg"], dependencies=[Depends(require_api_key)]
)


@router.post(PATHS[0], summary="remove.bg's removebg", operation_id="removebg")
@router.post(
    PATHS[1], summary="remove.bg's removebg (carvekit's path)", operation_id="removebg_api"
)
async def removebg(
    request: Request,
    settings: SettingsDep,
    producer: ProducerDep,
    metrics: MetricsDep,
    limiter: LimiterDep,
) -> Response:
    body, uploads = await read_fields(request, FILES, json_types(), nullable=True)
    params = dict(request.query_params) | body
    mapped = mapping(params, frozenset(uploads))
    fields = dict(mapped.fields)
    probe = {"bg_image": "0" * 64} if mapped.background else {}
    options_for(fields | probe, settings)  # refused before anything is counted or fetched
    upload = image_bytes(mapped.image, uploads)
    if mapped.image.kind == "url":
        fields["image_url"] = cast(str, mapped.image.url)
    sent = Submission(request, settings, producer, metrics, limiter)
    await sent.count(lane_of(fields))  # before the background is fetched or stored
    if mapped.background is not None:
        fields["bg_image"] = await store_background(request, producer, mapped, uploads)
    parsed = options_for(fields, settings)
    job = await sent.submit(fields, upload, callback=None, record_hits=False, parsed=parsed)
    deadline = asyncio.get_running_loop().time() + defaults.API_MAX_WAIT
    await ready(request, job, deadline)
    return await answer(request, sent, job, fields, deadline, mapped.classify)


async def answer(
    request: Request,
    sent: Submission,
    job: Job,
    fields: dict[str, str],
    deadline: float,
    classify: bool,
) -> Response:
    """The result with remove.bg's headers: the image, or its JSON for Accept: application/json."""
    data = await run_in_threadpool(sent.producer.store.read_output, job.output)
    box = await foreground(request, sent, fields, data, deadline)
    headers = {
        **box,
        **({"X-Type": "other"} if classify else {}),
        "X-Credits-Charged": "0",
        "X-Bgq-Job-Id": job.key,
        "X-Bgq-Cached": "true" if job.cached else "false",
        **sent.limit_headers,
        **rate_headers(sent.limit_headers),
    }
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse(json_result(data, box), headers=headers)
    return Response(data, media_type=contract.media_type(job.output), headers=headers)


@router.get("/v1.0/account", summary="remove.bg's account", operation_id="removebg_account")
async def account() -> JSONResponse:
    credits = {"total": ACCOUNT_CREDITS, "subscription": 0, "payg": 0}
    attributes = {
        "credits": {**credits, "enterprise": ACCOUNT_CREDITS},
        "api": {"free_calls": ACCOUNT_CREDITS, "sizes": "all"},
    }
    return JSONResponse({"data": {"attributes": attributes}})


def options_for(fields: dict[str, str], settings: Settings) -> tuple[str, Options]:
    """The server's model and the mapped fields' options: bg_image too, which bgq's own API
    does not take as a field (image_url is the image's, not an option)."""
    return settings.model, Options.parse({k: v for k, v in fields.items() if k != "image_url"})


def image_bytes(source: Source, uploads: dict[str, bytes]) -> bytes | None:
    """The image's bytes as sent (None: fetched from image_url by the submission)."""
    if source.kind == "file":
        return uploads["image_file"]
    return source.data


async def store_background(
    request: Request, producer: Producer, mapped: Mapped, uploads: dict[str, bytes]
) -> str:
    """The background image stored as an input (fetched first from bg_image_url); its digest."""
    source = cast(Source, mapped.background)
    name = "bg_image_url" if source.kind == "url" else "bg_image_file"
    try:
        if source.kind == "url":
            settings = request.app.state.settings
            data = await image_of(request, settings, {"image_url": cast(str, source.url)}, None)
        else:
            data = uploads["bg_image_file"]
        digest = await run_in_threadpool(producer.put_image, data)
    except BgqError as exc:
        err = api_error(exc)
        if err.status >= 500:
            raise
        status, code = ERRORS.get(err.code, (400, "invalid_parameters"))
        title = f"{name}: {err.message}"
        if err.code == "fetch_failed":
            title, code = fetch_terms(name, err.message)
        raise RemoveBgError(title, code, status) from None
    return digest


async def ready(request: Request, job: Job, deadline: float) -> None:
    """Wait for the job's result until `deadline` (the loop's time, API_MAX_WAIT after the
    submission); past that, 503 (the job goes on)."""
    left = deadline - asyncio.get_running_loop().time()
    if job.cached or await wait_for(request, job, max(0.0, left)):
        return
    raise ApiError(
        503,
        "unavailable",
        f"no result within {defaults.API_MAX_WAIT:g} s; the job goes on: retry this request",
    )


async def foreground(
    request: Request, sent: Submission, fields: dict[str, str], data: bytes, deadline: float
) -> dict[str, str]:
    """X-Width, X-Height and X-Foreground-*: the subject's box is the result's alpha > 0, or
    for an opaque result its transparent sibling's (the same job without background, as PNG:
    the same mask, no second inference) if it is ready by `deadline`; else no box headers."""
    width, height, box = await run_in_threadpool(measure, data)
    size = {"X-Width": str(width), "X-Height": str(height)}
    options = options_for(fields, sent.settings)[1]
    if opaque(options, fields):
        plain = {k: v for k, v in fields.items() if k not in SIBLING_DROPS}
        ready_in_time, box = await sibling_box(request, sent, plain, deadline)
        if not ready_in_time:
            return size
    left, top, box_width, box_height = box or NO_SUBJECT
    return {
        **size,
        "X-Foreground-Top": str(top),
        "X-Foreground-Left": str(left),
        "X-Foreground-Width": str(box_width),
        "X-Foreground-Height": str(box_height),
    }


Box = tuple[int, int, int, int] | None


async def sibling_box(
    request: Request, sent: Submission, fields: dict[str, str], deadline: float
) -> tuple[bool, Box]:
    """The subject's box in the transparent sibling, submitted as part of the same request
    (through the caller's job limits, not counted again); False when it is refused or not
    ready by `deadline` (with no box)."""
    model, options = options_for(fields, sent.settings)
    image, usages = cast(bytes, sent.image), sent.usages or []
    shown = sent.limit_headers  # the answer's: the main job's, not the sibling's
    try:
        job = await run_in_threadpool(sent.enqueue, image, model, options, lane_of(fields), usages)
        await ready(request, job, deadline)
    except (ApiError, BgqError, redis.RedisError) as exc:  # the result stands without its box
        log.info("no foreground box for %s: %s", sent.caller, exc)
        return False, None
    finally:
        sent.limit_headers = shown
    png = await run_in_threadpool(sent.producer.store.read_output, job.output)
    return True, (await run_in_threadpool(measure, png))[2]


SIBLING_DROPS = ("bgcolor", "bg_image", "format", "quality")  # what makes a result opaque


def opaque(options: Options, fields: dict[str, str]) -> bool:
    """Whether the result's own alpha cannot give the subject's box (none, or a lossy mask)."""
    if options.format == "jpeg" or (options.only_mask and options.format == "webp"):
        return True
    return not options.only_mask and ("bgcolor" in fields or "bg_image" in fields)


def measure(data: bytes) -> tuple[int, int, tuple[int, int, int, int] | None]:
    """A result's width, height and the (left, top, width, height) of its alpha > 0 (a mask's
    own values; a zip's alpha.png); None without a subject or without alpha."""
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as bundle:
            data = bundle.read("alpha.png")
    with Image.open(io.BytesIO(data)) as img:
        alpha: Image.Image = img
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            alpha = img.convert("RGBA").getchannel("A")
        elif img.mode != "L":
            return img.width, img.height, None
        bbox = alpha.getbbox()
        if bbox is None:
            return img.width, img.height, None
        left, top, right, bottom = bbox
        return img.width, img.height, (left, top, right - left, bottom - top)


def json_result(data: bytes, box: dict[str, str]) -> dict[str, Any]:
    """remove.bg's JSON answer (`Accept: application/json`)."""
    result: dict[str, Any] = {"result_b64": base64.b64encode(data).decode()}
    for side in ("top", "left", "width", "height"):
        if f"X-Foreground-{side.capitalize()}" in box:  # absent: no sibling in time
            result[f"foreground_{side}"] = int(box[f"X-Foreground-{side.capitalize()}"])
    return {"data": result}
