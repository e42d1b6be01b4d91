"""Output options (format, quality, crop, canvas, ...) through the API, `bgq submit` and
`bgq ingest`: validation naming the option, names and extensions, content types; and one
shaped result end to end per surface, on real Redis and prefork workers."""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from bench.s3server import S3Server
from bgq.options import Options
from bgq.settings import settings_env
from bgq.stack import LocalStack
from producer.ingest import run_ingest
from tests.helpers import BGQ, JPEG, ApiServer, bgq_in_process, sample_bytes, variant

# Invalid options, each with the option its error must name.
INVALID = [
    ({"canvas": "0x10"}, "canvas"),
    ({"canvas": "100000x100"}, "canvas"),
    ({"canvas": "100x100", "padding": "50px"}, "padding"),
    ({"format": "gif"}, "format"),
    ({"quality": "0"}, "quality"),
    ({"crop_margin": "5%"}, "crop_margin"),
    ({"position": "top"}, "position"),
]


@pytest.fixture(scope="module")
def base(stack: LocalStack) -> Iterator[str]:
    server = ApiServer(stack.settings.model_copy(update={"redis_url": stack.url})).start()
    yield server.url
    server.stop()


@pytest.fixture
def http(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=120) as client:
        yield client


@pytest.mark.parametrize(("fields", "option"), INVALID)
@pytest.mark.parametrize("where", ["query", "form", "json"])
def test_api_refuses_invalid_options_naming_them(
    http: httpx.Client, fields: dict[str, str], option: str, where: str
) -> None:
    data = sample_bytes("car-1.jpg")
    if where == "query":
        answer = http.post("/v1/jobs", params=fields, content=data, headers=JPEG)
    elif where == "form":
        answer = http.post("/v1/jobs", data=fields, files={"file": ("a.jpg", data)})
    else:
        typed = {k: int(v) if k == "quality" else v for k, v in fields.items()}
        answer = http.post("/v1/jobs", json={"image_url": "http://127.0.0.1/a.jpg", **typed})
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_request" and f"{option}:" in error["message"], error


def test_api_options_may_be_split_between_query_and_form(http: httpx.Client) -> None:
    data = variant("car-1.jpg", (0, 0, 200, 150))
    whole = {"canvas": "300x300", "padding": "10%", "position": "bottom", "format": "webp"}
    split = http.post(
        "/v1/jobs",
        params={"canvas": "300x300", "format": "webp"},
        data={"padding": "10%", "position": "bottom"},
        files={"file": ("a.jpg", data)},
    )
    in_query = http.post("/v1/jobs", params=whole, content=data, headers=JPEG)
    assert split.status_code == in_query.status_code == 202, split.text
    assert split.json()["id"] == in_query.json()["id"]
    plain = http.post("/v1/jobs", content=data, headers=JPEG).json()["id"]
    assert plain != split.json()["id"]


def test_api_result_of_a_png_is_image_png(http: httpx.Client) -> None:
    data = variant("anime-girl-1.jpg", (0, 0, 240, 240))
    answer = http.post("/v1/remove", params={"format": "png", "quality": "50"}, content=data)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    again = http.post("/v1/remove", content=data)  # png ignores quality: the same job
    assert again.headers["x-bgq-job-id"] == answer.headers["x-bgq-job-id"]


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# Shaped end to end: these pass once workers/shaping.py renders crops, canvases and formats.


def test_api_shaped_results_have_their_format_and_canvas(http: httpx.Client) -> None:
    data = variant("cloth-1.jpg", (0, 0, 300, 400))
    fields = {"format": "webp", "canvas": "200x100", "padding": "5%", "position": "bottom"}
    answer = http.post("/v1/remove", params=fields, content=data, headers=JPEG)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/webp"
    image = decoded(answer.content)
    assert image.format == "WEBP" and image.size == (200, 100)
    key = answer.headers["x-bgq-job-id"]
    result = http.get(f"/v1/jobs/{key}/result")
    assert result.headers["content-type"] == "image/webp" and result.content == answer.content
    cropped = http.post("/v1/remove", params={"format": "jpeg", "crop": "true"}, content=data)
    assert cropped.status_code == 200, cropped.text
    assert cropped.headers["content-type"] == "image/jpeg"
    image = decoded(cropped.content)
    plain = decoded(http.post("/v1/remove", content=data, headers=JPEG).content)  # uncropped
    box = plain.getchannel("A").getbbox()  # the subject's box: crop_margin is 0 by default
    assert box is not None and box != (0, 0, *plain.size)  # there is a frame to crop away
    assert image.format == "JPEG" and image.size == (box[2] - box[0], box[3] - box[1])


def cli_env(stack: LocalStack) -> dict[str, str]:
    settings = stack.settings.model_copy(update={"redis_url": stack.url})
    return {"PATH": "/usr/bin:/bin", **settings_env(settings)}


def test_bgq_submit_writes_the_formats_extension(stack: LocalStack, tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(variant("car-1.jpg", (10, 10, 250, 200)))
    args = [BGQ, "submit", str(image), "--format", "webp", "--crop", "--crop-margin", "4px"]
    run = subprocess.run(args, env=cli_env(stack), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = tmp_path / "a.out.webp"
    assert f"output: {out}" in run.stdout
    assert decoded(out.read_bytes()).format == "WEBP"


@pytest.mark.parametrize(("fields", "option"), INVALID)
def test_cli_refuses_invalid_options_naming_them(
    env: dict[str, str], tmp_path: Path, fields: dict[str, str], option: str
) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(b"never read")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in fields.items()]
    flags = [f if f != "--crop=true" else "--crop" for f in flags]
    for args in (["submit", str(image)], ["ingest", str(tmp_path), "--out", "o"]):
        result = bgq_in_process(*args, *flags, env=env)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert f"{option}:" in result.stderr and "Traceback" not in result.stderr


def test_ingest_usage_errors_for_fetch_concurrency(env: dict[str, str], tmp_path: Path) -> None:
    result = bgq_in_process(
        "ingest", str(tmp_path), "--out", "o", "--fetch-concurrency", "0", env=env
    )
    assert result.returncode == 2 and "--fetch-concurrency" in result.stderr


def test_ingest_names_and_uploads_outputs_in_their_format(
    stack: LocalStack, s3_server: S3Server, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(variant("anime-girl-1.jpg", (0, 0, 260, 260)))
    (src / "a.png").write_bytes(variant("anime-girl-1.jpg", (0, 0, 250, 250), "PNG"))
    (src / "b.jpg").write_bytes(variant("car-1.jpg", (0, 0, 260, 200)))
    settings = stack.settings.model_copy(update={"s3_endpoint_url": s3_server.url})
    options = Options(format="jpeg", quality=80, canvas="120x120")
    out = tmp_path / "out"
    assert run_ingest(settings, str(src), str(out), "u2netp", options, 4, None) == 0
    assert sorted(p.name for p in out.glob("*.jpg")) == ["a.jpg.jpg", "a.png.jpg", "b.jpg"]
    assert decoded((out / "b.jpg").read_bytes()).size == (120, 120)
    rows = [json.loads(line) for line in (out / "bgq-report.jsonl").read_text().splitlines()]
    assert {r["status"] for r in rows} == {"done"}

    bucket = s3_server.bucket()
    report = tmp_path / "s3.jsonl"
    webp = Options(format="webp")
    assert run_ingest(settings, str(src), f"s3://{bucket}/cut", "u2netp", webp, 4, report) == 0
    uploaded = s3_server.client().get_object(Bucket=bucket, Key="cut/b.webp")
    assert uploaded["ContentType"] == "image/webp"
    assert decoded(uploaded["Body"].read()).format == "WEBP"


def test_http_client_passes_output_options(base: str) -> None:
    from producer.http_client import HttpClient

    data = variant("car-1.jpg", (5, 5, 205, 155))
    with HttpClient(base, timeout=120) as client:
        result: Any = client.remove(data, format="jpeg", quality=70, bgcolor=(255, 255, 255, 255))
    assert decoded(result).format == "JPEG"
