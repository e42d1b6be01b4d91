"""Driving bgq's web page in real Chromium: Debian's package, through Playwright's Python API
(which downloads no browser). The tests' own helpers; the tests are in test_page.py."""

from __future__ import annotations

import base64
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, Page, expect

DONE = 120_000  # ms: a job through the queue, on 2 busy cores
WAIT = 30_000  # ms: what the page shows next, with no model run in between
CHROMIUM_FLAGS = [  # root in a container, no GPU, a closed network
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


WIDER_THAN_SCREEN = """() => [...document.querySelectorAll("body *")]
    .filter((e) => e.getBoundingClientRect().right > innerWidth)
    .map((e) => `${e.tagName}#${e.id}.${e.className}`)"""


def chromium_path() -> str:
    path = os.environ.get("BGQ_TEST_CHROMIUM") or shutil.which("chromium")
    if not path:
        pytest.fail(
            "the web page tests need Debian's chromium on PATH (or BGQ_TEST_CHROMIUM): "
            "as root, apt-get update && apt-get install -y chromium (make test does this)"
        )
    return path


class Watched:
    """A page and every request it made, and any script error."""

    def __init__(self, context: BrowserContext, url: str) -> None:
        self.page = context.new_page()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.errors: list[str] = []  # script errors and refusals by the page's CSP
        self.page.on("request", lambda r: self.requests.append((r.method, r.url, r.headers)))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", self.console)
        self.statuses: list[int] = []  # of every answer, in order
        self.page.on("response", lambda r: self.statuses.append(r.status))
        self.page.goto(url)

    def console(self, message: Any) -> None:
        if "Content Security Policy" in message.text:
            self.errors.append(message.text)

    def until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait (letting the page's events arrive) until `condition` holds."""
        for _ in range(WAIT // 100):
            if condition():
                return
            self.page.wait_for_timeout(100)
        raise AssertionError(f"timed out waiting for {what}")

    def calls(self, method: str, path: str) -> list[str]:
        """The URLs of the page's requests with `method` whose path matches `path` (a regex)."""
        return [u for m, u, _ in self.requests if m == method and re.search(path, u)]

    def job(self, name: str) -> Any:
        return self.page.locator(".job", has=self.page.locator(".name", has_text=name))

    def final(self, count: int) -> None:
        jobs = self.page.locator(".job[data-state=done], .job[data-state=failed]")
        expect(jobs).to_have_count(count, timeout=DONE)


def photo(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def natural_width(img: Any) -> int:
    img.scroll_into_view_if_needed()  # the page's images load lazily
    expect(img).to_have_js_property("complete", True, timeout=WAIT)
    return int(img.evaluate("img => img.naturalWidth"))


def drop(page: Page, name: str, data: bytes) -> None:
    """Drop a file on the page, as a drag from the desktop would."""
    transfer = page.evaluate_handle(
        """([name, data]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/jpeg" }));
            return transfer;
        }""",
        [name, base64.b64encode(data).decode()],
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def result_of(watched: Watched, name: str) -> bytes:
    """The file the Download link of image `name` saves."""
    with watched.page.expect_download() as info:
        watched.job(name).locator("a.download").click()
    return Path(info.value.path()).read_bytes()
