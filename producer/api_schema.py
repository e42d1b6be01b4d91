"""The OpenAPI pieces of `bgq api` that FastAPI cannot derive from the routes themselves."""

from __future__ import annotations

from typing import Any

from bgq import contract, defaults
from bgq.contract import Options


def option_parameters() -> list[dict[str, Any]]:
    """OpenAPI query parameters: bgq's request fields and every rembg option (one source)."""
    params: list[dict[str, Any]] = [
        {
            "name": "model",
            "in": "query",
            "schema": {"type": "string", "enum": sorted(contract.MODELS)},
        },
        {
            "name": "wait",
            "in": "query",
            "description": "Seconds to wait for the PNG before answering 202 with the job.",
            "schema": {"type": "number", "default": defaults.API_WAIT, "minimum": 0},
        },
    ]
    schema = Options.model_json_schema()["properties"]
    for name in Options.model_fields:
        prop = dict(schema[name])
        if name == "bgcolor":
            prop = {"type": "string", "example": "255,255,255,255", "description": "r,g,b,a"}
        params.append({"name": name, "in": "query", "schema": prop})
    return params


IMAGE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
                "description": "Options may also be sent as form fields.",
            }
        },
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
}
JOB_EXAMPLE = {
    "id": "<cache key>",
    "status": "queued",
    "cached": False,
    "result_url": "http://host/v1/jobs/<id>/result",
}
