"""The OpenAPI document of `bgq api`: what FastAPI cannot derive from the routes themselves.

Every status a route can answer, with its body and headers, and every constraint the server
enforces on a parameter; the option constraints come from `bgq.contract.Options` (one source).
"""

from __future__ import annotations

import copy
from typing import Any

from bgq import contract, defaults, webhooks
from bgq.contract import Options

ERROR = {"$ref": "#/components/schemas/Error"}
JOB = {"$ref": "#/components/schemas/Job"}
KEY_PATTERN = "^[0-9a-f]{64}$"
IMAGE_TYPES = ("image/*", "application/octet-stream")


def header(description: str, **schema: Any) -> dict[str, Any]:
    """A required response header (a string)."""
    return {"description": description, "required": True, "schema": {"type": "string", **schema}}


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
    "415": error("`unsupported_media_type`: neither multipart nor an image body, or not an image"),
    "422": error(
        "`invalid_request`: an unknown or invalid field, a callback_url while "
        "BGQ_WEBHOOK_SECRET is unset; `callback_not_allowed`: the callback host resolves to "
        "a non-public address (unless BGQ_WEBHOOK_ALLOW_PRIVATE); `unsupported_image`: rembg "
        "cannot process the image's mode; `job_failed`: the worker failed on the image "
        "(e.g. truncated)"
    ),
    "503": error(
        "`unavailable`: Redis or the store is unreachable; retry after `Retry-After` seconds",
        Retry_After=header("seconds", pattern="^[0-9]+$"),
    ),
}
PNG_HEADERS = {
    "ETag": header('`"<job id>"`'),
    "Cache-Control": header("immutable"),
    "X-Bgq-Job-Id": header("the job id (the cache key)", pattern=KEY_PATTERN),
}
PNG = {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}
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
    """OpenAPI query parameters: the model and every rembg option (one source: Options)."""
    params: list[dict[str, Any]] = [
        {
            "name": "model",
            "in": "query",
            "description": f"rembg model (default: the server's BGQ_MODEL, {defaults.MODEL})",
            "schema": {"type": "string", "enum": sorted(contract.MODELS)},
        }
    ]
    schema = Options.model_json_schema()["properties"]
    for name in Options.model_fields:
        prop = {k: v for k, v in schema[name].items() if k != "title"}
        if name == "bgcolor":
            prop = {
                "type": "string",
                "pattern": contract.BGCOLOR_PATTERN,
                "example": "255,255,255,255",
            }
            prop["description"] = "background colour r,g,b,a (each 0-255); default: transparent"
        params.append({"name": name, "in": "query", "schema": prop})
    return params


WAIT = {
    "name": "wait",
    "in": "query",
    "description": "Seconds to wait for the PNG before answering 202 with the job.",
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
    """The image as a multipart `file` (options as form fields too) or as the raw body."""
    fields = {p["name"]: p["schema"] for p in option_parameters() + extra}
    raw = {"schema": {"type": "string", "format": "binary"}}
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}, **fields},
                    "required": ["file"],
                    "additionalProperties": False,
                },
                "encoding": {"file": {"contentType": "image/*"}},
            },
            **{media_type: raw for media_type in IMAGE_TYPES},
        },
    }


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
    png = {"description": "The PNG", **PNG, "headers": PNG_HEADERS}
    return {
        "remove": {
            "parameters": [*option_parameters(), WAIT],
            "requestBody": image_body([WAIT]),
            "responses": {"200": png, "202": ACCEPTED, **pick("413", "415", "422", "503")},
        },
        "create_job": {
            "parameters": [*option_parameters(), CALLBACK_URL],
            "requestBody": image_body([CALLBACK_URL]),
            "responses": {"202": ACCEPTED, **pick("413", "415", "422", "503")},
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
    "required": ["ready", "redis", "workers"],
    "properties": {
        "ready": {"type": "boolean"},
        "redis": {"type": "boolean"},
        "workers": {"type": "integer", "minimum": 0},
        "error": {"type": "string"},
    },
}


def complete(document: dict[str, Any], secured: bool) -> dict[str, Any]:
    """FastAPI's document with every operation's parameters, body, answers and security."""
    doc = copy.deepcopy(document)
    ops = operations()
    for path, methods in doc["paths"].items():
        for op in methods.values():
            op.update(copy.deepcopy(ops.get(op["operationId"], {})))
            if secured and path.startswith("/v1/"):
                op["security"] = [{"bearer": []}]
                op["responses"]["401"] = ERRORS["401"]
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
