"""The API's interactive docs (`/docs`) in real Chromium (Debian's package, through
Playwright) with every request beyond the API itself refused: they render from the package.

A real API under uvicorn on loopback and a real redis-server; no worker is needed to read docs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Route, expect, sync_playwright

from bgq.settings import Settings
from producer.api import apidocs
from producer.api.apidocs import ASSETS
from tests.browser import CHROMIUM_FLAGS, WAIT, chromium_path
from tests.helpers import ApiServer

KEY = "docs-test-key"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def base(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An API with keys set (so Swagger UI shows Authorize), on the test Redis."""
    home = tmp_path_factory.mktemp("bgq-home")
    server = ApiServer(Settings(home=home, redis_url=redis_url, api_keys=KEY)).start()
    yield server.url
    server.stop()


class Offline:
    """A browser context whose every request off the API's host and port is refused (and noted),
    as on a closed network."""

    def __init__(self, browser: Browser, base: str) -> None:
        self.origin = urlsplit(base).netloc
        self.refused: list[str] = []
        self.errors: list[str] = []
        self.context: BrowserContext = browser.new_context(viewport={"width": 1280, "height": 900})
        self.context.route("**/*", self.gate)

    def gate(self, route: Route) -> None:
        url = route.request.url
        if urlsplit(url).netloc == self.origin or url.startswith("data:"):
            route.continue_()
        else:
            self.refused.append(url)
            route.abort("internetdisconnected")

    def open(self, url: str) -> Page:
        page = self.context.new_page()
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.goto(url)
        return page


@pytest.fixture
def offline(browser: Browser, base: str) -> Iterator[Offline]:
    gate = Offline(browser, base)
    yield gate
    gate.context.close()


def test_the_docs_pages_name_only_files_of_the_api(base: str) -> None:
    html = httpx.get(base + apidocs.SWAGGER_URL).text
    links = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html)
    assert len(links) >= 4 and all(link.startswith("/") for link in links), links
    for link in links:
        assert httpx.get(base + link).status_code == 200, link
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"):
        assert (apidocs.ASSETS / name).is_file()
    assert "/v1/remove" in httpx.get(base + "/openapi.json").json()["paths"]


def test_swagger_ui_renders_the_operations_offline(offline: Offline, base: str) -> None:
    page = offline.open(base + "/docs")
    remove = page.locator(".opblock.opblock-post", has=page.locator('[data-path="/v1/remove"]'))
    expect(remove).to_be_visible(timeout=WAIT)
    expect(page.locator(".opblock")).to_have_count(operation_count(base), timeout=WAIT)
    expect(page.locator("button.authorize")).to_be_visible()
    assert offline.refused == [] and offline.errors == []


def test_the_key_given_to_authorize_is_sent(offline: Offline, base: str) -> None:
    page = offline.open(base + "/docs")
    page.locator("button.authorize").click()
    # The bearer scheme's form (the remove.bg routes' X-Api-Key scheme has its own).
    bearer = page.locator(".modal-ux form").filter(has_text="bearer (http, Bearer)")
    bearer.locator("input[type=text], input[type=password]").first.fill(KEY)
    bearer.locator("button.authorize").click()
    bearer.locator("button.btn-done").click()
    status = page.locator('.opblock-get:has([data-path="/v1/jobs/{job_id}"])')
    status.locator(".opblock-summary").click()
    status.locator("button.try-out__btn").click()
    unknown = "0" * 64  # a job id as the document describes one, of no job
    status.locator('tr[data-param-name="job_id"] input').fill(unknown)
    with page.expect_request(re.compile(f"/v1/jobs/{unknown}$")) as sent:
        status.locator("button.execute").click()
    assert sent.value.headers["authorization"] == f"Bearer {KEY}"
    answer = sent.value.response()
    assert answer is not None and answer.status == 404  # past the key check: no such job
    assert offline.refused == [] and offline.errors == []


def test_redoc_is_off(base: str) -> None:
    assert httpx.get(base + "/redoc").status_code == 404


def operation_count(base: str) -> int:
    paths = httpx.get(base + "/openapi.json").json()["paths"]
    return sum(1 for ops in paths.values() for verb in ops if verb != "parameters")


SWAGGER_UI = {  # swagger-ui-dist 5.32.6 on npm: the files whose licence bgq carries
    "swagger-ui-bundle.js": "4b5a9b35a1adf37f00d39c0bae23cdb37007e2946240ef035137cc85b4d55349",
    "swagger-ui.css": "ca238f7d7c2cf4480c1e77a9c3b9da915ab216e96ffd354e69076560c650c6de",
}


def test_the_swagger_ui_files_are_those_whose_licence_is_carried() -> None:
    """fastapi-offline ships Swagger UI (Apache-2.0) without its licence files; bgq carries
    them (producer/api/static/vendor/swagger-ui*.LICENSE.txt) for exactly these bytes. A new
    fastapi-offline with another Swagger UI fails here: update the licence files with it."""
    for name, digest in SWAGGER_UI.items():
        assert hashlib.sha256((ASSETS / name).read_bytes()).hexdigest() == digest, name
    vendor = Path(apidocs.__file__).parent / "static" / "vendor"
    assert "Apache License" in (vendor / "swagger-ui.LICENSE.txt").read_text()
    assert "MIT License" in (vendor / "swagger-ui-bundle.js.LICENSE.txt").read_text()
