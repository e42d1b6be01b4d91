"""The web page of `bgq api` (`GET /`): upload or paste images, watch, preview, download.

Plain HTML, CSS and JavaScript from the package (producer/api/static), no build step and nothing
from the internet; the page speaks only the public /v1 API, as every other client does. It is
not part of the OpenAPI contract. The one vendored library, fflate (zip for "Download all"),
is pinned by its SHA-256 in VENDORED below and kept next to its licence.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import redis
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

import bgq
from bgq import contract, defaults, options
from bgq.errors import BgqError
from bgq.settings import Settings
from bgq.store import Store
from producer.api.deps import ProducerDep
from producer.client import Producer
from producer.served import page_models

HERE = Path(__file__).parent
STATIC = HERE / "static"  # served as is under /static/
TEMPLATE = HERE / "page.html"  # served at / with the config filled in
# The vendored files, with the SHA-256 of the release they came from (tests check them).
VENDORED = {
    "vendor/fflate.min.js": "462ef8041fc970e3615a20a9dd2b2e3047a073b2da729ef4f02b634bba8b7b83",
}
CONFIG_SLOT = "__BGQ_CONFIG__"
log = logging.getLogger("bgq.api")
HEADERS = {
    "Cache-Control": "no-cache",  # revalidated (ETag), so an upgrade is seen at once
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class PageFiles(StaticFiles):
    """The page's own files, revalidated on every use rather than cached blindly."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(HEADERS)
        return response


class Page:
    """The page's HTML (this API's config filled in) and its content policy, worked out on
    first use: signing a URL may need credentials."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.template = TEMPLATE.read_text(encoding="utf-8")
        self.settings = settings
        self.store = store
        self.policy: str | None = None

    async def content_policy(self) -> str:
        """The page's Content-Security-Policy (kept once the redirects' origin is known)."""
        if self.policy is not None:
            return self.policy
        try:
            origin = await run_in_threadpool(result_origin, self.settings, self.store)
        except Exception as exc:  # e.g. no credentials found yet: try again next time
            log.warning("the web page cannot follow result redirects yet: %s", exc)
            return content_policy(None)
        self.policy = content_policy(origin)
        return self.policy

    def html(self, models: list[str]) -> str:
        """The page, offering `models` (those some live worker serves)."""
        return self.template.replace(CONFIG_SLOT, script_json(page_config(self.settings, models)))


async def get_page(request: Request) -> Page:
    """The app's page (install_page made it)."""
    installed: Page = request.app.state.page
    return installed


router = APIRouter(include_in_schema=False)


@router.get("/")
async def page(view: Annotated[Page, Depends(get_page)], producer: ProducerDep) -> HTMLResponse:
    policy = await view.content_policy()
    models = await run_in_threadpool(offered_models, producer, view.settings)
    headers = {**HEADERS, "Content-Security-Policy": policy}
    return HTMLResponse(view.html(models), headers=headers)


def offered_models(producer: Producer, settings: Settings) -> list[str]:
    """The models some live worker serves, the default first; all of them when Redis cannot
    say (a job is then answered as the API answers it)."""
    try:
        served = producer.served.current()
    except (BgqError, redis.RedisError) as exc:
        log.warning("the web page cannot read which models are served: %s", exc)
        return page_models(dict.fromkeys(defaults.MODELS, 0), settings.model)
    return page_models(served, settings.model)


def install_page(app: FastAPI, settings: Settings, store: Store) -> None:
    """Serve the page at `/` and its files under `/static/`, both outside the OpenAPI schema."""
    app.state.page = Page(settings, store)
    app.include_router(router)
    app.mount("/static", PageFiles(directory=STATIC), name="static")


def page_config(settings: Settings, models: list[str]) -> dict[str, Any]:
    """What the page needs to know about this API: the models offered (none: the page says no
    worker serves any), defaults, limits, whether keys, the options' patterns and words."""
    return {
        "version": bgq.__version__,
        "model": settings.model,
        "models": models,
        "auth": bool(settings.api_key_list),
        "max_upload_bytes": settings.max_upload_bytes,
        "quality": defaults.QUALITY,
        "patterns": {
            "length": options.LENGTH_PATTERN,
            "margin": options.MARGIN_PATTERN,
            "canvas": options.CANVAS_PATTERN,
            "roi": options.ROI_PATTERN,
            "scale": options.SCALE_PATTERN,
            "position": options.POSITION_PATTERN,
            "number": options.NUMBER_PATTERN,
        },
        "quality_range": options.QUALITY_RANGE,  # an integer within it, both included
        "fit_max_megapixels": defaults.FIT_MAX_MEGAPIXELS,
        # What each option must be, in the API's own words (the page refuses with them too).
        "must": {
            name: text for name, text in options.MUST.items() if name not in options.PYTHON_ONLY
        },
    }


def script_json(value: object) -> str:
    """JSON that is safe inside a <script> element (no `</script>`, no HTML comment)."""
    text = json.dumps(value, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def content_policy(redirects_to: str | None) -> str:
    """Only this origin's scripts, styles and API; images also from blobs (results) and
    http(s) (the originals of pasted URLs, loaded by the browser as any link would be), and
    `redirects_to`, the origin result redirects lead to, may be fetched too."""
    connect = "'self'" + (f" {redirects_to}" if redirects_to else "")
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


def result_origin(settings: Settings, store: Store) -> str | None:
    """The scheme://host[:port] of presigned result URLs (the bucket's CORS rules must allow
    the page's origin); None when results are streamed by the API."""
    if settings.result_redirect != "presigned":
        return None
    url = store.presigned_url(contract.result_name("0" * 64, "png"), 60)
    if not url:
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
