"""The web page of `bgq api` (`GET /`): upload or paste images, watch, preview, download.

Plain HTML, CSS and JavaScript from the package (producer/static), no build step and nothing
from the internet; the page speaks only the public /v1 API, as every other client does. It is
not part of the OpenAPI contract. The one vendored library, fflate (zip for "Download all"),
is pinned by its SHA-256 in VENDORED below and kept next to its licence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

import bgq
from bgq import contract, defaults, options
from bgq.settings import Settings
from bgq.store import Store

STATIC = Path(__file__).parent / "static"
# The vendored files, with the SHA-256 of the release they came from (tests check them).
VENDORED = {
    "vendor/fflate.min.js": "462ef8041fc970e3615a20a9dd2b2e3047a073b2da729ef4f02b634bba8b7b83",
}
CONFIG_SLOT = "__BGQ_CONFIG__"


def install_page(app: FastAPI, settings: Settings, store: Store) -> None:
    """Serve the page at `/` and its files under `/static/`, both outside the OpenAPI schema."""
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    html = html.replace(CONFIG_SLOT, script_json(page_config(settings)))
    headers = {
        "Content-Security-Policy": content_policy(settings, store),
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(html, headers=headers)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def page_config(settings: Settings) -> dict[str, Any]:
    """What the page needs to know about this API: models, defaults, limits, whether keys."""
    return {
        "version": bgq.__version__,
        "model": settings.model,
        "models": sorted(contract.MODELS),
        "auth": bool(settings.api_key_list),
        "max_upload_bytes": settings.max_upload_bytes,
        "quality": defaults.QUALITY,
        "patterns": {"length": options.LENGTH_PATTERN, "canvas": options.CANVAS_PATTERN},
    }


def script_json(value: object) -> str:
    """JSON that is safe inside a <script> element (no `</script>`, no HTML comment)."""
    text = json.dumps(value, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def content_policy(settings: Settings, store: Store) -> str:
    """Only this origin's scripts, styles and API; images also from blobs (results) and
    http(s) (the originals of pasted URLs, loaded by the browser as any link would be).

    With presigned result redirects the browser reads results from the bucket, so its
    origin may be fetched too (the bucket's CORS rules must allow this page's origin).
    """
    connect = "'self'"
    if settings.result_redirect == "presigned":
        origin = store_origin(store)
        if origin:
            connect += " " + origin
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' blob: data: http: https:",
            f"connect-src {connect}",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def store_origin(store: Store) -> str | None:
    """The scheme://host[:port] the store's presigned URLs point at, if it makes them."""
    url = store.presigned_url(contract.result_name("0" * 64, "png"), 60)
    if not url:
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
