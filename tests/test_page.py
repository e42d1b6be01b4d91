"""The web page of `bgq api`, driven in real Chromium (Debian's package, through Playwright),
against a real API, real Redis and real prefork workers with the u2netp model.

`make test` installs chromium; without it these tests fail, naming the package.
`BGQ_TEST_SCREENSHOTS=DIR` also saves the README's screenshots there (`make screenshots`).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Playwright,
    expect,
    sync_playwright,
)

from bgq import contract
from bgq.options import MUST, ROI_ORDER, Options
from bgq.redis_server import EmbeddedRedis
from bgq.stack import LocalStack
from producer.api import page as web
from tests.browser import (
    CHROMIUM_FLAGS,
    DONE,
    WAIT,
    WIDER_THAN_SCREEN,
    Watched,
    chromium_path,
    drop,
    natural_width,
    photo,
    result_of,
)
from tests.helpers import (
    ApiServer,
    ImageServer,
    LocalStackControl,
    StandInWorker,
    api_servers,
    assert_same_pixels,
    sample_bytes,
    variant,
)
from tests.stacks import StackFactory, both_stores

KEY = "page-test-key"


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def page_stack(make_stack: StackFactory, store_settings: dict[str, object]) -> LocalStack:
    return make_stack(fetch_allow_private=True, **store_settings)


@pytest.fixture(scope="module")
def serve(page_stack: LocalStack) -> Iterator[Callable[..., str]]:
    """An API on the module's stack with some settings changed; its base URL."""
    with api_servers(page_stack) as start:
        yield start


@pytest.fixture(scope="module")
def base(serve: Callable[..., str]) -> str:
    return serve()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    yield context
    context.close()


def key_of(data: bytes, **options: Any) -> str:
    return contract.cache_key(contract.input_digest(data), "u2netp", Options(**options))


# -- served from the package -----------------------------------------------------------------


def test_page_is_served_from_the_package_with_nothing_from_elsewhere(base: str) -> None:
    page = httpx.get(base + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    links = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert links and all(link.startswith(("/", "data:")) for link in links), links
    for link in links:
        if link.startswith("/static/"):
            served = httpx.get(base + link)
            assert served.status_code == 200 and served.headers["cache-control"] == "no-cache"
    licence = httpx.get(base + "/static/vendor/fflate.LICENSE.txt")
    assert licence.headers["content-type"].startswith("text/plain")
    assert httpx.get(base + "/static/page.html").status_code == 404  # the template is not served
    config = re.search(r'<script id="bgq-config"[^>]*>(.*?)</script>', page.text, re.S)
    assert config and '"model":"u2netp"' in config.group(1) and '"auth":false' in config.group(1)
    assert '"models":["u2netp"]' in config.group(1)  # what the stack's worker serves
    assert "/" not in httpx.get(base + "/openapi.json").json()["paths"]  # not in the contract


def test_the_model_list_is_what_live_workers_serve(
    context: BrowserContext, base: str, page_stack: LocalStack, tmp_path: Path
) -> None:
    """The stack's worker serves u2netp; a worker of u2net joins; then an API whose Redis has
    no worker at all: the page says so."""
    watched = Watched(context, base)
    expect(watched.page.locator("#model option")).to_have_text(["u2netp"])
    expect(watched.page.locator("#no-models")).to_be_hidden()
    with StandInWorker(page_stack.url, ("u2net", "u2netp")):
        watched.page.reload()
        expect(watched.page.locator("#model option")).to_have_text(["u2netp", "u2net"])
        expect(watched.page.locator("#model")).to_have_value("u2netp")  # the default, first
    redis = EmbeddedRedis.start(tmp_path / "redis")
    server = ApiServer(page_stack.settings.model_copy(update={"redis_url": redis.url})).start()
    try:
        watched.page.goto(server.url)
        expect(watched.page.locator("#model option")).to_have_count(0)
        expect(watched.page.locator("#no-models")).to_contain_text("No live worker serves")
    finally:
        server.stop()
        redis.stop()
    assert not watched.errors, watched.errors


def test_vendored_library_is_the_pinned_release_with_its_licence() -> None:
    for name, digest in web.VENDORED.items():
        assert hashlib.sha256((web.STATIC / name).read_bytes()).hexdigest() == digest, name
    assert "MIT License" in (web.STATIC / "vendor/fflate.LICENSE.txt").read_text()


def test_wheel_carries_every_page_file_and_module(tmp_path: Path) -> None:
    """The Docker image installs bgq from a wheel: it must hold every module and page file."""
    root = Path(__file__).parent.parent
    packages = ("bgq", "producer", "workers")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in (*packages, "bench"):  # bench/ runs from the repository, never installed
        shutil.copytree(root / name, tmp_path / name, ignore=skip)
    for name in ("pyproject.toml", "README.md", "celeryconfig.py"):
        shutil.copy(root / name, tmp_path / name)
    build = "from setuptools import build_meta as b; print(b.build_wheel('dist'))"
    built = subprocess.run(
        [sys.executable, "-c", build], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert built.returncode == 0, built.stderr
    wheel = tmp_path / "dist" / built.stdout.split()[-1]
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    expected = {
        path.relative_to(tmp_path).as_posix()
        for name in packages
        for path in (tmp_path / name).rglob("*")
        if path.is_file()
    }
    assert any(name.startswith("producer/api/static/vendor/") for name in expected)
    assert expected <= names, sorted(expected - names)
    assert "celeryconfig.py" in names
    assert not any(name.startswith("bench/") for name in names)


# -- in the browser --------------------------------------------------------------------------


@both_stores
def test_upload_preview_download(
    context: BrowserContext,
    serve: Callable[..., str],
    tmp_path: Path,
    reference: Callable[..., bytes],
    page_stack: LocalStack,
    store_settings: dict[str, object],
) -> None:
    """On S3, results are presigned redirects: the browser reads them from the bucket."""
    bucket = store_settings.get("s3_endpoint_url")
    base = serve(result_redirect="presigned") if bucket else serve()
    car = variant("car-1.jpg", (0, 0, 600, 400))
    cloth = variant("cloth-1.jpg", (0, 0, 400, 600))
    truncated = variant("plants-1.jpg", (0, 0, 900, 900))[:20000]  # only the worker finds out
    files = [
        photo(tmp_path, "car.jpg", car),
        photo(tmp_path, "cloth.jpg", cloth),
        photo(tmp_path, "notes.jpg", b"shopping list, not a photo"),
        photo(tmp_path, "broken.jpg", truncated),
    ]
    control = LocalStackControl(page_stack)
    control.pause()  # every job waits in the queue until the page has shown it so
    try:
        watched = Watched(context, base)
        page = watched.page
        page.set_input_files("#files", [str(f) for f in files])
        expect(watched.job("car.jpg")).to_have_attribute("data-state", "queued", timeout=WAIT)
        expect(watched.job("car.jpg").locator(".state")).to_have_text("queued")
    finally:
        control.resume()
    watched.final(4)

    # A failed input's reason, in words: refused at submission, or by the worker.
    notes = watched.job("notes.jpg")
    expect(notes).to_have_attribute("data-state", "failed")
    expect(notes.locator(".error")).to_contain_text("Unsupported file: not an image")
    broken = watched.job("broken.jpg")
    expect(broken).to_have_attribute("data-state", "failed")
    expect(broken.locator(".error")).to_contain_text("truncated")

    # Previews: the original beside the result, the result on a checkerboard.
    for name in ("car.jpg", "cloth.jpg"):
        job = watched.job(name)
        expect(job).to_have_attribute("data-state", "done")
        assert natural_width(job.locator(".original img")) > 0
        assert natural_width(job.locator(".result img")) > 0
        checker = job.locator(".checker").evaluate("e => getComputedStyle(e).backgroundImage")
        assert "linear-gradient" in checker
        expect(job.locator(".cache")).to_be_hidden()

    # One download, pixel for pixel rembg's; its link is the API's result URL.
    link = watched.job("car.jpg").locator("a.download")
    expect(link).to_have_attribute("href", f"/v1/jobs/{key_of(car)}/result")
    with page.expect_download() as info:
        link.click()
    assert info.value.suggested_filename == "car.png"
    assert_same_pixels(Path(info.value.path()), reference(car))

    # Download all: a zip of the finished results.
    with page.expect_download() as info:
        page.click("#download-all")
    assert info.value.suggested_filename == "bgq-results.zip"
    with zipfile.ZipFile(info.value.path()) as archive:
        assert sorted(archive.namelist()) == ["car.png", "cloth.png"]
        assert_same_pixels(archive.read("cloth.png"), reference(cloth))
    expect(page.locator("#summary")).to_have_text("2 of 4 done · 2 failed")

    # The same image again is a cache hit.
    page.set_input_files("#files", [str(files[0])])
    watched.final(5)
    again = page.locator(".job").last
    expect(again.locator(".cache")).to_be_visible()
    expect(again).to_have_attribute("data-job", key_of(car))
    expect(page.locator("#summary")).to_have_text("3 of 5 done · 2 failed · 1 from the cache")
    # Each finished image's result was downloaded once, for its preview, and no more.
    assert len(watched.calls("GET", r"/v1/jobs/[0-9a-f]{64}/result$")) == 3
    assert len(watched.calls("POST", r"/v1/jobs$")) == 5

    page.click("#clear")
    expect(page.locator(".job")).to_have_count(0)
    expect(page.locator("#summary")).to_have_text("No images yet.")
    assert not watched.errors
    origins = (base, "blob:", "data:", *([str(bucket)] if bucket else []))
    assert all(url.startswith(origins) for _, url, _ in watched.requests)
    if bucket:  # the previews and downloads came from the bucket
        assert any(url.startswith(str(bucket)) for _, url, _ in watched.requests)


# A value of each field the page refuses itself, in the API's words, before anything is sent;
# the last field of each is the one refused (position applies only with a canvas or a scale).
REFUSED_BY_THE_PAGE = [
    {"quality": "101"},
    {"canvas": "0x10"},
    {"crop_margin": "5% 5% 5%"},
    {"roi": "10 10 50%"},
    {"scale": "5%"},
    {"scale": "50%", "position": "left"},
    {"fit_megapixels": "0"},
]
# How the page's refusals name a field: its label, and the API's name where that differs.
NAMED = {
    "quality": "Quality",
    "canvas": "Canvas",
    "crop_margin": "Crop margin (crop_margin)",
    "roi": "Region (roi)",
    "scale": "Scale",
    "position": "Position",
    "fit_megapixels": "Fit megapixels (fit_megapixels)",
}
# Shaping options from the form: a roi (which the key proves the API received), the subject at
# half the frame on its floor's left corner, and the whole fitted within 0.05 MP.
SHAPED = {"roi": "0 0 50% 100%", "scale": "50%", "position": "0% 100%", "fit_megapixels": "0.05"}


def test_options_and_pasted_urls(context: BrowserContext, serve: Callable[..., str]) -> None:
    """Output options from the form, an image by URL, bad options refused before sending (or
    by the API, in its words), shaping options and a zip result."""
    base = serve(fetch_allow_private=True)  # the image server is on loopback
    with ImageServer() as photos:
        watched = Watched(context, base)
        page = watched.page
        page.select_option("#format", "jpeg")
        page.click(".urls summary")
        page.fill("#urls", f"{photos.url}/photos/anime-girl-1.jpg")
        page.check("#crop")
        for values in REFUSED_BY_THE_PAGE:
            for name, value in values.items():
                page.fill(f"#{name}", value)
            page.click("#add-urls")
            refused = list(values)[-1]
            expect(page.locator("#options-error")).to_have_text(
                f"{NAMED[refused]}: {MUST[refused]}"
            )
            expect(page.locator(f"#{refused}")).to_have_attribute("aria-invalid", "true")
            for name in reversed(values):  # a position is disabled again once scale is empty
                page.fill(f"#{name}", "")
        page.locator("#quality").press_sequentially("1e")  # not a number: the field's value is ""
        page.click("#add-urls")
        expect(page.locator("#options-error")).to_have_text(f"Quality: {MUST['quality']}")
        page.fill("#quality", "")
        page.uncheck("#crop")
        expect(page.locator(".job")).to_have_count(0)
        assert not watched.calls("POST", r"/v1/jobs$")

        page.fill("#canvas", "300x200")
        page.fill("#padding", "10%")
        page.fill("#position", "bottom")
        page.fill("#urls", f"{photos.url}/photos/anime-girl-1.jpg\n{photos.url}/page.html")
        page.click("#add-urls")
        watched.final(2)
    anime = watched.job("anime-girl-1.jpg")
    expect(anime).to_have_attribute("data-state", "done")
    drop(page, "dropped.jpg", variant("car-1.jpg", (50, 50, 450, 350)))  # same options
    watched.final(3)
    with Image.open(io.BytesIO(result_of(watched, "dropped.jpg"))) as img:
        assert (img.format, img.size) == ("JPEG", (300, 200))
    expected = key_of(
        sample_bytes("anime-girl-1.jpg"),
        format="jpeg",
        canvas="300x200",
        padding="10%",
        position="bottom",
    )
    expect(anime).to_have_attribute("data-job", expected)
    with page.expect_download() as info:
        anime.locator("a.download").click()
    assert info.value.suggested_filename == "anime-girl-1.jpg"
    with Image.open(info.value.path()) as img:
        assert (img.format, img.size) == ("JPEG", (300, 200))
    html = watched.job("page.html")
    expect(html.locator(".error")).to_contain_text("Refused: cannot fetch image_url (not_an_image)")

    # A roi the page lets through (its pattern fits) but the API refuses: the API's words.
    page.fill("#canvas", "")
    page.check("#use-bgcolor")
    page.click(".advanced summary")
    page.check("#only_mask")
    page.select_option("#format", "zip")  # which the API refuses with either: they are not sent
    for switch in ("#use-bgcolor", "#bgcolor", "#only_mask"):
        expect(page.locator(switch)).to_be_disabled()
    page.fill("#roi", "50% 0 10% 100%")
    drop(page, "backwards.jpg", variant("car-1.jpg", (40, 40, 440, 340)))
    watched.final(4)
    backwards = watched.job("backwards.jpg").locator(".error")
    expect(backwards).to_have_text(f"Refused: invalid options: roi: {ROI_ORDER}")
    _shaped_zip(watched)


def _shaped_zip(watched: Watched) -> None:
    """SHAPED and format=zip from the form: the API got them all (the job id is their key),
    the card says zip instead of a broken preview, the download is NAME.zip whose colour JPEG
    and alpha PNG open, fitted within 0.05 MP, the subject scaled into the bottom-left quarter."""
    page = watched.page
    for name, value in SHAPED.items():
        page.fill(f"#{name}", value)
    car = variant("car-1.jpg", (60, 60, 460, 360))
    drop(page, "zipped.jpg", car)
    watched.final(5)
    zipped = watched.job("zipped.jpg")
    expect(zipped).to_have_attribute("data-state", "done")
    expect(zipped).to_have_attribute("data-job", key_of(car, format="zip", **SHAPED))
    expect(zipped.locator(".packed")).to_be_visible()
    expect(zipped.locator(".result img")).to_have_attribute("hidden", "")
    assert zipped.locator(".result img").get_attribute("src") is None
    with page.expect_download() as info:
        zipped.locator("a.download").click()
    assert info.value.suggested_filename == "zipped.zip"
    with zipfile.ZipFile(info.value.path()) as archive:
        assert archive.namelist() == ["color.jpg", "alpha.png"]
        color = Image.open(io.BytesIO(archive.read("color.jpg")))
        alpha = Image.open(io.BytesIO(archive.read("alpha.png")))
    assert (color.format, color.mode, alpha.format, alpha.mode) == ("JPEG", "RGB", "PNG", "L")
    width, height = alpha.size
    assert color.size == alpha.size and 45_000 < width * height <= 50_000  # 400x300 fitted
    box = alpha.getbbox()
    assert box and box[0] <= 1 and box[3] == height, box  # on the floor, at the left
    # Scaled to fill half the frame on its limiting axis, within half on the other: give or
    # take the few pixels LANCZOS spreads an edge over when fit shrinks it.
    shares = (box[2] / width, (height - box[1]) / height)
    assert abs(max(shares) - 0.5) < 0.02 and min(shares) < 0.52, (box, alpha.size)
    assert not watched.errors, watched.errors


def test_many_images_at_once(context: BrowserContext, base: str, tmp_path: Path) -> None:
    """24 images chosen together: all done, each result downloaded once, the page's requests
    bounded (3 uploads, 4 status polls, 3 result downloads at a time)."""
    names = [f"shot-{n:02}.jpg" for n in range(24)]
    paths = [
        photo(tmp_path, name, variant("cloth-1.jpg", (n * 7, n * 5, n * 7 + 160, n * 5 + 240)))
        for n, name in enumerate(names)
    ]
    watched = Watched(context, base)
    page = watched.page
    in_flight: dict[str, int] = {}
    most: dict[str, int] = {}

    def kind(request: Any) -> str:
        url = request.url
        if request.method == "POST":
            return "upload"
        return "result" if url.endswith("/result") else "status" if "/v1/jobs/" in url else ""

    def started(request: Any) -> None:
        if name := kind(request):
            in_flight[name] = in_flight.get(name, 0) + 1
            most[name] = max(most.get(name, 0), in_flight[name])

    def ended(request: Any) -> None:
        if name := kind(request):
            in_flight[name] -= 1

    page.on("request", started)
    page.on("requestfinished", ended)
    page.on("requestfailed", ended)
    page.set_input_files("#files", [str(p) for p in paths])
    watched.final(24)
    expect(page.locator(".job[data-state=done]")).to_have_count(24)
    results = watched.calls("GET", r"/result$")
    assert len(results) == len(set(results)) == 24
    assert most["upload"] <= 3 and most.get("status", 0) <= 4 and most["result"] <= 3, most
    with page.expect_download() as info:
        page.click("#download-all")
    with zipfile.ZipFile(info.value.path()) as archive:
        assert sorted(archive.namelist()) == [name.replace(".jpg", ".png") for name in names]
    assert not watched.errors


def test_api_key(
    context: BrowserContext, serve: Callable[..., str], tmp_path: Path, page_stack: LocalStack
) -> None:
    """The page asks for the key, sends it as a bearer token, and never puts it in a URL."""
    base = serve(api_keys=KEY)
    watched = Watched(context, base)
    page = watched.page
    expect(page.locator("#key-form")).to_be_visible()
    expect(page.locator("#key-state")).to_have_text("this bgq needs an API key")

    image = photo(tmp_path, "keyed.jpg", variant("car-1.jpg", (100, 50, 500, 350)))
    page.set_input_files("#files", [str(image)])
    job = watched.job("keyed.jpg")
    expect(job).to_have_attribute("data-state", "needs-key")
    expect(job.locator(".error")).to_contain_text("API key needed")
    assert not watched.calls("POST", "/v1/jobs")  # held until there is a key

    with page.expect_response(lambda r: r.url.endswith("/v1/jobs")) as refused:
        page.fill("#key", "wrong-key")
        page.click("#key-form button")  # the image waiting for a key is sent again
    assert refused.value.status == 401
    assert refused.value.request.headers["authorization"] == "Bearer wrong-key"
    expect(job).to_have_attribute("data-state", "needs-key")
    expect(job.locator(".error")).to_contain_text("API key needed or not accepted")
    expect(page.locator("#key-state")).to_have_text("key not accepted")

    page.fill("#key", KEY)
    page.press("#key", "Enter")
    expect(job).to_have_attribute("data-state", "done", timeout=DONE)
    expect(page.locator("#key-state")).to_have_text("key set")
    api_calls = [(m, u, h) for m, u, h in watched.requests if "/v1/" in u]
    assert api_calls and api_calls[-1][2].get("authorization") == f"Bearer {KEY}"
    assert all(KEY not in url for _, url, _ in watched.requests)
    assert KEY not in page.url

    # A key that stops working while a job is queued: the job waits, then goes on.
    control = LocalStackControl(page_stack)
    control.pause()
    try:
        second = photo(tmp_path, "queued.jpg", variant("car-1.jpg", (60, 40, 460, 340)))
        page.set_input_files("#files", [str(second)])
        queued = watched.job("queued.jpg")
        expect(queued).to_have_attribute("data-state", "queued", timeout=WAIT)
        page.fill("#key", "revoked-key")
        page.press("#key", "Enter")
        expect(queued).to_have_attribute("data-state", "needs-key", timeout=WAIT)
        page.fill("#key", KEY)
        page.press("#key", "Enter")
        expect(queued).to_have_attribute("data-state", "queued", timeout=WAIT)
    finally:
        control.resume()
    expect(queued).to_have_attribute("data-state", "done", timeout=DONE)
    assert all(KEY not in url for _, url, _ in watched.requests)
    page.reload()  # the key lasts as long as the tab (sessionStorage), never in a URL
    expect(page.locator("#key-state")).to_have_text("key set")


def test_errors_in_words(context: BrowserContext, tmp_path: Path, page_stack: LocalStack) -> None:
    """413, 415, 422 and 503 from a real API whose Redis is gone; a file over the upload limit
    is refused by the page itself, before it is sent."""
    settings = page_stack.settings.model_copy(
        update={
            "redis_url": "redis://127.0.0.1:9/0",
            "max_upload_mb": 1,
            "max_megapixels": 2,
            "broker_retry_seconds": 1,
            "fetch_allow_private": False,
        }
    )
    api = ApiServer(settings).start()
    try:
        watched = Watched(context, api.url)
        page = watched.page
        big = Image.effect_noise((1200, 1200), 64).convert("RGB")
        buffer = io.BytesIO()
        big.save(buffer, "PNG")
        wide = io.BytesIO()
        Image.new("RGB", (3000, 1000), "white").save(wide, "PNG")
        files = {
            "big.png": buffer.getvalue(),  # over 1 MiB
            "wide.png": wide.getvalue(),  # a small file of 3 MP, over the API's 2
            "notes.jpg": b"not a photo",
            "small.jpg": variant("car-1.jpg", (0, 0, 200, 200)),
        }
        page.set_input_files("#files", [str(photo(tmp_path, n, d)) for n, d in files.items()])
        page.click(".urls summary")
        page.fill("#urls", "http://127.0.0.1:1/photo.jpg")
        page.click("#add-urls")
        watched.final(4)  # and small.jpg waits to be sent again
        words = {
            "big.png": f"Too large: {len(files['big.png']) / 2**20:.1f} MiB, over this service's "
            "limit of 1.0 MiB",
            "wide.png": "Too large: ",
            "notes.jpg": "Unsupported file: ",
            "photo.jpg": "Refused: cannot fetch image_url (not_allowed)",
            "small.jpg": "bgq is unavailable right now, try again in a moment: ",
        }
        for name, text in words.items():
            expect(watched.job(name).locator(".error")).to_contain_text(text)
        small = watched.job("small.jpg")
        expect(small).to_have_attribute("data-state", "waiting")
        expect(small.locator(".error")).to_contain_text("(trying again in ")
        expect(page.locator("#banner")).to_contain_text("bgq is unavailable right now")

        def refusals() -> int:
            return sum(status in (413, 415, 422) for status in watched.statuses)

        assert refusals() == 3  # big.png was never sent: the page refused it

        with page.expect_response(lambda r: r.url.endswith("/v1/jobs") and r.status == 415):
            watched.job("notes.jpg").locator(".retry").click()
        expect(watched.job("notes.jpg")).to_have_attribute("data-state", "failed", timeout=WAIT)
        page.click("#retry-failed")  # wide.png, notes.jpg and photo.jpg go again
        watched.until(lambda: refusals() == 7, "the failed images to be sent again")
        expect(page.locator(".job[data-state=failed]")).to_have_count(4, timeout=WAIT)
    finally:
        api.stop()


def test_narrow_window(context: BrowserContext, base: str, tmp_path: Path) -> None:
    """On a phone-sized window: one column, nothing wider than the screen, pairs side by side."""
    images = {
        "sneaker-shot.jpg": variant("car-1.jpg", (0, 0, 640, 427)),
        "model-look.jpg": variant("cloth-1.jpg", (0, 0, 480, 720)),
        "figure.jpg": variant("anime-girl-1.jpg", (0, 0, 500, 500)),
    }
    watched = Watched(context, base)
    page = watched.page
    page.set_input_files("#files", [str(photo(tmp_path, n, d)) for n, d in images.items()])
    watched.final(3)
    page.set_input_files("#files", [str(photo(tmp_path, "again.jpg", images["figure.jpg"]))])
    page.set_input_files("#files", [str(photo(tmp_path, "label.jpg", b"GIF89a, but cut"))])
    watched.final(5)
    shots = os.environ.get("BGQ_TEST_SCREENSHOTS")
    if shots:
        page.screenshot(path=str(Path(shots) / "page-desktop.png"), full_page=True)

    page.set_viewport_size({"width": 390, "height": 844})
    width = page.evaluate("() => document.documentElement.scrollWidth")
    wider = page.evaluate(WIDER_THAN_SCREEN)
    assert width <= 390, f"the page is {width}px wide on a 390px screen: {wider}"
    first = page.locator(".job").first
    original = first.locator(".original img").bounding_box()
    result = first.locator(".result img").bounding_box()
    assert original and result and original["y"] == result["y"] and original["x"] < result["x"]
    assert result["x"] + result["width"] <= 390
    second = page.locator(".job").nth(1).bounding_box()
    box = first.bounding_box()
    assert box and second and second["y"] > box["y"] + box["height"] - 1  # one column
    for control in ("label[for=files]", "#model", "#canvas", "#download-all"):
        bounds = page.locator(control).bounding_box()
        assert bounds and bounds["x"] >= 0 and bounds["x"] + bounds["width"] <= 390, control
    if shots:
        page.screenshot(path=str(Path(shots) / "page-phone.png"), full_page=False)
