"""A submission to `bgq api`: its fields (query string, then form fields) and image bytes.

Every field is checked where it was sent, so a valid form field never hides a bad query one:
a request the OpenAPI schema calls invalid is refused, whichever part carries the fault.
"""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from bgq import contract, defaults, webhooks
from bgq.contract import Options
from producer.api_http import ApiError

REQUEST_FIELDS = ("model", "wait", "callback_url")  # besides the rembg options


def options_of(fields: dict[str, str], default_model: str) -> tuple[str, Options]:
    """The model and rembg options of `fields`; anything unknown or invalid raises."""
    unknown = set(fields) - set(REQUEST_FIELDS) - set(Options.model_fields)
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown field(s): {', '.join(sorted(unknown))}")
    model = contract.check_model(fields.get("model", default_model))
    return model, Options.parse({k: v for k, v in fields.items() if k in Options.model_fields})


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
    """Check one part's fields by themselves (the form may replace them later)."""
    options_of(fields, default_model)
    if "wait" in fields:
        wait_seconds(fields)
    if "callback_url" in fields:
        webhooks.check_callback_syntax(fields["callback_url"])


async def read_image(request: Request, default_model: str) -> tuple[dict[str, str], bytes]:
    """The fields (query, then form fields) and the image bytes of a submission."""
    fields = dict(request.query_params)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        check_alone(fields, default_model)
        return await read_form(request, fields)
    if ctype.startswith("image/") or ctype in ("application/octet-stream", ""):
        return fields, await request.body()
    raise ApiError(
        415,
        "unsupported_media_type",
        f"send the image as multipart `file` or a raw image/* body, not {ctype or 'nothing'}",
    )


async def read_form(request: Request, fields: dict[str, str]) -> tuple[dict[str, str], bytes]:
    """The multipart `file` part, and the form fields over the query's."""
    try:
        form = await request.form(max_files=1, max_fields=32)
    except HTTPException as exc:  # Starlette's 400 for a malformed body
        raise ApiError(422, "invalid_request", f"malformed multipart body: {exc.detail}") from None
    try:
        upload = form.get("file")
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields[name] = value
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "invalid_request", "multipart body has no `file` part")
        return fields, await upload.read()
    finally:
        await form.close()
