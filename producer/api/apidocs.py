"""The API's interactive docs, Swagger UI at `/docs`, with its script and style served from an
installed package (fastapi-offline's copy of Swagger UI 5), not a CDN: it renders on a closed
network, as the page at `/` does. FastAPI's own pages are off (docs_url=None); this is their
documented replacement, `get_swagger_ui_html` plus a static mount. ReDoc (`/redoc`) stays off:
its bundle loads its logo from its vendor's CDN whatever it is given.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import (
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

# swagger-ui-bundle.js, swagger-ui.css and favicon.png are used from here (tests check them).
ASSETS = Path(fastapi_offline.__file__).parent / "static"
ASSETS_URL = "/docs-assets"
SWAGGER_URL = "/docs"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"

router = APIRouter(include_in_schema=False)


def asset(request: Request, name: str) -> str:
    """The URL of one of the docs' files, behind whatever root path the API is served at."""
    return f"{request.scope.get('root_path', '')}{ASSETS_URL}/{name}"


@router.get(SWAGGER_URL)
async def swagger_ui(request: Request) -> HTMLResponse:
    app: FastAPI = request.app
    return get_swagger_ui_html(
        openapi_url=f"{request.scope.get('root_path', '')}{app.openapi_url}",
        title=f"{app.title} - Swagger UI",
        oauth2_redirect_url=OAUTH2_REDIRECT_URL,
        swagger_js_url=asset(request, "swagger-ui-bundle.js"),
        swagger_css_url=asset(request, "swagger-ui.css"),
        swagger_favicon_url=asset(request, "favicon.png"),
        swagger_ui_parameters=app.swagger_ui_parameters,
    )


@router.get(OAUTH2_REDIRECT_URL)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


def install_apidocs(app: FastAPI) -> None:
    """Serve /docs from the package; create the app with docs_url=None and redoc_url=None."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")
    app.include_router(router)
