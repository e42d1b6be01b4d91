"""A submission to `bgq api`: its fields (query string, then multipart, urlencoded or JSON
fields) and image bytes, uploaded or fetched from `image_url`; `read_fields` reads a body's
fields for any route.

Every field is checked where it was sent, so a valid form field never hides a bad query one:
a request the OpenAPI schema calls invalid is refused, whichever part carries the fault.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Mapping

import anyio
from fastapi import Request
from pydantic import ValidationError
from python_multipart.exceptions import ParseError
from starlette.exceptions import HTTPException

from bgq import contract, defaults, webhooks
from bgq.fetch import fetch_setting_image
from bgq.options import PYTHON_ONLY, Options
from bgq.settings import Settings
from producer.api.errors import ApiError
from producer.api.openapi import IMAGE_URL_PATTERN, json_types

REQUEST_FIELDS = ("model", "lane", "wait", "callback_url", "image_url")  # besides rembg's options
# The options a request may set as fields: bg_image names a stored input, which this API has
# no way to upload (the remove.bg route's bg_image_url and bg_image_file do).
OPTION_FIELDS = frozenset(Options.model_fields) - PYTHON_ONLY
ONE_IMAGE = "send exactly one of image (a multipart `file` or the body) and image_url"
MULTIPART, URLENCODED, JSON = (
    "multipart/form-data",
    "application/x-www-form-urlencoded",
    "application/json",
)
FIELD_BODIES = (MULTIPART, URLENCODED, JSON)  # the bodies `read_fields` reads
FILE = "file"  # the one file part of bgq's own routes
MAX_FIELDS = 32  # multipart fields in one body


def options_of(fields: dict[str, str], default_model: str) -> tuple[str, Options]:
    """The model and rembg options of `fields`; anything unknown or invalid raises."""
    unknown = set(fields) - set(REQUEST_FIELDS) - OPTION_FIELDS
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown field(s): {', '.join(sorted(unknown))}")
    model = contract.check_model(fields.get("model", default_model))
    return model, Options.parse({k: v for k, v in fields.items() if k in OPTION_FIELDS})


def lane_of(fields: dict[str, str]) -> str:
    """The `lane` field: interactive (the default) or bulk."""
    return contract.check_lane(fields.get("lane", contract.INTERACTIVE))


def wait_seconds(fields: dict[str, str]) -> float:
    """The `wait` field: 0 to API_MAX_WAIT seconds."""
    try:
        wait = float(fields.get("wait", defaults.API_WAIT))
    except ValueError:
        raise ApiError(422, "invalid_request", "wait: must be a number of seconds") from None
    if not 0 <= wait <= defaults.API_MAX_WAIT:
        raise ApiError(
            422, "invalid_request", f"wait: must be between 0 and {defaults.API_MAX_WAIT:g}"
        )
    return wait


def check_alone(fields: dict[str, str], default_model: str) -> None:
    """Check each of one part's fields by itself (the body's fields may replace or complete
    them: rules across fields, such as padding needing a canvas, apply to the merged fields)."""
    unknown = set(fields) - set(REQUEST_FIELDS) - OPTION_FIELDS
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown field(s): {', '.join(sorted(unknown))}")
    contract.check_model(fields.get("model", default_model))
    values = {k: v for k, v in fields.items() if k in OPTION_FIELDS}
    try:
        Options.model_validate(values)
    except ValidationError as exc:
        if any(e["loc"] for e in exc.errors()):  # a field's own fault, not a combination's
            Options.parse(values)  # raises, naming the option
    if "lane" in fields:
        lane_of(fields)
    if "wait" in fields:
        wait_seconds(fields)
    if "callback_url" in fields:
        webhooks.check_callback_syntax(fields["callback_url"])
    if "image_url" in fields:
        check_image_url(fields["image_url"])


def check_image_url(url: str) -> None:
    """An http(s) URL with a host and no credentials (the schema's pattern)."""
    if not re.fullmatch(IMAGE_URL_PATTERN, url):
        raise ApiError(
            422,
            "invalid_request",
            "image_url: must be an http:// or https:// URL with a host, without credentials",
        )


async def read_submission(
    request: Request, settings: Settings
) -> tuple[dict[str, str], bytes | None]:
    """The fields and the uploaded image of a submission (None: `image_url` names it)."""
    fields, data = await read_parts(request, settings.model)
    url = fields.get("image_url")
    if (data is None) == (url is None):
        raise ApiError(422, "invalid_request", ONE_IMAGE)
    if url is not None:
        check_alone(fields, settings.model)  # a request refused anyway fetches nothing
        options_of(fields, settings.model)
    return fields, data


async def image_of(
    request: Request, settings: Settings, fields: dict[str, str], data: bytes | None
) -> bytes:
    """The submission's image: the upload, else fetched from `image_url`."""
    if data is not None:
        return data
    fetch = functools.partial(fetch_setting_image, settings, fields["image_url"])
    # Threads of their own: slow image servers never take the threads every request needs.
    return await anyio.to_thread.run_sync(fetch, limiter=_fetch_limiter(request))


def _fetch_limiter(request: Request) -> anyio.CapacityLimiter:
    """The app's limit on image fetches at once, made in its event loop on first use."""
    state = request.app.state
    if getattr(state, "fetch_limiter", None) is None:
        state.fetch_limiter = anyio.CapacityLimiter(defaults.API_FETCH_CONCURRENCY)
    return state.fetch_limiter


def media_type(request: Request) -> str:
    """The request's Content-Type without its parameters, in lower case ("" when absent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_parts(request: Request, default_model: str) -> tuple[dict[str, str], bytes | None]:
    """The fields (query, then form or JSON fields) and the uploaded image bytes, if any."""
    fields = dict(request.query_params)
    ctype = media_type(request)
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return fields, await request.body()
    if ctype == "":
        return fields, await request.body() or None  # no type, no body: no image
    if ctype not in FIELD_BODIES:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the image as multipart `file`, a raw image/* body or an image_url, not {ctype}",
        )
    check_alone(fields, default_model)
    body, files = await read_fields(request, frozenset({FILE}))
    return fields | body, files.get(FILE)


async def read_fields(
    request: Request,
    files: frozenset[str],
    types: Mapping[str, str] | None = None,
    nullable: bool = False,
) -> tuple[dict[str, str], dict[str, bytes]]:
    """The body's fields and its file parts named in `files`: multipart, urlencoded or a JSON
    object (each field of its JSON type in `types`, bgq's by default; with `nullable`, a null
    is an absent field); the query is the caller's."""
    ctype = media_type(request)
    if ctype == JSON:
        return await read_json(request, json_types() if types is None else types, nullable), {}
    if ctype in (MULTIPART, URLENCODED):
        return await read_form(request, files)
    if ctype == "" and not await request.body():
        return {}, {}
    raise ApiError(
        415,
        "unsupported_media_type",
        f"send {', '.join(FIELD_BODIES)}, not {ctype or 'a body without a Content-Type'}",
    )


async def read_form(
    request: Request, files: frozenset[str]
) -> tuple[dict[str, str], dict[str, bytes]]:
    """The fields and the file parts named in `files` of a multipart or urlencoded body."""
    kind = "multipart" if media_type(request) == MULTIPART else "urlencoded"
    try:
        form = await request.form(max_files=max(1, len(files)), max_fields=MAX_FIELDS)
    except HTTPException as exc:  # Starlette's 400 for a malformed body
        raise ApiError(422, "invalid_request", f"malformed {kind} body: {exc.detail}") from None
    except ParseError as exc:  # the parser's own, which Starlette lets through (a bad header)
        raise ApiError(422, "invalid_request", f"malformed {kind} body: {exc}") from None
    try:
        fields: dict[str, str] = {}
        uploads: dict[str, bytes] = {}
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields[name] = value
            elif name not in files:
                raise ApiError(422, "invalid_request", f"{name}: must be a field, not a file")
            else:
                uploads[name] = await value.read()
        misplaced = sorted(files & fields.keys())
        if misplaced:
            raise ApiError(422, "invalid_request", f"{misplaced[0]}: must be a file part")
        return fields, uploads
    finally:
        await form.close()


async def read_json(
    request: Request, types: Mapping[str, str], nullable: bool = False
) -> dict[str, str]:
    """The fields of a JSON object body, each of its JSON type in `types`, as text (a null
    left out with `nullable`)."""
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(422, "invalid_request", f"malformed JSON body: {exc}") from None
    except ValueError:  # an integer past Python's limit on digits converted (4300 by default)
        digits = sys.get_int_max_str_digits()
        too_long = f"malformed JSON body: a number of over {digits} digits"
        raise ApiError(422, "invalid_request", too_long) from None
    except RecursionError:
        raise ApiError(422, "invalid_request", "malformed JSON body: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_request", "the JSON body must be an object")
    fields: dict[str, str] = {}
    for name, value in body.items():
        kind = types.get(name)
        if kind is None:
            raise ApiError(422, "invalid_request", f"unknown field(s): {name}")
        if value is None and nullable:
            continue
        if not _is_json_type(value, kind):
            raise ApiError(422, "invalid_request", f"{name}: must be a JSON {kind}")
        fields[name] = _as_text(value, kind)
    return fields


def _is_json_type(value: object, kind: str) -> bool:
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":  # JSON Schema counts 3.0 as an integer
        is_whole = isinstance(value, float) and value.is_integer()
        return (isinstance(value, int) and not isinstance(value, bool)) or is_whole
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, str)


def _as_text(value: object, kind: str) -> str:
    """A JSON value as the same field's text in a query string or form."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if kind == "integer":
        return str(int(value))  # type: ignore[call-overload]
    return str(value)
