"""The web page under a key's limits, in real Chromium (Debian's package, through Playwright),
against a real API, real Redis and real prefork workers: a 429 is a wait, never a failure."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from playwright.sync_api import BrowserContext, expect, sync_playwright

from bgq.stack import LocalStack
from tests.browser import CHROMIUM_FLAGS, DONE, WAIT, Watched, chromium_path, photo
from tests.helpers import LocalStackControl, api_servers, variant

KEY = "page-limits-key"


@pytest.fixture(scope="module")
def context() -> Iterator[BrowserContext]:
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        yield browser.new_context(viewport={"width": 1280, "height": 900})
        browser.close()


@pytest.fixture(scope="module")
def serve(stack: LocalStack) -> Iterator[Callable[..., str]]:
    with api_servers(stack) as start:
        yield start


def test_a_rate_limit_is_a_wait_then_a_retry(
    context: BrowserContext,
    serve: Callable[..., str],
    stack: LocalStack,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """One interactive job outstanding at once: of two images, one waits, counting down the
    API's Retry-After, and goes through once the other is done."""
    base = serve(api_keys=KEY, api_limits="*: interactive.jobs=1")
    names = ("first.jpg", "second.jpg")
    files = [
        photo(tmp_path, name, variant("car-1.jpg", (n * 40, 0, n * 40 + 320, 240)))
        for n, name in enumerate(names)
    ]
    watched = Watched(context, base)
    page = watched.page
    page.fill("#key", KEY)
    page.press("#key", "Enter")
    control = LocalStackControl(stack)
    control.pause()  # the first job stays outstanding
    try:
        with page.expect_response(lambda r: r.url.endswith("/v1/jobs") and r.status == 429):
            page.set_input_files("#files", [str(f) for f in files])
        # Sent together: whichever came second waits.
        expect(page.locator(".job[data-state=queued]")).to_have_count(1, timeout=WAIT)
        waiting = page.locator(".job[data-state=waiting]")
        expect(waiting).to_have_count(1, timeout=WAIT)
        expect(waiting.locator(".state")).to_have_text("waiting")
        expect(waiting.locator(".error")).to_contain_text("rate limit, retrying in ")
        color = waiting.locator(".error").evaluate("e => getComputedStyle(e).color")
        assert color == "rgb(138, 90, 0)"  # the colour of waiting, not of failure
        expect(page.locator("#banner")).to_be_hidden()
    finally:
        control.resume()
    watched.final(2)
    expect(page.locator(".job[data-state=done]")).to_have_count(2, timeout=DONE)
    assert watched.statuses.count(429) >= 1
    posts = watched.calls("POST", r"/v1/jobs$")
    assert len(posts) >= 3  # the refused one was sent again
    assert not watched.errors
