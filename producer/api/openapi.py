"""The OpenAPI document of `bgq api`: what FastAPI cannot derive from the routes themselves.

Every status a route can answer, with its body and headers, and every constraint the server
enforces on a parameter; the option constraints come from `bgq.options.Options` (one source).
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from bgq import contract, defaults, lengths, options, webhooks

ERROR = {"$ref": "#/components/schemas/Error"}
JOB = {"$ref": "#/components/schemas/Job"}
KEY_PATTERN = "^[0-9a-f]{64}$"
IMAGE_TYPES = ("image/*", "application/octet-stream")
# What an image URL may look like: http(s), a host (a name, an IPv4 or a bracketed IPv6
# literal, an optional port; no credentials), then printable ASCII. Whether it parses, where it
# points and what it serves is the fetch's business (422 fetch_failed).
IMAGE_URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9.:\[\]-]+([/?#][!-~]*)?$"


def up_to(limit: int) -> str:
    """A regex of the decimal integers 1..limit (no sign, no leading zero)."""
    digits = str(limit)
    alternatives = [f"[1-9][0-9]{{0,{len(digits) - 2}}}"] if len(digits) > 1 else []
    for i, digit in enumerate(digits):  # same length: a smaller digit at position i
        low = 1 if i == 0 else 0
        if int(digit) > low:
            rest = len(digits) - i - 1
            alternatives.append(f"{digits[:i]}[{low}-{int(digit) - 1}][0-9]{{{rest}}}")
    return "(" + "|".join([*alternatives, digits]) + ")"


# The canvas as Options accepts it: CANVAS_PATTERN with each side at most CANVAS_MAX_SIDE.
CANVAS_SCHEMA_PATTERN = f"^{up_to(defaults.CANVAS_MAX_SIDE)}x{up_to(defaults.CANVAS_MAX_SIDE)}$"


def header(text: str, required: bool = True, **schema: Any) -> dict[str, Any]:
    """A response header (a string), required unless said otherwise."""
    return {"description": text, "required": required, "schema": {"type": "string", **schema}}


def error(description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    """A documented error answer: `{"error": {"code", "message"}}` (and headers)."""
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": ERROR}},
    }
    if headers:
        out["headers"] = {name.replace("_", "-"): value for name, value in headers.items()}
    return out


ERRORS = {
    "401": error(
        "`unauthorized`: BGQ_API_KEYS is set and `Authorization: Bearer <key>` is missing or wrong",
        WWW_Authenticate=header("`Bearer`"),
    ),
    "404": error("`not_found`: no such job (ids are 64 hex digits)"),
    "409": error("`not_ready`: the job is queued or running; `job_failed`: it failed"),
    "413": error(
        "`payload_too_large`: body over BGQ_MAX_UPLOAD_MB; "
        "`image_too_large`: image over BGQ_MAX_MEGAPIXELS"
    ),
    "415": error(
        "`unsupported_media_type`: neither multipart, urlencoded, JSON nor an image body, "
        "or not an image"
    ),
    "422": error(
        "`invalid_request`: an unknown or invalid field, an invalid combination of options "
        "(crop_margin without crop, padding without canvas, position without canvas or scale, "
        "scale with canvas, padding of half the canvas or more, format zip with bgcolor or "
        "only_mask, a roi whose x2 or y2 is not "
        "past x1 or y1 in the same unit), not exactly one of image and image_url, a "
        "callback_url while BGQ_WEBHOOK_SECRET is unset; `fetch_failed`: image_url could not "
        "be fetched or is not an image (the reason is in the message: DNS, a non-public "
        "address unless BGQ_FETCH_ALLOW_PRIVATE, an HTTP status, a timeout, over "
        "BGQ_MAX_UPLOAD_MB, too many redirects); `callback_not_allowed`: the callback host "
        "resolves to a non-public address (unless BGQ_WEBHOOK_ALLOW_PRIVATE); "
        "`unsupported_image`: rembg cannot process the image's mode; `job_failed`: the worker "
        "failed on the image (e.g. truncated)"
    ),
    "503": error(
        "`unavailable`: Redis or the store is unreachable; retry after `Retry-After` seconds",
        Retry_After=header("seconds", pattern="^[0-9]+$"),
    ),
}
# A submission's 503 may also say that no live worker serves its model (a cached result is
# answered whatever the workers).
SUBMIT_UNAVAILABLE = error(
    "`unavailable`: Redis or the store is unreachable; `model_not_served`: no live worker "
    "serves the request's model (the message names the models served); retry after "
    "`Retry-After` seconds",
    Retry_After=header("seconds", pattern="^[0-9]+$"),
)
# The fields of draft-ietf-httpapi-ratelimit-headers: each limit of the request's lane that the
# caller's key has, `"<lane>-rpm";q=<n>;w=60` (submissions per minute) and
# `"<lane>-jobs";q=<n>;qu="concurrent-requests"` (jobs outstanding at once).
RATELIMIT_POLICY = 'the key\'s limits in this lane, e.g. `"bulk-rpm";q=60;w=60`'
RATELIMIT = 'what is left of each, e.g. `"bulk-rpm";r=12;t=30, "bulk-jobs";r=0`'
LIMITED = error(
    "`rate_limited`: over one of the key's limits (BGQ_API_LIMITS) in the request's lane, "
    "submissions per minute or jobs outstanding at once; retry after `Retry-After` seconds",
    Retry_After=header("seconds", pattern="^[1-9][0-9]*$"),
    RateLimit_Policy=header(RATELIMIT_POLICY),
    RateLimit=header(RATELIMIT),
)
PNG_HEADERS = {
    "ETag": header('`"<job id>"`'),
    "Cache-Control": header("immutable"),
    "X-Bgq-Job-Id": header("the job id (the cache key)", pattern=KEY_PATTERN),
}
RESULT = {
    "content": {
        media_type: {"schema": {"type": "string", "format": "binary"}}
        for media_type in options.CONTENT_TYPES.values()
    }
}
ACCEPTED = {
    "description": "The job (queued, or done for a cache hit); `Location` is its URL",
    "content": {"application/json": {"schema": JOB}},
    "headers": {"Location": header("/v1/jobs/<id>")},
    "links": {
        "GetJob": {"operationId": "get_job", "parameters": {"job_id": "$response.body#/id"}},
        "GetResult": {"operationId": "get_result", "parameters": {"job_id": "$response.body#/id"}},
    },
}


def option_parameters() -> list[dict[str, Any]]:
    """OpenAPI query parameters: the model and every option (one source: Options)."""
    params: list[dict[str, Any]] = [
        {
            "name": "model",
            "in": "query",
            "description": f"rembg model (default: the server's BGQ_MODEL, {defaults.MODEL})",
            "schema": {"type": "string", "enum": sorted(defaults.MODELS)},
        }
    ]
    schema = options.Options.model_json_schema()["properties"]
    for name in options.Options.model_fields:
        if name in options.PYTHON_ONLY:
            continue  # not a field of this API (bgq.options.PYTHON_ONLY)
        prop = {k: v for k, v in schema[name].items() if k != "title"}
        if name == "bgcolor":
            prop = {
                "type": "string",
                "pattern": options.BGCOLOR_PATTERN,
                "example": "255,255,255,255",
            }
            prop["description"] = "background colour r,g,b,a (each 0-255); default: transparent"
        prop.update(SHAPING.get(name, {}))
        params.append({"name": name, "in": "query", "schema": prop})
    return params


LENGTH = {"type": "string", "pattern": lengths.LENGTH_PATTERN, "default": "0"}
# The shaping options as the server checks them (one field at a time; rules across fields are
# in the 422's description).
SHAPING: dict[str, dict[str, Any]] = {
    "format": {
        "description": "output format: png, webp (keeps alpha), jpeg (flattened) or zip "
        "(application/zip: color.jpg, the RGB colours, and alpha.png, the alpha channel; "
        "not with bgcolor or only_mask)"
    },
    "quality": {
        "type": "integer",
        "minimum": 1,
        "maximum": 100,
        "default": defaults.QUALITY,
        "description": "webp, jpeg and zip (its color.jpg) quality; png ignores it",
    },
    "crop": {"description": "crop to the subject's bounding box"},
    "crop_margin": {
        **LENGTH,
        "pattern": lengths.MARGIN_PATTERN,
        "description": "margin kept around the subject with crop=true: pixels (20, 20px) or a "
        "percentage of the subject's box (5%); one value, `TB LR` or `T R B L` (CSS order)",
    },
    "canvas": {
        "type": "string",
        "pattern": CANVAS_SCHEMA_PATTERN,
        "example": "1000x1000",
        "description": f"put the subject on a WIDTHxHEIGHT canvas (each side 1 to "
        f"{defaults.CANVAS_MAX_SIDE} px), scaled to fit inside the padding",
    },
    "padding": {
        **LENGTH,
        "description": "space between the subject and the canvas edge, with canvas: pixels "
        "or a percentage of the canvas side; under half the canvas",
    },
    "position": {
        "type": "string",
        "pattern": lengths.POSITION_PATTERN,
        "default": "center",
        "description": "where the subject sits in the free space, with canvas or scale: center, "
        "top, bottom, `X%` (both axes) or `X% Y%` (0% left or top, 100% right or bottom)",
    },
    "roi": {
        "type": "string",
        "pattern": lengths.ROI_PATTERN,
        "example": "10% 0% 90% 100%",
        "description": "region of interest `x1 y1 x2 y2`: pixels (20, 20px) or percentages of "
        "the image's width (x) and height (y); everything outside it becomes background. "
        "x2 must be past x1 and y2 past y1",
    },
    "scale": {
        "type": "string",
        "pattern": lengths.SCALE_PATTERN,
        "example": "80%",
        "description": "the subject scaled to fit this share of the frame (10% to 100%), or "
        "`original` (its own size), and put at `position`; not with canvas",
    },
    "fit_megapixels": {
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": defaults.FIT_MAX_MEGAPIXELS,
        "example": 0.25,
        "description": "the output scaled down (never up) to at most this many megapixels",
    },
}
IMAGE_URL = {
    "name": "image_url",
    "in": "query",
    "description": "Fetch the image from this http(s) URL instead of uploading it (exactly one "
    "of the two). Non-public hosts are refused unless BGQ_FETCH_ALLOW_PRIVATE.",
    "schema": {"type": "string", "pattern": IMAGE_URL_PATTERN},
}


LANE = {
    "name": "lane",
    "in": "query",
    "description": "`interactive` (the default: run before any bulk work) or `bulk` (catalogs: "
    "runs in idle capacity, shared fairly between API keys)",
    "schema": {"type": "string", "enum": list(contract.LANES), "default": contract.INTERACTIVE},
}
WAIT = {
    "name": "wait",
    "in": "query",
    "description": "Seconds to wait for the result before answering 202 with the job.",
    "schema": {
        "type": "number",
        "default": defaults.API_WAIT,
        "minimum": 0,
        "maximum": defaults.API_MAX_WAIT,
    },
}
CALLBACK_URL = {
    "name": "callback_url",
    "in": "query",
    "description": "POSTed the job's JSON when it ends (signed; needs BGQ_WEBHOOK_SECRET). "
    "A host that does not resolve yet is accepted: deliveries are retried.",
    "schema": {
        "type": "string",
        "pattern": webhooks.CALLBACK_URL_PATTERN,
    },
}


def image_body(extra: list[dict[str, Any]]) -> dict[str, Any]:
    """The image as a multipart `file` (options as form fields too), as the raw body, or by
    `image_url` in a urlencoded form or a JSON object of the same fields (or in the query)."""
    fields = {p["name"]: p["schema"] for p in [*option_parameters(), IMAGE_URL, *extra]}
    raw = {"schema": {"type": "string", "format": "binary"}}
    named = {"schema": {"type": "object", "properties": fields, "additionalProperties": False}}
    return {
        "required": True,
        "description": "Exactly one image: a multipart `file`, the raw body, or `image_url` "
        "(a multipart or urlencoded form field, a JSON field, or the query parameter, then with "
        "an empty form or JSON object or no body at all). Booleans in a form are `true` or "
        "`false`.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}, **fields},
                    "additionalProperties": False,
                },
                "encoding": {"file": {"contentType": "image/*"}},
            },
            "application/x-www-form-urlencoded": named,
            "application/json": named,
            **{media_type: raw for media_type in IMAGE_TYPES},
        },
    }


def json_types() -> dict[str, str]:
    """The JSON type of every field a JSON body may carry (the route decides which apply)."""
    params = [*option_parameters(), IMAGE_URL, LANE, WAIT, CALLBACK_URL]
    return {p["name"]: p["schema"]["type"] for p in params}


def job_id() -> dict[str, Any]:
    """The path parameter: documented as a key (others answer 404, as unknown jobs do)."""
    return {
        "name": "job_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": KEY_PATTERN},
    }


def operations() -> dict[str, dict[str, Any]]:
    """Parameters, body and answers of each operation, by operationId."""
    png = {"description": "The result (its format's type)", **RESULT, "headers": PNG_HEADERS}
    return {
        "remove": {
            "parameters": [*option_parameters(), IMAGE_URL, LANE, WAIT],
            "requestBody": image_body([LANE, WAIT]),
            "responses": {
                "200": png,
                "202": ACCEPTED,
                **pick("413", "415", "422"),
                "503": SUBMIT_UNAVAILABLE,
            },
        },
        "create_job": {
            "parameters": [*option_parameters(), IMAGE_URL, LANE, CALLBACK_URL],
            "requestBody": image_body([LANE, CALLBACK_URL]),
            "responses": {"202": ACCEPTED, **pick("413", "415", "422"), "503": SUBMIT_UNAVAILABLE},
        },
        "get_job": {
            "parameters": [job_id()],
            "responses": {
                "200": {
                    "description": "The job",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/JobView"}}
                    },
                },
                **pick("404", "503"),
            },
        },
        "get_result": {
            "parameters": [
                job_id(),
                {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}},
            ],
            "responses": {
                "200": png,
                "304": {
                    "description": "If-None-Match names this result",
                    "headers": {"ETag": PNG_HEADERS["ETag"]},
                },
                "307": {
                    "description": "BGQ_RESULT_REDIRECT=presigned: the result's presigned URL",
                    "headers": {"Location": header("a presigned URL")},
                },
                **pick("404", "409", "503"),
            },
        },
    }


def pick(*statuses: str) -> dict[str, Any]:
    """The documented error answers of these statuses."""
    return {status: ERRORS[status] for status in statuses}


COMPONENTS = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            }
        },
    },
    "Job": {
        "type": "object",
        "required": ["id", "status", "cached", "result_url"],
        "properties": {
            "id": {"type": "string", "pattern": KEY_PATTERN},
            "status": {"type": "string", "enum": ["queued", "done"]},
            "cached": {"type": "boolean"},
            "result_url": {"type": "string", "format": "uri"},
        },
    },
}
READY = {
    "type": "object",
    "required": ["ready", "redis", "workers", "store"],
    "properties": {
        "ready": {"type": "boolean"},
        "redis": {"type": "boolean"},
        "workers": {"type": "integer", "minimum": 0},
        "store": {"type": "boolean"},
        "error": {"type": "string"},
    },
}


SUBMISSIONS = ("remove", "create_job")  # the operations BGQ_API_LIMITS counts


def complete(document: dict[str, Any], secured: bool, limited: bool = False) -> dict[str, Any]:
    """FastAPI's document with every operation's parameters, body, answers and security (and
    the 429 and rate-limit fields of submissions when keys have limits)."""
    doc = copy.deepcopy(document)
    ops = operations()
    for path, methods in doc["paths"].items():
        for op in methods.values():
            op.update(copy.deepcopy(ops.get(op["operationId"], {})))
            if secured and path.startswith("/v1/"):
                op["security"] = [{"bearer": []}]
                op["responses"]["401"] = ERRORS["401"]
            if limited and op["operationId"] in SUBMISSIONS:
                limit_answers(op["responses"])
    readyz = doc["paths"]["/readyz"]["get"]["responses"]
    body = {"application/json": {"schema": READY}}
    readyz["200"] = {"description": "Ready", "content": body}
    readyz["503"] = {
        "description": "Not ready",
        "content": body,
        "headers": {"Retry-After": ERRORS["503"]["headers"]["Retry-After"]},
    }
    doc["paths"]["/metrics"]["get"]["responses"]["200"] = {
        "description": "Prometheus text format",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas.update(COMPONENTS)
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


def limit_answers(responses: dict[str, Any]) -> None:
    """A submission's answers under limits: the 429; the rate-limit fields on the others too,
    present when the key has limits in the request's lane."""
    fields = {
        "RateLimit-Policy": header(RATELIMIT_POLICY, False),
        "RateLimit": header(RATELIMIT, False),
    }
    for status in ("200", "202"):
        if status in responses:
            responses[status].setdefault("headers", {}).update(copy.deepcopy(fields))
    responses["429"] = copy.deepcopy(LIMITED)


def install_openapi(app: FastAPI, secured: bool, limited: bool = False) -> None:
    """Serve FastAPI's document completed once by `complete` (auth, limits as set up)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            app.openapi_schema = complete(document, secured, limited)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
