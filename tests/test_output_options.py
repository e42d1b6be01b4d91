"""Output options (format, quality, crop, canvas, ...) through the API, `bgq submit` and
`bgq ingest`: validation naming the option, names and extensions, content types; and one
shaped result end to end per surface, on real Redis and prefork workers."""

from __future__ import annotations

import inspect
import io
import json
import re
import subprocess
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.s3server import S3Server
from bgq.errors import InvalidRequest
from bgq.options import PYTHON_ONLY, Options
from bgq.settings import settings_env
from bgq.stack import LocalStack
from producer.cli.options import flag_name
from producer.ingest import run_ingest
from tests.helpers import BGQ, JPEG, ApiServer, bgq_in_process, sample_bytes, variant

# Invalid options, each with its error as the API words it (by field) and as the CLI does (by
# flag; None where the CLI's flag parser refuses the value before Options sees it: a switch takes
# no value). Together they break every option and every rule across options (checked below).
INVALID: list[tuple[dict[str, str], str, str | None]] = [
    ({"alpha_matting": "perhaps"}, "alpha_matting: must be true or false", None),
    (
        {"alpha_matting_foreground_threshold": "256"},
        "alpha_matting_foreground_threshold: must be an integer from 0 to 255",
        "--alpha-matting-foreground-threshold must be an integer from 0 to 255",
    ),
    (
        {"alpha_matting_background_threshold": "-1"},
        "alpha_matting_background_threshold: must be an integer from 0 to 255",
        "--alpha-matting-background-threshold must be an integer from 0 to 255",
    ),
    (
        {"alpha_matting_erode_size": "1001"},
        "alpha_matting_erode_size: must be an integer from 0 to 1000",
        "--alpha-matting-erode-size must be an integer from 0 to 1000",
    ),
    ({"only_mask": "yes"}, "only_mask: must be true or false", None),
    ({"post_process_mask": "1"}, "post_process_mask: must be true or false", None),
    (
        {"bgcolor": "1,2,3"},
        "bgcolor: must be r,g,b,a: four integers from 0 to 255",
        "--bgcolor must be r,g,b,a: four integers from 0 to 255",
    ),
    (
        {"format": "gif"},
        "format: must be png, webp, jpeg or zip",
        "--format must be png, webp, jpeg or zip",
    ),
    (
        {"quality": "0"},
        "quality: must be an integer from 1 to 100",
        "--quality must be an integer from 1 to 100",
    ),
    ({"crop": "maybe"}, "crop: must be true or false", None),
    (
        {"crop": "true", "crop_margin": "5cm"},
        "crop_margin: must be one, two (TB LR) or four (T R B L) lengths: pixels (such as 20px) "
        "or percentages up to 100 (5%), separated by single spaces",
        "--crop-margin must be one, two (TB LR) or four (T R B L) lengths: pixels (such as 20px) "
        "or percentages up to 100 (5%), separated by single spaces",
    ),
    (
        {"canvas": "0x10"},
        "canvas: must be WIDTHxHEIGHT in pixels, such as 1000x1000",
        "--canvas must be WIDTHxHEIGHT in pixels, such as 1000x1000",
    ),
    (
        {"canvas": "10000x100"},
        "canvas: must have each side at most 8000 px",
        "--canvas must have each side at most 8000 px",
    ),
    (
        {"canvas": "100x100", "padding": "-5px"},
        "padding: must be pixels (such as 20px) or a percentage up to 100 (5%)",
        "--padding must be pixels (such as 20px) or a percentage up to 100 (5%)",
    ),
    (
        {"canvas": "100x100", "position": "left"},
        "position: must be center, top, bottom, X% or X% Y% (percentages up to 100)",
        "--position must be center, top, bottom, X% or X% Y% (percentages up to 100)",
    ),
    (
        {"roi": "0 0 100%"},
        "roi: must be x1 y1 x2 y2: four lengths, pixels (such as 20px) or percentages up to 100 "
        "(5%), separated by single spaces",
        "--roi must be x1 y1 x2 y2: four lengths, pixels (such as 20px) or percentages up to 100 "
        "(5%), separated by single spaces",
    ),
    (
        {"roi": "50% 0 40% 100%"},
        "roi: must have x2 greater than x1 and y2 greater than y1",
        "--roi must have x2 greater than x1 and y2 greater than y1",
    ),
    (
        {"scale": "5%"},
        "scale: must be original or a percentage from 10% to 100%",
        "--scale must be original or a percentage from 10% to 100%",
    ),
    (
        {"fit_megapixels": "0"},
        "fit_megapixels: must be a number of megapixels over 0 and at most 1000",
        "--fit-megapixels must be a number of megapixels over 0 and at most 1000",
    ),
    # The rules across options.
    (
        {"crop_margin": "5%"},
        "crop_margin: applies only with crop=true",
        "--crop-margin applies only with --crop",
    ),
    (
        {"padding": "5px"},
        "padding: applies only with a canvas",
        "--padding applies only with --canvas",
    ),
    (
        {"position": "top"},
        "position: applies only with a canvas or scale",
        "--position applies only with --canvas or --scale",
    ),
    (
        {"canvas": "100x100", "scale": "50%"},
        "scale: applies only without a canvas (the canvas has padding for that)",
        "--scale applies only without --canvas (the canvas has padding for that)",
    ),
    (
        {"canvas": "100x100", "padding": "50px"},
        "padding: must be under half the canvas side",
        "--padding must be under half the --canvas side",
    ),
    (
        {"format": "zip", "bgcolor": "1,2,3,4"},
        "format: zip holds the subject's colours and alpha, not with a bgcolor",
        "--format zip holds the subject's colours and alpha, not with --bgcolor",
    ),
    (
        {"format": "zip", "only_mask": "true"},
        "format: zip holds the subject's colours and alpha, not with only_mask=true",
        "--format zip holds the subject's colours and alpha, not with --only-mask",
    ),
]
# The options only Python callers set (the API refuses them as unknown fields, the CLI has no
# flag for them), each with its error as Options.parse words it.
DIGEST = "0" * 64
PYTHON_INVALID: list[tuple[dict[str, Any], str]] = [
    (
        {"bg_image": "0" * 63},
        "bg_image: must be the SHA-256 of a stored image: 64 lowercase hex digits",
    ),
    (
        {"format": "zip", "bg_image": DIGEST},
        "format: zip holds the subject's colours and alpha, not with a bg_image",
    ),
    (
        {"bg_image": DIGEST, "bgcolor": "1,2,3,4"},
        "bg_image: sets the background, so not with a bgcolor",
    ),
    (
        {"bg_image": DIGEST, "only_mask": True},
        "bg_image: applies to a cutout, not with only_mask=true",
    ),
]
# The CLI's switches: a bad value for one never reaches Options (`--crop=maybe` is a usage error).
SWITCHES = {name for name, field in Options.model_fields.items() if field.annotation is bool}


def test_the_invalid_options_break_every_option_and_every_rule() -> None:
    broken = {next(iter(error.split(":"))) for _, error, _ in INVALID}
    assert broken == set(Options.model_fields) - PYTHON_ONLY
    assert {error.split(":")[0] for _, error in PYTHON_INVALID} >= PYTHON_ONLY
    on_the_cli = {next(iter(error.split(" "))) for _, _, error in INVALID if error}
    flagged = set(Options.model_fields) - SWITCHES - PYTHON_ONLY
    assert on_the_cli == {flag_name(name) for name in flagged}
    errors = [error for _, error, _ in INVALID] + [error for _, error in PYTHON_INVALID]
    rules = [e for e in errors if "only with" in e or "under half" in e or "not with" in e]
    assert len(rules) == len(re.findall(r"raise Conflict\(", inspect.getsource(Options)))


@pytest.mark.parametrize(("fields", "error"), PYTHON_INVALID)
def test_python_only_options_are_refused_naming_them(fields: dict[str, Any], error: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        Options.parse(fields)
    assert str(refused.value) == f"invalid options: {error}"


@pytest.fixture(scope="module")
def base(stack: LocalStack) -> Iterator[str]:
    server = ApiServer(stack.settings.model_copy(update={"redis_url": stack.url})).start()
    yield server.url
    server.stop()


INTEGERS = {"quality", "alpha_matting_erode_size"} | {
    k for k in Options.model_fields if "threshold" in k
}
NUMBERS = {"fit_megapixels"}


@pytest.mark.parametrize(("fields", "error", "_flag_error"), INVALID)
@pytest.mark.parametrize("where", ["query", "form", "urlencoded", "json"])
def test_api_refuses_invalid_options_naming_the_fields(
    http: httpx.Client, fields: dict[str, str], error: str, _flag_error: str | None, where: str
) -> None:
    data = sample_bytes("car-1.jpg")
    if where == "query":
        answer = http.post("/v1/jobs", params=fields, content=data, headers=JPEG)
    elif where == "form":
        answer = http.post("/v1/jobs", data=fields, files={"file": ("a.jpg", data)})
    elif where == "urlencoded":
        answer = http.post("/v1/jobs", data={"image_url": "http://127.0.0.1/a.jpg", **fields})
    else:
        typed: dict[str, Any] = {
            k: int(v) if k in INTEGERS else float(v) if k in NUMBERS else v
            for k, v in fields.items()
        }
        typed |= {k: True for k, v in fields.items() if v == "true"}
        answer = http.post("/v1/jobs", json={"image_url": "http://127.0.0.1/a.jpg", **typed})
    assert answer.status_code == 422, answer.text
    refusal = answer.json()["error"]
    assert refusal["code"] == "invalid_request", refusal
    switch = next((k for k, v in fields.items() if k in SWITCHES and v != "true"), None)
    if where == "json" and switch:  # JSON's own types are checked first, by field too
        error = f"{switch}: must be a JSON boolean"
    else:
        error = f"invalid options: {error}"
    assert refusal["message"] == error and "--" not in refusal["message"], refusal


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


def test_api_zip_holds_the_pngs_alpha_and_its_colours(http: httpx.Client) -> None:
    data = variant("anime-girl-1.jpg", (0, 0, 320, 300))
    answer = http.post("/v1/remove", params={"format": "zip", "quality": "95"}, content=data)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
        assert archive.namelist() == ["color.jpg", "alpha.png"]
        color, alpha = (decoded(archive.read(name)) for name in archive.namelist())
    png = np.asarray(decoded(http.post("/v1/remove", content=data, headers=JPEG).content))
    assert (color.mode, alpha.mode) == ("RGB", "L")
    assert np.array_equal(np.asarray(alpha), png[..., 3])
    assert np.abs(np.asarray(color).astype(int) - png[..., :3].astype(int)).mean() < 1
    key = answer.headers["x-bgq-job-id"]
    result = http.get(f"/v1/jobs/{key}/result")
    assert result.headers["content-type"] == "application/zip" and result.content == answer.content


@pytest.mark.parametrize("where", ["query", "form", "json"])
def test_api_refuses_bg_image_as_an_unknown_field(http: httpx.Client, where: str) -> None:
    """bg_image names a stored input: bgq's own API has no way to store one (the remove.bg
    route does), so it is not one of its fields, however it is sent."""
    fields = {"bg_image": "0" * 64}
    data = sample_bytes("car-1.jpg")
    if where == "query":
        answer = http.post("/v1/jobs", params=fields, content=data, headers=JPEG)
    elif where == "form":
        answer = http.post("/v1/jobs", data=fields, files={"file": ("a.jpg", data)})
    else:
        answer = http.post("/v1/jobs", json={"image_url": "http://127.0.0.1/a.jpg", **fields})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["message"] == "unknown field(s): bg_image"


def test_openapi_lists_zip_and_not_bg_image(http: httpx.Client) -> None:
    document = http.get("/openapi.json").json()
    remove = document["paths"]["/v1/remove"]["post"]
    params = {p["name"]: p["schema"] for p in remove["parameters"]}
    assert "zip" in params["format"]["enum"] and "bg_image" not in params
    for media in remove["requestBody"]["content"].values():
        assert "bg_image" not in media["schema"].get("properties", {})
    assert "application/zip" in remove["responses"]["200"]["content"]


Box = tuple[int, int, int, int]
Geometry = tuple[tuple[int, int], Box, int]  # size, subject box, pixels the box may be off


def alpha_box(image: Image.Image) -> Box:
    found = image.getchannel("A").getbbox()
    assert found is not None, "no subject"
    return found


def left_half(plain: Image.Image) -> Geometry:
    """roi "0 0 50% 100%": the frame kept, the subject's part right of the middle gone."""
    width, height = plain.size
    return plain.size, alpha_box(plain.crop((0, 0, width // 2, height))), 0


def left_half_cropped(plain: Image.Image) -> Geometry:
    """roi "0 0 50% 100%", then crop: the left half's subject, to its edges."""
    _, (left, top, right, bottom), _ = left_half(plain)
    return (right - left, bottom - top), (0, 0, right - left, bottom - top), 0


def margins_top_right(plain: Image.Image) -> Geometry:
    """crop_margin "20px 5px 0 0" (top, right, bottom, left)."""
    left, top, right, bottom = alpha_box(plain)
    return (right - left + 5, bottom - top + 20), (0, 20, right - left, bottom - top + 20), 0


def original_at_quarters(plain: Image.Image) -> Geometry:
    """scale original at "25% 75%": the subject unscaled, a quarter into the free width and
    three quarters into the free height (floored)."""
    left, top, right, bottom = alpha_box(plain)
    free_x, free_y = plain.width - (right - left), plain.height - (bottom - top)
    x, y = free_x // 4, free_y * 3 // 4
    return plain.size, (x, y, x + right - left, y + bottom - top), 0


def half_bottom_left(plain: Image.Image) -> Geometry:
    """scale 50% at "0% 100%": fitted into half the frame's width and height, bottom left."""
    left, top, right, bottom = alpha_box(plain)
    factor = min(plain.width / 2 / (right - left), plain.height / 2 / (bottom - top))
    width, height = round((right - left) * factor), round((bottom - top) * factor)
    return plain.size, (0, plain.height - height, width, plain.height), 2


def canvas_a_quarter_in(plain: Image.Image) -> Geometry:
    """canvas 100 px wider than the frame at "25% 75%": unscaled, 25 px in, its full height."""
    left, top, right, bottom = alpha_box(plain)
    return (plain.width + 100, plain.height), (left + 25, top, right + 25, bottom), 0


def a_quarter_of_the_pixels(plain: Image.Image) -> Geometry:
    """fit_megapixels of just over a quarter of the frame: each side halved (floored)."""
    width, height = plain.width // 2, plain.height // 2
    left, top, right, bottom = alpha_box(plain)
    return (width, height), (left // 2, top // 2, right // 2, bottom // 2), 3


GEOMETRY = [
    ({"roi": "0 0 50% 100%"}, left_half),
    ({"roi": "0 0 50% 100%", "crop": "true"}, left_half_cropped),
    ({"crop": "true", "crop_margin": "20px 5px 0 0"}, margins_top_right),
    ({"scale": "original", "position": "25% 75%"}, original_at_quarters),
    ({"scale": "50%", "position": "0% 100%"}, half_bottom_left),
    ({"canvas": "576x356", "position": "25% 75%"}, canvas_a_quarter_in),
    ({"fit_megapixels": "0.04237"}, a_quarter_of_the_pixels),
]


@pytest.fixture(scope="module")
def car(base: str) -> tuple[bytes, Image.Image]:
    """A photo new to the cache, its subject clear of the edges, and rembg's cutout of it."""
    data = variant("car-1.jpg", (2, 2, 478, 358))
    answer = httpx.post(f"{base}/v1/remove", content=data, headers=JPEG, timeout=120)
    plain = decoded(answer.content)
    left, top, right, bottom = alpha_box(plain)
    assert left > 0 and top > 20 and right + 5 < plain.width and bottom < plain.height
    return data, plain


@pytest.mark.parametrize(("fields", "expect"), GEOMETRY, ids=[str(f) for f, _ in GEOMETRY])
def test_api_places_the_subject_as_the_new_options_say(
    http: httpx.Client,
    car: tuple[bytes, Image.Image],
    fields: dict[str, str],
    expect: Callable[[Image.Image], Geometry],
) -> None:
    """roi, scale, position, margins and fit on a real photo through a real worker."""
    data, plain = car
    answer = http.post("/v1/remove", params=fields, content=data, headers=JPEG)
    assert answer.status_code == 200, answer.text
    image = decoded(answer.content)
    size, box, slack = expect(plain)
    assert image.size == size
    assert all(abs(got - want) <= slack for got, want in zip(alpha_box(image), box, strict=True)), (
        alpha_box(image),
        box,
    )


def cli_env(stack: LocalStack) -> dict[str, str]:
    settings = stack.settings.model_copy(update={"redis_url": stack.url})
    return {"PATH": "/usr/bin:/bin", **settings_env(settings)}


def is_webp(data: bytes) -> bool:
    return decoded(data).format == "WEBP"


def is_zip(data: bytes) -> bool:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return archive.namelist() == ["color.jpg", "alpha.png"]


@pytest.mark.parametrize(("fmt", "check"), [("webp", is_webp), ("zip", is_zip)])
def test_bgq_submit_writes_the_formats_extension(
    stack: LocalStack, tmp_path: Path, fmt: str, check: Callable[[bytes], bool]
) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(variant("car-1.jpg", (10, 10, 250, 200)))
    args = [BGQ, "submit", str(image), "--format", fmt, "--crop", "--crop-margin", "4px"]
    run = subprocess.run(args, env=cli_env(stack), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = tmp_path / f"a.out.{fmt}"
    assert f"output: {out}" in run.stdout
    assert check(out.read_bytes())


@pytest.mark.parametrize(("fields", "_field_error", "error"), INVALID)
def test_cli_refuses_invalid_options_naming_the_flags(
    env: dict[str, str],
    tmp_path: Path,
    fields: dict[str, str],
    _field_error: str,
    error: str | None,
) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(b"never read")
    flags = [f"{flag_name(k)}={v}" if v != "true" else flag_name(k) for k, v in fields.items()]
    for args in (["submit", str(image)], ["ingest", str(tmp_path), "--out", "o"]):
        result = bgq_in_process(*args, *flags, env=env)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        if error is None:  # a switch given a value: the flag parser's usage error names it
            assert flags[0].split("=")[0] in result.stderr, result.stderr
            continue
        assert f"bgq: invalid options: {error}" in result.stderr, result.stderr
        assert not any(f"{name}:" in result.stderr for name in fields), result.stderr


def test_cli_has_no_bg_image_flag(env: dict[str, str], tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(b"never read")
    result = bgq_in_process("submit", str(image), "--bg-image", "0" * 64, env=env)
    assert result.returncode == 2 and "--bg-image" in result.stderr, result.stderr


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
