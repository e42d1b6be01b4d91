"""Form-encoded submissions (application/x-www-form-urlencoded) to bgq's own routes: image_url
and the options as form fields, on real Redis, real prefork workers and the real model, with the
photos on a real HTTP server on loopback; and `read_fields`, the body reader any route may use."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import requests
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bgq.stack import LocalStack
from producer.api.errors import ApiError
from producer.api.submission import ONE_IMAGE, read_fields
from tests.helpers import ApiServer, ImageServer, error_of, pixels, sample_bytes
from tests.stacks import StackFactory

WHITE = {"bgcolor": "255,255,255,255", "post_process_mask": "true"}  # as form fields
WHITE_JSON = {"bgcolor": "255,255,255,255", "post_process_mask": True}  # the same, typed


@pytest.fixture(scope="module")
def url_stack(make_stack: StackFactory) -> LocalStack:
    """Workers, and settings that let the API fetch from loopback."""
    return make_stack(fetch_allow_private=True)


@pytest.fixture(scope="module")
def base(url_stack: LocalStack) -> Iterator[str]:
    server = ApiServer(url_stack.settings.model_copy(update={"redis_url": url_stack.url})).start()
    yield server.url
    server.stop()


def encoded(encoding: str, fields: dict[str, Any]) -> dict[str, Any]:
    """httpx's arguments sending `fields` (text, as a form has them) in a body of `encoding`."""
    if encoding == "urlencoded":
        return {"data": fields}
    if encoding == "multipart":
        return {"files": {name: (None, value) for name, value in fields.items()}}
    typed = {k: True if v == "true" else int(v) if v.isdigit() else v for k, v in fields.items()}
    return {"json": typed}


def test_a_form_encoded_image_url_is_removed_as_rembg_does_and_as_json_is(
    http: httpx.Client, photos: ImageServer, reference: Callable[..., bytes]
) -> None:
    url = photos.photo("cloth-1.jpg")
    form = http.post("/v1/remove", data={"image_url": url, **WHITE})
    assert form.status_code == 200, form.text
    assert form.headers["x-bgq-cached"] == "false"  # computed for this request
    want = reference(
        sample_bytes("cloth-1.jpg"), bgcolor=(255, 255, 255, 255), post_process_mask=True
    )
    assert (pixels(form.content)[1] == pixels(want)[1]).all()
    by_json = http.post("/v1/remove", json={"image_url": url, **WHITE_JSON})
    assert by_json.status_code == 200 and by_json.headers["x-bgq-cached"] == "true"
    assert by_json.headers["x-bgq-job-id"] == form.headers["x-bgq-job-id"]
    assert by_json.content == form.content
    job = http.post("/v1/jobs", data={"image_url": url, "lane": "bulk", **WHITE})
    assert job.status_code == 202, job.text
    assert job.json()["id"] == form.headers["x-bgq-job-id"] and job.json()["status"] == "done"


IMAGE_URL = "http://127.0.0.1:9/a.jpg"  # never fetched: each request is refused first


@pytest.mark.parametrize("route", ["/v1/remove", "/v1/jobs"])
@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"image_url": IMAGE_URL, "quality": "high"}, "invalid options: quality: "),
        ({"image_url": IMAGE_URL, "crop": "True"}, "invalid options: crop: must be true or false"),
        ({"image_url": IMAGE_URL, "size": "auto"}, "unknown field(s): size"),
        ({"image_url": IMAGE_URL, "model": "u3net"}, "unknown model 'u3net'"),
        ({"image_url": IMAGE_URL, "lane": "fast"}, "lane: must be one of"),
        ({"image_url": "ftp://h/a.jpg"}, "image_url: must be an http"),
        ({"image_url": IMAGE_URL, "file": "a.jpg"}, "file: must be a file part"),
        ({"image_url": IMAGE_URL, "crop_margin": "5%"}, "crop_margin: applies only with crop"),
        ({"format": "png"}, ONE_IMAGE),
    ],
    ids=[
        "bad-option",
        "bad-bool",
        "unknown",
        "model",
        "lane",
        "image-url",
        "file-as-field",
        "across",
        "no-image",
    ],
)
def test_a_bad_form_field_is_refused_naming_it(
    http: httpx.Client, route: str, fields: dict[str, str], words: str
) -> None:
    answer = http.post(route, data=fields)
    assert answer.status_code == 422, answer.text
    error = error_of(answer)
    assert error["code"] == "invalid_request" and words in error["message"], error


@pytest.mark.parametrize("encoding", ["urlencoded", "multipart", "json"])
def test_a_valid_body_field_never_hides_a_bad_query_one(http: httpx.Client, encoding: str) -> None:
    body = encoded(encoding, {"image_url": IMAGE_URL, "quality": "80"})
    answer = http.post("/v1/remove", params={"quality": "high"}, **body)
    assert answer.status_code == 422, answer.text
    assert error_of(answer)["message"].startswith("invalid options: quality: ")


@pytest.mark.parametrize("encoding", ["urlencoded", "multipart", "json"])
def test_body_fields_replace_and_complete_the_querys(
    http: httpx.Client, photos: ImageServer, encoding: str
) -> None:
    url = photos.photo("car-1.jpg")
    whole = http.post("/v1/jobs", json={"image_url": url, "canvas": "300x300", "padding": "10%"})
    assert whole.status_code == 202, whole.text
    body = encoded(encoding, {"image_url": url, "canvas": "300x300", "padding": "10%"})
    query = {"canvas": "200x200", "position": "bottom"}  # canvas replaced, position added
    split = http.post("/v1/jobs", params=query, **body)
    assert split.status_code == 202, split.text
    with_position = {"image_url": url, "canvas": "300x300", "padding": "10%", "position": "bottom"}
    same = http.post("/v1/jobs", json=with_position).json()["id"]
    assert split.json()["id"] == same != whole.json()["id"]


def test_requests_data_and_curl_d_post_a_form(
    base: str, photos: ImageServer, tmp_path: Path
) -> None:
    url = photos.photo("plants-1.jpg")
    fields = {"image_url": url, "format": "jpeg", "quality": "85"}
    by_requests = requests.post(f"{base}/v1/remove", data=fields, timeout=120)
    assert by_requests.status_code == 200, by_requests.text
    assert by_requests.headers["content-type"] == "image/jpeg"
    out = tmp_path / "plants.jpg"
    args = [f"-d{name}={value}" for name, value in fields.items()]
    subprocess.run(["curl", "-sf", "-o", out, *args, f"{base}/v1/remove"], check=True, timeout=120)
    assert out.read_bytes() == by_requests.content
    assert by_requests.content[:3] == b"\xff\xd8\xff"  # a JPEG


def test_the_openapi_document_has_the_form_body_on_both_routes(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    for path in ("/v1/remove", "/v1/jobs"):
        content = paths[path]["post"]["requestBody"]["content"]
        form = content["application/x-www-form-urlencoded"]["schema"]
        assert form == content["application/json"]["schema"], path
        assert "image_url" in form["properties"] and "file" not in form["properties"]


PHOTO = ("a.jpg", b"\xff\xd8 a photo")


async def echo_fields(request: Request) -> JSONResponse:
    """What `read_fields` reads for a route with two file parts (as remove.bg's has)."""
    types = {"size": "string"} if "typed" in request.query_params else None
    try:
        fields, files = await read_fields(
            request, frozenset({"image_file", "bg_image_file"}), types
        )
    except ApiError as exc:
        return JSONResponse({"status": exc.status, "message": exc.message})
    return JSONResponse(
        {"fields": fields, "files": {k: v.decode("latin-1") for k, v in files.items()}}
    )


@pytest.mark.parametrize(
    ("request_args", "want"),
    [
        (
            {"files": {"image_file": PHOTO, "bg_image_file": PHOTO}, "data": {"size": "auto"}},
            {
                "fields": {"size": "auto"},
                "files": dict.fromkeys(["image_file", "bg_image_file"], PHOTO[1].decode("latin-1")),
            },
        ),
        (
            {"data": {"image_url": "http://h/a.jpg", "size": "preview"}},
            {"fields": {"image_url": "http://h/a.jpg", "size": "preview"}, "files": {}},
        ),
        (
            {"params": {"typed": "1"}, "json": {"size": "full"}},
            {"fields": {"size": "full"}, "files": {}},
        ),
        ({"json": {"size": "full"}}, {"status": 422, "message": "unknown field(s): size"}),
        (
            {"json": {"quality": "80"}},
            {"status": 422, "message": "quality: must be a JSON integer"},
        ),
        (
            {"files": {"file": PHOTO}},
            {"status": 422, "message": "file: must be a field, not a file"},
        ),
        (
            {"files": {"image_file": (None, "a.jpg")}},
            {"status": 422, "message": "image_file: must be a file part"},
        ),
        (
            {"data": {"bg_image_file": "a.jpg"}},
            {"status": 422, "message": "bg_image_file: must be a file part"},
        ),
        (
            {"content": b"a", "headers": {"Content-Type": "text/plain"}},
            {
                "status": 415,
                "message": "send multipart/form-data, application/x-www-form-urlencoded, "
                "application/json, not text/plain",
            },
        ),
        ({}, {"fields": {}, "files": {}}),
    ],
    ids=[
        "multipart-files",
        "urlencoded",
        "json-typed",
        "json-bgqs-types",
        "json-wrong-type",
        "another-file",
        "field-as-file-part",
        "urlencoded-file-part",
        "other-type",
        "no-body",
    ],
)
def test_read_fields_serves_any_routes_files_and_fields(
    request_args: dict[str, Any], want: dict[str, Any]
) -> None:
    app = Starlette(routes=[Route("/", echo_fields, methods=["POST"])])

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.post("/", **request_args)

    assert anyio.run(post).json() == want
