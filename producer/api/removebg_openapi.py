"""The OpenAPI document of the remove.bg routes (tag "remove.bg"): their fields, answers,
error shape and API-key scheme, added to the document `openapi.install_openapi` serves.

A field that maps onto a bgq option takes that option's schema, so the two never disagree;
a field whose option this server lacks is left out (the route refuses it).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from fastapi import FastAPI
from PIL import ImageColor

from bgq import options
from producer.api.openapi import IMAGE_URL_PATTERN, KEY_PATTERN, header, option_parameters
from producer.api.removebg_fields import FORMATS, HEX_COLOR, SIZES

ERRORS_REF = {"$ref": "#/components/schemas/RemoveBgErrors"}
BINARY = {"type": "string", "format": "binary"}
COUNT = "^[0-9]+$"
KEY_SCHEME = {"removebgKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"}}
OPERATIONS = ("removebg", "removebg_api")


def bgq_option(name: str) -> dict[str, Any] | None:
    """The schema of bgq's option `name` as the HTTP API documents it (None: no such option)."""
    for param in option_parameters():
        if param["name"] == name:
            return copy.deepcopy(param["schema"])
    return None


def fields() -> dict[str, dict[str, Any]]:
    """Every remove.bg field this server takes, but the files."""
    has = set(options.Options.model_fields)
    out: dict[str, dict[str, Any]] = {
        "image_file_b64": {"type": "string", "description": "the image, base64-encoded"},
        "image_url": {"type": "string", "pattern": IMAGE_URL_PATTERN},
        "size": {
            "type": "string",
            "enum": [s for s, mp in SIZES.items() if mp is None or "fit_megapixels" in has],
            "description": "preview/small/regular: at most 0.25 MP, medium 1.5 MP, hd 4 MP; "
            "full/4k/50MP/auto: the original resolution (up to BGQ_MAX_MEGAPIXELS)",
        },
        "type": {"type": "string", "enum": ["auto"], "description": "bgq does not classify"},
        "type_level": {"type": "string", "enum": ["1", "none"], "description": "none: no X-Type"},
        "format": {"type": "string", "enum": ["auto", *(f for f in FORMATS if f != "zip")]},
        "channels": {"type": "string", "enum": ["rgba", "alpha"]},
        "bg_color": {
            "anyOf": [
                {"type": "string", "pattern": f"^{HEX_COLOR.pattern}$"},
                {"type": "string", "enum": sorted(ImageColor.colormap)},
            ],
            "description": "hex (81d4fa, #fff, with alpha: 4 or 8 digits) or a colour name",
        },
        "add_shadow": {"type": "boolean", "enum": [False], "description": "no shadows"},
        "semitransparency": {
            "type": "boolean",
            "enum": [True],
            "description": "bgq has no car-window handling",
        },
    }
    if "zip" in options.FORMATS:
        out["format"]["enum"].append("zip")
    if "bg_image" in has:
        out["bg_image_url"] = {"type": "string", "pattern": IMAGE_URL_PATTERN}
    for name in ("crop", "crop_margin", "roi", "scale"):
        schema = bgq_option(name)
        if schema is not None:
            out[name] = schema
    position = bgq_option("position")
    if "scale" in has and position is not None:
        out["position"] = {"anyOf": [{"type": "string", "enum": ["original"]}, position]}
    return out


@functools.cache
def json_types() -> dict[str, str]:
    """The JSON type of each field a JSON body may carry (a string unless the schema says)."""
    return {name: schema.get("type", "string") for name, schema in fields().items()}


def request_body() -> dict[str, Any]:
    """The fields as multipart (with the files), form-encoded or JSON."""
    plain = fields()
    files = {"image_file": BINARY, **({"bg_image_file": BINARY} if "bg_image_url" in plain else {})}

    def obj(props: dict[str, Any]) -> dict[str, Any]:
        return {"schema": {"type": "object", "properties": props, "additionalProperties": False}}

    return {
        "required": True,
        "description": "Exactly one of image_file, image_file_b64 and image_url",
        "content": {
            "multipart/form-data": obj({**files, **plain}),
            "application/x-www-form-urlencoded": obj(plain),
            "application/json": obj(plain),
        },
    }


def answers(secured: bool, limited: bool) -> dict[str, Any]:
    """What POST /v1.0/removebg answers."""
    box = {
        f"X-{name}": header(f"the {what} in pixels", "Foreground" not in name, pattern=COUNT)
        for name, what in [
            ("Width", "result's width"),
            ("Height", "result's height"),
            ("Foreground-Top", "subject's top"),
            ("Foreground-Left", "subject's left"),
            ("Foreground-Width", "subject's width"),
            ("Foreground-Height", "subject's height"),
        ]
    }  # X-Foreground-*: absent when an opaque result's box is not ready in time
    headers = {
        **box,
        "X-Type": header("`other` (none with type_level=none)", False, enum=["other"]),
        "X-Credits-Charged": header("`0`", enum=["0"]),
        "X-Bgq-Job-Id": header("the job id (the cache key)", pattern=KEY_PATTERN),
    }
    kinds = [t for f, t in options.CONTENT_TYPES.items() if f in options.FORMATS]
    content = {kind: {"schema": BINARY} for kind in kinds}
    content["application/json"] = {"schema": {"$ref": "#/components/schemas/RemoveBgResult"}}
    retry = {"Retry-After": header("seconds", pattern="^[0-9]+$")}
    out: dict[str, Any] = {
        "200": {
            "description": "The result (JSON with Accept: application/json)",
            "content": content,
            "headers": headers,
        },
        "400": error("Bad parameters or image (`file_too_large`: over BGQ_MAX_UPLOAD_MB)"),
        "503": error(
            "`service_unavailable`: Redis or the store is down, or no result within the wait; "
            "`model_not_served`: no live worker serves BGQ_MODEL",
            retry,
        ),
    }
    if secured:
        out["403"] = error("`auth_failed`: X-Api-Key (or a bearer token) missing or wrong")
    if limited:
        rates = {
            "X-RateLimit-Limit": header(
                "the key's requests a minute (else its jobs outstanding)", False, pattern=COUNT
            ),
            "X-RateLimit-Remaining": header("what is left of them", False, pattern=COUNT),
            "X-RateLimit-Reset": header("when one is free (Unix seconds)", False, pattern=COUNT),
            "RateLimit-Policy": header("as on /v1/remove", False),
            "RateLimit": header("as on /v1/remove", False),
        }
        out["200"]["headers"].update(rates)
        out["429"] = error("`rate_limit_exceeded`: over the key's BGQ_API_LIMITS", retry | rates)
    return out


def error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": ERRORS_REF}},
    }
    if headers:
        out["headers"] = headers
    return out


SIDES = ("top", "left", "width", "height")
ACCOUNT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "object",
            "required": ["attributes"],
            "properties": {"attributes": {"type": "object"}},
        }
    },
}
COMPONENTS = {
    "RemoveBgErrors": {
        "type": "object",
        "required": ["errors"],
        "properties": {
            "errors": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["title", "code"],
                    "properties": {"title": {"type": "string"}, "code": {"type": "string"}},
                },
            }
        },
    },
    "RemoveBgResult": {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "object",
                "required": ["result_b64"],  # no foreground_*: no box in time (docs/service.md)
                "properties": {
                    "result_b64": {"type": "string"},
                    **{f"foreground_{s}": {"type": "integer", "minimum": 0} for s in SIDES},
                },
            }
        },
    },
}


def add_removebg(doc: dict[str, Any], secured: bool, limited: bool) -> None:
    """The remove.bg operations' body, answers and security, in FastAPI's document."""
    security: list[dict[str, list[str]]] = [{"removebgKey": []}, {"bearer": []}]
    for methods in doc["paths"].values():
        for op in methods.values():
            if op.get("operationId") in OPERATIONS:
                op["requestBody"] = request_body()
                op["responses"] = answers(secured, limited)
            elif op.get("operationId") == "removebg_account":
                op["responses"] = {
                    "200": {
                        "description": "What a self-hosted server can say (docs/service.md)",
                        "content": {"application/json": {"schema": ACCOUNT}},
                    },
                    **({"403": answers(True, False)["403"]} if secured else {}),
                }
            else:
                continue
            if secured:
                op["security"] = security
    doc["components"]["schemas"].update(COMPONENTS)
    if secured:
        doc["components"]["securitySchemes"].update(KEY_SCHEME)


def install_removebg_openapi(app: FastAPI, secured: bool, limited: bool = False) -> None:
    """Complete the app's document (once) with the remove.bg routes."""
    served = app.openapi

    def openapi() -> dict[str, Any]:
        doc = served()
        if "RemoveBgErrors" not in doc["components"]["schemas"]:
            add_removebg(doc, secured, limited)
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
