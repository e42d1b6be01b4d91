"""Images by URL: the API's image_url, `bgq submit URL` and manifest url rows, against a real
HTTP server on loopback serving the sample photos, real Redis and real prefork workers."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from bgq import defaults
from bgq.options import Options
from bgq.settings import settings_env
from bgq.stack import LocalStack
from producer.api import create_app
from producer.http_client import HttpClient
from producer.ingest import run_ingest
from tests.helpers import BGQ, JPEG, ApiServer, ImageServer, error_of, sample_bytes, wait_for
from tests.stacks import StackFactory


@pytest.fixture(scope="module")
def photos() -> Iterator[ImageServer]:
    server = ImageServer(delay=0.3).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def url_stack(make_stack: StackFactory) -> LocalStack:
    """Workers, and settings that let the producer side fetch from loopback."""
    return make_stack(fetch_allow_private=True)


@pytest.fixture(scope="module")
def apis(url_stack: LocalStack) -> Iterator[tuple[str, str]]:
    """An API allowed to fetch from loopback, and one with the default (public hosts only)."""
    settings = url_stack.settings.model_copy(update={"redis_url": url_stack.url})
    open_api = ApiServer(settings).start()
    strict = ApiServer(settings.model_copy(update={"fetch_allow_private": False})).start()
    yield open_api.url, strict.url
    open_api.stop()
    strict.stop()


@pytest.fixture
def http(apis: tuple[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=apis[0], timeout=120) as client:
        yield client


def test_image_url_in_query_form_or_json_is_the_uploaded_images_job(
    http: httpx.Client, photos: ImageServer
) -> None:
    uploaded = http.post("/v1/remove", content=sample_bytes("car-1.jpg"), headers=JPEG)
    assert uploaded.status_code == 200, uploaded.text
    key = uploaded.headers["x-bgq-job-id"]
    url = photos.photo("car-1.jpg")
    answers = [
        http.post("/v1/remove", params={"image_url": url}),
        http.post("/v1/remove", files={"image_url": (None, url)}),  # a multipart form field
        http.post("/v1/remove", data={"image_url": url}),  # a urlencoded form field
        http.post("/v1/remove", json={"image_url": url}),
        http.post("/v1/remove", json={"image_url": photos.photo("car-1.jpg", "alias")}),
    ]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-bgq-job-id"] == key
        assert answer.headers["x-bgq-cached"] == "true"
        assert answer.content == uploaded.content
    job = http.post("/v1/jobs", json={"image_url": url, "post_process_mask": True})
    assert job.status_code == 202, job.text
    assert job.json()["id"] != key  # other options, another job


def test_the_python_client_sends_image_url(apis: tuple[str, str], photos: ImageServer) -> None:
    with HttpClient(apis[0], timeout=120) as client:
        by_url = client.remove(image_url=photos.photo("cloth-1.jpg"), bgcolor=(0, 0, 0, 255))
        assert by_url == client.remove(sample_bytes("cloth-1.jpg"), bgcolor=(0, 0, 0, 255))
        assert client.submit(image_url=photos.photo("cloth-1.jpg"))["status"] in ("done", "queued")


def test_fetch_failures_answer_422_fetch_failed(apis: tuple[str, str], photos: ImageServer) -> None:
    base, strict = apis
    cases = [
        (base, photos.url + "/photos/missing.jpg", "404"),
        (base, photos.url + "/page.html", "not an image"),
        (strict, photos.photo("car-1.jpg"), "BGQ_FETCH_ALLOW_PRIVATE"),  # loopback refused
    ]
    for api, url, words in cases:
        for route in ("/v1/remove", "/v1/jobs"):
            answer = httpx.post(api + route, json={"image_url": url}, timeout=60)
            assert answer.status_code == 422, answer.text
            error = error_of(answer)
            assert error["code"] == "fetch_failed" and words in error["message"], error


@pytest.mark.parametrize(
    "request_args",
    [
        {"params": {"image_url": "http://127.0.0.1/x.jpg"}, "content": b"\xff\xd8"},
        {"data": {"image_url": "http://127.0.0.1/x.jpg"}, "files": {"file": ("a.jpg", b"x")}},
        {},
        {"files": {"format": (None, "png")}},
        {"data": {"format": "png"}},
        {"json": {"format": "png"}},
    ],
    ids=[
        "query-and-body",
        "form-file-and-url",
        "nothing",
        "form-without-either",
        "urlencoded-without",
        "json-without",
    ],
)
def test_exactly_one_of_image_and_image_url(
    http: httpx.Client, request_args: dict[str, Any]
) -> None:
    if "content" in request_args:
        request_args = {**request_args, "headers": JPEG}
    answer = http.post("/v1/jobs", **request_args)
    assert answer.status_code == 422, answer.text
    error = error_of(answer)
    assert error["code"] == "invalid_request"
    assert "image" in error["message"] and "image_url" in error["message"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"image_url": "http://h/x.jpg", "crop": "true"}, "crop: must be a JSON boolean"),
        ({"image_url": "http://h/x.jpg", "quality": "80"}, "quality: must be a JSON integer"),
        ({"image_url": "http://h/x.jpg", "size": 3}, "unknown field"),
        ({"image_url": "ftp://h/x.jpg"}, "image_url: must be an http"),
        ({"image_url": "http://h/x.jpg", "canvas": "0x10"}, "canvas"),
        (["http://h/x.jpg"], "must be an object"),
    ],
)
def test_json_bodies_are_checked_like_forms(http: httpx.Client, body: Any, words: str) -> None:
    answer = http.post("/v1/remove", json=body)
    assert answer.status_code == 422, answer.text
    error = error_of(answer)
    assert error["code"] == "invalid_request" and words in error["message"], error


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{", "Expecting property name"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"quality": ' + b"9" * 5000 + b"}", "a number of over 4300 digits"),
        (b'{"image_url": "\xff"}', "can't decode byte 0xff"),
    ],
)
def test_a_malformed_json_body_is_a_422(http: httpx.Client, body: bytes, words: str) -> None:
    answer = http.post("/v1/remove", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 422, answer.text
    error = error_of(answer)
    assert error["code"] == "invalid_request", error
    assert error["message"].startswith("malformed JSON body: ") and words in error["message"]


def cli_env(stack: LocalStack) -> dict[str, str]:
    """The environment of a `bgq` process on this stack (its Redis and store)."""
    settings = stack.settings.model_copy(update={"redis_url": stack.url})
    return {"PATH": "/usr/bin:/bin", **settings_env(settings)}


def test_bgq_submit_a_url(url_stack: LocalStack, photos: ImageServer, tmp_path: Path) -> None:
    env = cli_env(url_stack)
    run = subprocess.run(
        [BGQ, "submit", photos.photo("anime-girl-1.jpg")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    out = tmp_path / "anime-girl-1.out.png"
    assert out.read_bytes().startswith(b"\x89PNG")
    local = tmp_path / "anime-girl-1.jpg"
    local.write_bytes(sample_bytes("anime-girl-1.jpg"))
    again = subprocess.run(
        [BGQ, "submit", str(local)], env=env, capture_output=True, text=True, timeout=120
    )
    assert "cached: yes" in again.stdout and run.stdout.splitlines()[0] in again.stdout

    missing = subprocess.run(
        [BGQ, "submit", photos.url + "/photos/nothing-here.jpg"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1
    assert "404" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_a_manifest_of_urls_and_paths(
    url_stack: LocalStack, photos: ImageServer, tmp_path: Path
) -> None:
    (tmp_path / "local.jpg").write_bytes(sample_bytes("car-1.jpg"))
    manifest = tmp_path / "list.csv"
    rows = [
        "id,path,url",
        f",,{photos.photo('cloth-1.jpg')}",
        f"sku-7,,{photos.photo('car-1.jpg', 'alias')}",
        ",local.jpg,",
        f",,{photos.url}/photos/gone.jpg",
        f",,{photos.url}/page.html",
        f",,{photos.photo('anime-girl-1.jpg')}",
        f",,{photos.photo('plants-1.jpg')}",
        f",local.jpg,{photos.photo('car-1.jpg')}",
    ]
    manifest.write_text("\n".join(rows) + "\n")
    photos.most_in_flight = 0
    out, report = tmp_path / "out", tmp_path / "report.jsonl"
    settings = url_stack.settings.model_copy(update={"redis_url": url_stack.url})
    failed = run_ingest(
        settings, str(manifest), str(out), "u2netp", Options(), 4, report, fetch_concurrency=4
    )
    assert failed == 3
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    by_source = {str(r["source"]).rsplit("/", 1)[-1]: r for r in lines}
    status = {name: r["status"] for name, r in by_source.items()}
    assert len(lines) == 8 and status.pop("list.csv:9") == "failed"
    assert status.pop("gone.jpg") == status.pop("page.html") == "failed"
    # The rest are done, or cached when another module's stack already made them.
    assert set(status) == {
        "cloth-1.jpg",
        "car-1.jpg",
        "local.jpg",
        "anime-girl-1.jpg",
        "plants-1.jpg",
    }
    assert set(status.values()) <= {"done", "cached"}
    assert by_source["car-1.jpg"]["key"] == by_source["local.jpg"]["key"]  # the same bytes
    assert "404" in str(by_source["gone.jpg"]["error"])
    assert "not an image" in str(by_source["page.html"]["error"])
    assert "exactly one of `path` and `url`" in str(by_source["list.csv:9"]["error"])
    made = sorted(p.name for p in out.glob("*.png"))
    assert made == ["anime-girl-1.png", "cloth-1.png", "local.png", "plants-1.png", "sku-7.png"]
    assert photos.most_in_flight > 1  # the URLs were fetched concurrently


def one_default_thread(app: Any) -> Any:
    """The app with AnyIO's default threadpool cut to 1 thread (the API's other calls share it)."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 1
        await app(scope, receive, send)

    return wrapped


class HeldImageServer(ImageServer):
    """An image server that answers nothing until `answer` is set (60 s at most)."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = threading.Event()

    def hold(self) -> None:
        self.answer.wait(timeout=60)


def test_slow_image_servers_take_only_the_fetch_threads(
    url_stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fetches run on their own limiter: with every fetch thread waiting on a slow server, a
    request that needs the default threadpool (its only thread, here) is answered."""
    monkeypatch.setattr(defaults, "API_FETCH_CONCURRENCY", 2)
    settings = url_stack.settings.model_copy(update={"redis_url": url_stack.url})
    slow = HeldImageServer().start()
    api = ApiServer(settings, one_default_thread(create_app(settings))).start()
    try:
        with httpx.Client(base_url=api.url, timeout=60) as client, ThreadPoolExecutor(3) as pool:
            fetches = [
                pool.submit(client.post, "/v1/jobs", json={"image_url": slow.photo(name)})
                for name in ("car-1.jpg", "anime-girl-1.jpg", "cloth-1.jpg")
            ]
            wait_for(lambda: slow.in_flight == 2, timeout=30, what="2 fetches held by the server")
            # A threadpool call, answered while both fetch threads are held (the server answers
            # them only after it): shorter than the hold, so a blocked call cannot outwait it.
            assert client.get(f"/v1/jobs/{'0' * 64}", timeout=20).status_code == 404
            slow.answer.set()
            assert all(f.result().status_code == 202 for f in fetches)
        assert slow.most_in_flight == 2  # API_FETCH_CONCURRENCY at once, the third waited
    finally:
        slow.answer.set()
        api.stop()
        slow.stop()
