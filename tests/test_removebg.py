"""remove.bg's API on bgq: remove.bg's own client code, a published client library and the
error shapes against a real API on real prefork workers (the pure mapping: test_removebg_fields)."""

from __future__ import annotations

import base64
import importlib
import io
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import requests
from PIL import Image

from bgq import contract, defaults
from bgq.process import free_port
from bgq.stack import LocalStack
from producer.client import Producer
from tests.helpers import (
    ApiServer,
    ImageServer,
    LocalStackControl,
    pixels,
    sample_bytes,
    variant,
)
from tests.stacks import StackFactory

KEY = "removebg-test-key"


# -- the real stack ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def url_stack(make_stack: StackFactory) -> LocalStack:
    return make_stack(fetch_allow_private=True)


@pytest.fixture(scope="module")
def servers(url_stack: LocalStack) -> Iterator[dict[str, str]]:
    """APIs on the stack: with a key, with a key limited to 1 request a minute, and one whose
    Redis is down; their base URLs."""
    settings = url_stack.settings.model_copy(
        update={"redis_url": url_stack.url, "api_keys": KEY, "max_megapixels": 2}
    )
    down = f"redis://127.0.0.1:{free_port()}/0"
    started = {
        "api": ApiServer(settings).start(),
        "limited": ApiServer(
            settings.model_copy(update={"api_limits": "*: interactive.rpm=1"})
        ).start(),
        "jobs": ApiServer(
            settings.model_copy(update={"api_limits": "*: interactive.jobs=1"})
        ).start(),
        "small": ApiServer(settings.model_copy(update={"max_upload_mb": 1})).start(),
        "down": ApiServer(
            settings.model_copy(update={"redis_url": down, "broker_retry_seconds": 0.5})
        ).start(),
    }
    yield {name: server.url for name, server in started.items()}
    for server in started.values():
        server.stop()


@pytest.fixture
def api(servers: dict[str, str]) -> str:
    return servers["api"]


@pytest.fixture
def serve_small(servers: dict[str, str]) -> str:
    return servers["small"]


@pytest.fixture
def http(api: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api, timeout=120, headers={"X-Api-Key": KEY}) as client:
        yield client


def alpha_box(png: bytes) -> tuple[int, int, int, int]:
    """(left, top, width, height) of alpha > 0, as the X-Foreground-* headers say it."""
    with Image.open(io.BytesIO(png)) as img:
        bbox = img.getchannel("A").getbbox()
    assert bbox is not None
    left, top, right, bottom = bbox
    return left, top, right - left, bottom - top


def headers_box(headers: Any) -> tuple[int, int, int, int]:
    return tuple(int(headers[f"x-foreground-{s}"]) for s in ("left", "top", "width", "height"))  # type: ignore[return-value]


def test_documented_file_upload_is_v1_removes_result_then_a_cache_hit(
    api: str, reference: Callable[..., bytes], tmp_path: Path
) -> None:
    path = tmp_path / "file.jpg"
    path.write_bytes(variant("anime-girl-1.jpg", (0, 0, 600, 700)))
    # remove.bg's documented snippet, but for the base URL (and the file closed after).
    with open(path, "rb") as image_file:
        response = requests.post(
            api + "/v1.0/removebg",
            files={"image_file": image_file},
            data={"size": "auto"},
            headers={"X-Api-Key": KEY},
        )
    assert response.status_code == requests.codes.ok, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-bgq-cached"] == "false"
    mode, got = pixels(response.content)
    want_mode, want = pixels(reference(path.read_bytes()))
    assert mode == want_mode == "RGBA" and (got == want).all()
    # The headers: the output's size, the alpha's box, no credits, no classification.
    assert (int(response.headers["x-width"]), int(response.headers["x-height"])) == (600, 700)
    assert headers_box(response.headers) == alpha_box(response.content)
    assert response.headers["x-credits-charged"] == "0" and response.headers["x-type"] == "other"
    # /v1/remove's job for the same image is the same job, and its bytes the same.
    native = httpx.post(
        api + "/v1/remove",
        files={"file": path.read_bytes()},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
    )
    assert native.headers["x-bgq-job-id"] == response.headers["x-bgq-job-id"]
    assert native.content == response.content and native.headers["x-bgq-cached"] == "true"
    again = requests.post(
        api + "/v1.0/removebg",
        files={"image_file": path.read_bytes()},
        data={"size": "auto"},
        headers={"X-Api-Key": KEY},
    )
    assert again.headers["x-bgq-cached"] == "true" and again.content == response.content


def test_documented_image_url_form_encoded_and_carvekits_path(
    api: str, photos: ImageServer
) -> None:
    url = photos.photo("car-1.jpg")
    by_url = requests.post(
        api + "/v1.0/removebg",
        data={"image_url": url, "size": "auto"},  # form-encoded, as remove.bg documents
        headers={"X-Api-Key": KEY},
    )
    assert by_url.status_code == 200, by_url.text
    uploaded = requests.post(
        api + "/api/removebg",
        files={"image_file": sample_bytes("car-1.jpg")},
        data={"size": "full"},
        headers={"X-Api-Key": KEY},
    )
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.headers["x-bgq-job-id"] == by_url.headers["x-bgq-job-id"]
    assert uploaded.content == by_url.content


def test_base64_in_json_answered_as_remove_bgs_json(http: httpx.Client) -> None:
    data = variant("cloth-1.jpg", (0, 0, 500, 500))
    b64 = base64.b64encode(data).decode()
    answer = http.post(
        "/v1.0/removebg",
        json={"image_file_b64": b64, "size": "auto"},
        headers={"Accept": "application/json"},
    )
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    body = answer.json()["data"]
    png = base64.b64decode(body["result_b64"])
    side = ("left", "top", "width", "height")
    assert tuple(body[f"foreground_{s}"] for s in side) == alpha_box(png)
    plain = http.post("/v1.0/removebg", data={"image_file_b64": b64, "size": "auto"})
    assert plain.content == png


@pytest.mark.parametrize(
    ("params", "native", "kind"),
    [
        ({"bg_color": "81d4fa"}, {"bgcolor": "129,212,250,255", "format": "jpeg"}, "image/jpeg"),
        ({"bg_color": "white", "format": "png"}, {"bgcolor": "255,255,255,255"}, "image/png"),
        ({"format": "jpg"}, {"format": "jpeg"}, "image/jpeg"),
        ({"format": "webp"}, {"format": "webp"}, "image/webp"),
        ({"crop": "true"}, {"crop": "true"}, "image/png"),
        (
            {"crop": "true", "crop_margin": "10%"},
            {"crop": "true", "crop_margin": "10%"},
            "image/png",
        ),
        ({"channels": "alpha"}, {"only_mask": "true"}, "image/png"),
        (
            {"channels": "alpha", "format": "webp"},
            {"only_mask": "true", "format": "webp"},
            "image/webp",
        ),
    ],
)
def test_options_are_v1_removes_and_the_box_is_the_subjects(
    http: httpx.Client, params: dict[str, str], native: dict[str, str], kind: str
) -> None:
    data = sample_bytes("plants-1.jpg")
    answer = http.post(
        "/v1.0/removebg", files={"image_file": data}, data={"size": "auto", **params}
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == kind
    same = http.post(
        "/v1/remove", files={"file": data}, data=native, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert same.headers["x-bgq-job-id"] == answer.headers["x-bgq-job-id"]
    # The subject's box: of the transparent result with the same options but the background.
    plain = {k: v for k, v in native.items() if k not in ("bgcolor", "format")}
    sibling = http.post(
        "/v1/remove", files={"file": data}, data=plain, headers={"Authorization": f"Bearer {KEY}"}
    )
    with Image.open(io.BytesIO(sibling.content)) as img:
        mask = img if img.mode == "L" else img.getchannel("A")
        left, top, right, bottom = mask.getbbox() or (0, 0, 0, 0)
        size = img.size
    assert headers_box(answer.headers) == (left, top, right - left, bottom - top)
    assert (int(answer.headers["x-width"]), int(answer.headers["x-height"])) == size


def errors_of(response: httpx.Response | requests.Response) -> dict[str, str]:
    """remove.bg's error shape, checked and unwrapped."""
    body = response.json()
    assert set(body) == {"errors"} and len(body["errors"]) == 1, body
    assert {"title", "code"} <= set(body["errors"][0]), body
    return body["errors"][0]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("request_args", "code", "title"),
    [
        ({"data": {"size": "auto"}}, "missing_source", "exactly one of"),
        (
            {"data": {"size": "auto", "type": "person"}, "files": {"image_file": b"x"}},
            "unsupported_parameter",
            "type",
        ),
        (
            {"data": {"size": "auto", "add_shadow": "true"}, "files": {"image_file": b"x"}},
            "unsupported_parameter",
            "add_shadow",
        ),
        (
            {"data": {"size": "auto", "bogus": "1"}, "files": {"image_file": b"x"}},
            "unknown_parameters",
            "bogus",
        ),
        (
            {"data": {"size": "auto"}, "files": {"image_file": b"not an image"}},
            "failed_to_read_image",
            "not an image",
        ),
        (
            {"data": {"size": "auto", "crop_margin": "10 px"}, "files": {"image_file": b"x"}},
            "invalid_crop_margin",
            "crop_margin: must be",
        ),
        (
            {"data": {"size": "auto", "scale": "50%", "position": "original"}},
            "invalid_position",
            "position: original cannot go with a scale",
        ),
        (
            {"data": {"size": "auto", "roi": "0% 0%"}, "files": {"image_file": b"x"}},
            "invalid_roi",
            "roi:",
        ),
        (
            {"data": {"size": "auto", "image_url": "http://127.0.0.1:1/x.jpg"}},
            "failed_image_download",
            "image_url",
        ),
        (
            {"data": {"size": "auto", "image_url": "ftp://example.org/x.jpg"}},
            "invalid_image_url",
            "image_url",
        ),
        (
            {"data": {"size": "auto"}, "files": {"image_file": b"x", "other": b"y"}},
            "invalid_parameters",
            "other: must be a field",
        ),
        (
            {"json": {"size": 1, "image_url": "http://x"}},
            "invalid_size",
            "size: must be a JSON string",
        ),
        (
            {"json": {"size": "auto", "image_url": "http://127.0.0.1:1/x.jpg", "crop": "yes"}},
            "invalid_parameters",
            "crop: must be a JSON boolean",
        ),
        (
            {"json": {"image_url": "http://127.0.0.1:1/x.jpg", "add_shadow": "false"}},
            "invalid_parameters",
            "add_shadow: must be a JSON boolean",
        ),
        ({"json": {"colour": "red"}}, "invalid_parameters", "unknown field(s): colour"),
        (
            {"content": b"\xff\xd8", "headers": {"Content-Type": "image/jpeg"}},
            "failed_to_read_image",
            "image/jpeg",
        ),
    ],
)
def test_refusals_in_remove_bgs_shape(
    http: httpx.Client, request_args: dict[str, Any], code: str, title: str
) -> None:
    answer = http.post("/v1.0/removebg", **request_args)
    error = errors_of(answer)
    assert answer.status_code == 400 and error["code"] == code and title in error["title"], error


def test_too_large_an_image_is_a_400(http: httpx.Client) -> None:
    big = io.BytesIO()
    Image.new("RGB", (2000, 1100)).save(big, "PNG")  # 2.2 MP: over BGQ_MAX_MEGAPIXELS=2
    answer = http.post(
        "/v1.0/removebg", files={"image_file": big.getvalue()}, data={"size": "auto"}
    )
    assert answer.status_code == 400, answer.text
    assert errors_of(answer)["code"] == "resolution_too_high", answer.text


@pytest.mark.parametrize("declared", [True, False])
def test_too_large_a_body_is_a_400(serve_small: str, declared: bool) -> None:
    body = b"x" * (1024 * 1024 + 1)  # over BGQ_MAX_UPLOAD_MB=1
    chunks = iter([body[:1000], body[1000:]])
    content = body if declared else chunks  # without Content-Length: refused while read
    answer = httpx.post(
        serve_small + "/v1.0/removebg",
        content=content,
        headers={"X-Api-Key": KEY, "Content-Type": "application/x-www-form-urlencoded"},
        timeout=60,
    )
    assert answer.status_code == 400 and errors_of(answer)["code"] == "file_too_large"
    assert "BGQ_MAX_UPLOAD_MB" in errors_of(answer)["title"]


def test_the_key_as_x_api_key_or_bearer(api: str) -> None:
    data = {"size": "auto", "image_file_b64": base64.b64encode(sample_bytes("car-1.jpg")).decode()}
    for headers in ({}, {"X-Api-Key": "wrong"}, {"Authorization": "Basic " + KEY}):
        refused = httpx.post(api + "/v1.0/removebg", data=data, headers=headers, timeout=60)
        assert refused.status_code == 403 and errors_of(refused)["code"] == "auth_failed"
    for method, route in (("GET", "/v1.0/account"), ("POST", "/v1.0/removebg")):
        refused = httpx.request(method, api + route)
        assert refused.status_code == 403 and errors_of(refused)["code"] == "auth_failed"
    bearer = httpx.post(
        api + "/v1.0/removebg",
        data=data,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
    )
    assert bearer.status_code == 200, bearer.text


def test_the_document_has_the_routes_under_their_tag(api: str) -> None:
    doc = httpx.get(api + "/openapi.json").json()
    assert doc["components"]["securitySchemes"]["removebgKey"]["name"] == "X-Api-Key"
    for path in ("/v1.0/removebg", "/api/removebg"):
        op = doc["paths"][path]["post"]
        assert op["tags"] == ["remove.bg"]
        assert op["security"] == [{"removebgKey": []}, {"bearer": []}]
        assert set(op["responses"]) == {"200", "400", "403", "503"}  # no limits: no 429
        assert "X-Foreground-Top" in op["responses"]["200"]["headers"]
        assert "application/json" in op["responses"]["200"]["content"]
        body = op["requestBody"]["content"]
        assert "image_file" in body["multipart/form-data"]["schema"]["properties"]
        assert "image_file" not in body["application/json"]["schema"]["properties"]
        assert "size" in body["application/x-www-form-urlencoded"]["schema"]["properties"]
    account = doc["paths"]["/v1.0/account"]["get"]
    assert account["tags"] == ["remove.bg"] and set(account["responses"]) == {"200", "403"}


def test_account_says_what_a_self_hosted_server_can(http: httpx.Client) -> None:
    attributes = http.get("/v1.0/account").json()["data"]["attributes"]
    assert attributes["credits"]["total"] > 0 and attributes["api"]["sizes"] == "all"
    assert attributes["api"]["free_calls"] > 0
    assert httpx.get(http.base_url.join("/v1.0/account")).status_code == 403


def test_rate_limit_answers_429_with_remove_bgs_fields(servers: dict[str, str]) -> None:
    files = {"image_file": sample_bytes("car-1.jpg")}
    first = httpx.post(
        servers["limited"] + "/v1.0/removebg",
        files=files,
        data={"size": "auto"},
        headers={"X-Api-Key": KEY},
        timeout=120,
    )
    assert first.status_code == 200 and first.headers["x-ratelimit-remaining"] == "0"
    assert first.headers["x-ratelimit-limit"] == "1"
    second = httpx.post(
        servers["limited"] + "/v1.0/removebg",
        files=files,
        data={"size": "auto"},
        headers={"X-Api-Key": KEY},
        timeout=120,
    )
    assert second.status_code == 429 and errors_of(second)["code"] == "rate_limit_exceeded"
    assert int(second.headers["retry-after"]) >= 1
    assert second.headers["x-ratelimit-limit"] == "1"
    assert second.headers["x-ratelimit-remaining"] == "0"
    assert int(second.headers["x-ratelimit-reset"]) > 0


def test_redis_down_is_a_503_with_retry_after(servers: dict[str, str]) -> None:
    answer = httpx.post(
        servers["down"] + "/v1.0/removebg",
        files={"image_file": variant("car-1.jpg", (3, 3, 333, 333))},
        data={"size": "auto"},
        headers={"X-Api-Key": KEY},
        timeout=120,
    )
    assert answer.status_code == 503 and errors_of(answer)["code"] == "service_unavailable"
    assert answer.headers["retry-after"] == str(defaults.API_RETRY_AFTER)


def test_no_result_within_the_wait_is_a_503_then_a_hit(
    http: httpx.Client, url_stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(defaults, "API_MAX_WAIT", 0.5)  # the API runs in this process
    data = variant("cloth-1.jpg", (10, 10, 400, 400))
    control = LocalStackControl(url_stack)
    control.pause()
    try:
        late = http.post("/v1.0/removebg", files={"image_file": data}, data={"size": "auto"})
    finally:
        control.resume()
    assert late.status_code == 503 and errors_of(late)["code"] == "service_unavailable"
    assert "retry" in errors_of(late)["title"] and late.headers["retry-after"]
    monkeypatch.setattr(defaults, "API_MAX_WAIT", 120.0)
    retried = http.post("/v1.0/removebg", files={"image_file": data}, data={"size": "auto"})
    assert retried.status_code == 200


def test_a_published_client_library_unchanged_but_its_endpoint(
    api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: Callable[..., bytes]
) -> None:
    """PyPI's `removebg` (its endpoint is the module constant API_ENDPOINT)."""
    removebg = importlib.import_module("removebg.removebg")  # in the test extra: never skipped
    monkeypatch.setattr(removebg, "API_ENDPOINT", api + "/v1.0/removebg")
    path = tmp_path / "photo.jpg"
    path.write_bytes(variant("car-1.jpg", (0, 0, 500, 400)))
    client = removebg.RemoveBg(KEY, str(tmp_path / "errors.log"))
    client.remove_background_from_img_file(str(path), size="auto")
    out = tmp_path / "photo.jpg_no_bg.png"
    assert (pixels(out.read_bytes())[1] == pixels(reference(path.read_bytes()))[1]).all()
    as_b64 = base64.b64encode(path.read_bytes()).decode()
    client.remove_background_from_base64_img(
        as_b64, size="auto", new_file_name=str(tmp_path / "b64.png"), bg_color="white"
    )
    with Image.open(tmp_path / "b64.png") as img:  # bg_color white: remove.bg's auto is JPEG
        assert img.format == "JPEG" and img.size == (500, 400)


ANIME = "anime-girl-1.jpg"
BEARER = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize(("size", "megapixels"), [(None, 0.25), ("medium", 1.5), ("auto", None)])
def test_size_is_a_megapixel_cap(
    http: httpx.Client, size: str | None, megapixels: float | None
) -> None:
    """The default is preview (at most 0.25 MP); medium 1.5 MP; auto the original."""
    data = sample_bytes(ANIME)
    with Image.open(io.BytesIO(data)) as img:
        full = img.size
    params = {} if size is None else {"size": size}
    answer = http.post("/v1.0/removebg", files={"image_file": data}, data=params)
    assert answer.status_code == 200, answer.text
    width, height = int(answer.headers["x-width"]), int(answer.headers["x-height"])
    if megapixels is None:
        assert (width, height) == full
    else:
        assert width * height <= megapixels * 1e6
        assert ((width, height) == full) == (full[0] * full[1] <= megapixels * 1e6)


@pytest.mark.parametrize(
    ("params", "native"),
    [
        ({"roi": "0% 0% 50% 100%"}, {"roi": "0% 0% 50% 100%"}),
        ({"scale": "50%"}, {"scale": "50%"}),
        ({"scale": "50%", "position": "0% 100%"}, {"scale": "50%", "position": "0% 100%"}),
        ({"position": "0% 0%"}, {"scale": "original", "position": "0% 0%"}),
        ({"crop": "true", "crop_margin": "10px 5%"}, {"crop": "true", "crop_margin": "10px 5%"}),
        ({"crop": "true", "crop_margin": "900px"}, {"crop": "true", "crop_margin": "500px"}),
        ({"crop_margin": "10%"}, {}),  # only with crop=true, as remove.bg
    ],
)
def test_shaping_options_are_v1_removes_jobs(
    http: httpx.Client, params: dict[str, str], native: dict[str, str]
) -> None:
    data = sample_bytes(ANIME)
    answer = http.post(
        "/v1.0/removebg", files={"image_file": data}, data={"size": "auto", **params}
    )
    same = http.post("/v1/remove", files={"file": data}, data=native, headers=BEARER)
    assert answer.headers["x-bgq-job-id"] == same.headers["x-bgq-job-id"], answer.text
    assert headers_box(answer.headers) == alpha_box(answer.content)


def test_zip_has_the_box_of_its_alpha(http: httpx.Client) -> None:
    zipped = http.post(
        "/v1.0/removebg",
        files={"image_file": sample_bytes(ANIME)},
        data={"size": "auto", "format": "zip"},
    )
    assert zipped.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as bundle:
        alpha = bundle.read("alpha.png")
    with Image.open(io.BytesIO(alpha)) as mask:
        left, top, right, bottom = mask.getbbox() or (0, 0, 0, 0)
    assert headers_box(zipped.headers) == (left, top, right - left, bottom - top)


def test_a_background_image_uploaded_or_by_url(http: httpx.Client, photos: ImageServer) -> None:
    """The same job either way; auto format is JPEG; the box is the transparent result's."""
    data = sample_bytes(ANIME)
    by_file = http.post(
        "/v1.0/removebg",
        files={"image_file": data, "bg_image_file": sample_bytes("plants-1.jpg")},
        data={"size": "auto"},
    )
    by_url = http.post(
        "/v1.0/removebg",
        files={"image_file": data},
        data={"size": "auto", "bg_image_url": photos.photo("plants-1.jpg"), "image_url": ""},
    )
    assert by_file.status_code == by_url.status_code == 200, by_file.text
    assert by_file.headers["content-type"] == "image/jpeg"
    assert by_file.headers["x-bgq-job-id"] == by_url.headers["x-bgq-job-id"]
    plain = http.post("/v1.0/removebg", files={"image_file": data}, data={"size": "auto"})
    assert headers_box(by_file.headers) == alpha_box(plain.content)


@pytest.mark.parametrize(
    ("files", "params", "code", "title"),
    [
        ({"bg_image_file": "plants-1.jpg"}, {"bg_color": "red"}, "multiple_bg_sources", "bg_color"),
        ({"bg_image_file": None}, {}, "failed_to_read_image", "bg_image_file"),
        ({}, {"bg_image_url": "http://127.0.0.1:1/bg.jpg"}, "failed_bg_download", "bg_image_url"),
    ],
)
def test_background_refusals(
    http: httpx.Client, files: dict[str, str | None], params: dict[str, str], code: str, title: str
) -> None:
    uploads = {k: sample_bytes(v) if v else b"not an image" for k, v in files.items()}
    answer = http.post(
        "/v1.0/removebg",
        files={"image_file": sample_bytes(ANIME), **uploads},
        data={"size": "auto", **params},
    )
    error = errors_of(answer)
    assert answer.status_code == 400 and error["code"] == code and title in error["title"], error


def test_json_booleans_and_nulls(http: httpx.Client) -> None:
    """remove.bg's boolean fields as JSON booleans; a null is an absent field; type_level=none
    sends no X-Type."""
    b64 = base64.b64encode(sample_bytes(ANIME)).decode()
    plain = http.post("/v1.0/removebg", json={"image_file_b64": b64, "size": "auto"})
    typed = http.post(
        "/v1.0/removebg",
        json={
            "image_file_b64": b64,
            "image_url": None,
            "size": "auto",
            "add_shadow": False,
            "semitransparency": True,
            "crop": False,
            "bg_color": None,
            "type_level": "none",
        },
    )
    assert typed.status_code == 200, typed.text
    assert typed.headers["x-bgq-job-id"] == plain.headers["x-bgq-job-id"]
    assert "x-type" not in typed.headers and plain.headers["x-type"] == "other"


def test_an_opaque_results_box_is_left_out_when_not_ready_in_time(
    http: httpx.Client,
    url_stack: LocalStack,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One API_MAX_WAIT for the result and its transparent sibling: a result in time is
    answered, without X-Foreground-* when the sibling is not."""
    data = variant("plants-1.jpg", (7, 7, 307, 307))
    native = {"bgcolor": "129,212,250,255", "format": "jpeg"}
    first = http.post("/v1/remove", files={"file": data}, data=native, headers=BEARER)
    assert first.status_code == 200, first.text
    monkeypatch.setattr(defaults, "API_MAX_WAIT", 0.5)  # the API runs in this process
    control = LocalStackControl(url_stack)
    control.pause()
    try:
        params = {"size": "auto", "bg_color": "81d4fa"}
        answer = http.post("/v1.0/removebg", files={"image_file": data}, data=params)
        as_json = http.post(
            "/v1.0/removebg",
            files={"image_file": data},
            data=params,
            headers={"Accept": "application/json"},
        )
    finally:
        control.resume()
    assert answer.status_code == 200 and answer.content == first.content, answer.text
    assert answer.headers["x-width"] == "300" and "x-foreground-top" not in answer.headers
    assert as_json.status_code == 200 and set(as_json.json()["data"]) == {"result_b64"}


def test_the_request_is_counted_before_the_background_is_fetched_or_stored(
    servers: dict[str, str], url_stack: LocalStack
) -> None:
    """Over the key's rate, a background upload is never stored (nor a URL fetched)."""
    limited = httpx.Client(base_url=servers["limited"], headers={"X-Api-Key": KEY}, timeout=120)
    files = {"image_file": sample_bytes("car-1.jpg")}
    with limited:
        first = limited.post("/v1.0/removebg", files=files, data={"size": "auto"})
        assert first.status_code in (200, 429)  # rpm=1: the rate test may have spent it
        background = variant("plants-1.jpg", (1, 2, 201, 202))
        over = limited.post(
            "/v1.0/removebg",
            files={**files, "bg_image_file": background},
            data={"size": "auto"},
        )
    assert over.status_code == 429 and errors_of(over)["code"] == "rate_limit_exceeded"
    store = Producer(url_stack.settings.model_copy(update={"redis_url": url_stack.url})).store
    assert store.stat(contract.INPUTS, contract.input_digest(background)) is None


def test_a_jobs_limit_gives_remove_bgs_rate_fields(
    servers: dict[str, str],
    url_stack: LocalStack,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key with only a jobs-outstanding limit: X-RateLimit-* from it (Reset: Retry-After)."""
    jobs = httpx.Client(base_url=servers["jobs"], headers={"X-Api-Key": KEY}, timeout=120)
    monkeypatch.setattr(defaults, "API_MAX_WAIT", 0.5)
    control = LocalStackControl(url_stack)
    control.pause()
    try:
        with jobs:
            late = jobs.post(
                "/v1.0/removebg",
                files={"image_file": variant("car-1.jpg", (4, 4, 304, 304))},
                data={"size": "auto"},
            )
            over = jobs.post(
                "/v1.0/removebg",
                files={"image_file": variant("car-1.jpg", (5, 5, 305, 305))},
                data={"size": "auto"},
            )
    finally:
        control.resume()
    assert late.status_code == 503, late.text
    assert over.status_code == 429 and errors_of(over)["code"] == "rate_limit_exceeded"
    assert over.headers["x-ratelimit-limit"] == "1"
    assert over.headers["x-ratelimit-remaining"] == "0"
    reset = int(over.headers["x-ratelimit-reset"]) - int(over.headers["retry-after"])
    assert abs(reset - time.time()) < 30
