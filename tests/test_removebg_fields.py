"""remove.bg's parameters mapped onto bgq's (pure functions), the titles and codes of bgq's own
refusals in remove.bg's terms, and its X-RateLimit-* fields."""

from __future__ import annotations

import ast
import base64
import time
from pathlib import Path

import pytest

from producer.api.removebg import fetch_terms, in_remove_bg_terms, rate_headers
from producer.api.removebg_fields import RemoveBgError, bgcolor, mapping

FILE = frozenset({"image_file"})
URL = "http://images.example/a.jpg"


@pytest.mark.parametrize(
    ("params", "files", "fields"),
    [
        ({"size": "auto"}, FILE, {}),
        ({"size": "full", "format": "png", "channels": "rgba"}, FILE, {}),
        ({}, FILE, {"fit_megapixels": "0.25"}),  # remove.bg's default size: preview
        ({"size": "regular"}, FILE, {"fit_megapixels": "0.25"}),
        ({"size": "medium"}, FILE, {"fit_megapixels": "1.5"}),
        ({"size": "hd"}, FILE, {"fit_megapixels": "4"}),
        ({"size": "4k", "format": "jpg"}, FILE, {"format": "jpeg"}),
        ({"size": "50MP", "format": "webp"}, FILE, {"format": "webp"}),
        ({"size": "auto", "format": "zip"}, FILE, {"format": "zip"}),
        ({"size": "auto", "channels": "alpha"}, FILE, {"only_mask": "true"}),
        (
            {"size": "auto", "bg_color": "81d4fa"},
            FILE,
            {"bgcolor": "129,212,250,255", "format": "jpeg"},
        ),
        ({"size": "auto", "bg_color": "#ff000080"}, FILE, {"bgcolor": "255,0,0,128"}),
        ({"size": "auto", "bg_color": "red", "format": "png"}, FILE, {"bgcolor": "255,0,0,255"}),
        (
            {"size": "auto", "channels": "alpha", "bg_color": "fff"},
            FILE,
            {"only_mask": "true", "bgcolor": "255,255,255,255"},
        ),
        (
            {"size": "auto", "crop": "true", "crop_margin": "10%"},
            FILE,
            {"crop": "true", "crop_margin": "10%"},
        ),
        (
            {"size": "auto", "crop": "true", "crop_margin": "10px 20px"},
            FILE,
            {"crop": "true", "crop_margin": "10px 20px 10px 20px"},
        ),
        ({"size": "auto", "roi": "0% 0% 50% 50%"}, FILE, {"roi": "0% 0% 50% 50%"}),
        ({"size": "auto", "scale": "original"}, FILE, {}),
        ({"size": "auto", "scale": "80%"}, FILE, {"scale": "80%"}),
        (
            {"size": "auto", "scale": "80%", "position": "center"},
            FILE,
            {"scale": "80%", "position": "center"},
        ),
        (
            {"size": "auto", "position": "20% 70%"},
            FILE,
            {"scale": "original", "position": "20% 70%"},
        ),
        (
            {
                "size": "auto",
                "type": "auto",
                "type_level": "1",
                "add_shadow": "false",
                "semitransparency": "true",
            },
            FILE,
            {},
        ),
        ({"size": "auto", "bg_image_url": URL}, FILE, {"format": "jpeg"}),
        # Empty sources are absent (remove.bg: "must be empty" beside another source).
        ({"size": "auto", "image_url": "", "bg_image_url": ""}, FILE, {}),
        ({"size": "auto", "type_level": "none"}, FILE, {}),
        # crop_margin only with crop=true (validated, then dropped); each side capped.
        ({"size": "auto", "crop_margin": "10px"}, FILE, {}),
        ({"size": "auto", "crop": "false", "crop_margin": "10%"}, FILE, {"crop": "false"}),
        (
            {"size": "auto", "crop": "true", "crop_margin": "80% 600px 50% 501"},
            FILE,
            {"crop": "true", "crop_margin": "50% 500px 50% 500px"},
        ),
        ({"size": "auto", "format": "png"}, FILE | {"bg_image_file"}, {}),
    ],
)
def test_mapping_to_bgq_fields(
    params: dict[str, str], files: frozenset[str], fields: dict[str, str]
) -> None:
    assert mapping(params, files).fields == fields


def test_mapping_names_the_sources() -> None:
    by_url = mapping({"image_url": URL, "bg_image_url": URL + "?bg"})
    assert by_url.image.kind == "url" and by_url.image.url == URL
    assert by_url.background is not None and by_url.background.url == URL + "?bg"
    by_b64 = mapping({"image_file_b64": base64.b64encode(b"\x89PNG...").decode()})
    assert by_b64.image.kind == "b64" and by_b64.image.data == b"\x89PNG..."
    by_file = mapping({"format": "png"}, frozenset({"image_file", "bg_image_file"}))
    assert by_file.image.kind == "file" and by_file.background is not None
    assert by_file.background.kind == "file" and not by_file.auto_format


@pytest.mark.parametrize(
    ("params", "files", "title", "code"),
    [
        ({}, frozenset(), "exactly one of image_file", "missing_source"),
        ({"image_url": URL}, FILE, "exactly one of image_file", "multiple_sources"),
        (
            {"image_url": URL, "image_file_b64": "aGk="},
            frozenset(),
            "exactly one",
            "multiple_sources",
        ),
        ({"image_file": "x"}, frozenset(), "image_file: must be a file", "failed_to_read_image"),
        ({"image_file_b64": "not base64!"}, frozenset(), "image_file_b64", "failed_to_read_image"),
        (
            {"bg_image_url": URL},
            FILE | {"bg_image_file"},
            "at most one of bg_image",
            "multiple_bg_sources",
        ),
        (
            {"colour": "red", "zize": "auto"},
            FILE,
            "unknown parameter(s): colour, zize",
            "unknown_parameters",
        ),
        ({"type": "person"}, FILE, "type: bgq does not classify", "unsupported_parameter"),
        ({"type": "anything"}, FILE, "type: bgq does not classify", "unsupported_parameter"),
        ({"type_level": "latest"}, FILE, "type_level", "unsupported_parameter"),
        ({"add_shadow": "true"}, FILE, "add_shadow: bgq adds no shadows", "unsupported_parameter"),
        (
            {"shadow_type": "drop"},
            FILE,
            "shadow_type: bgq adds no shadows",
            "unsupported_parameter",
        ),
        ({"shadow_opacity": "50"}, FILE, "shadow_opacity", "unsupported_parameter"),
        ({"semitransparency": "false"}, FILE, "no car-window handling", "unsupported_parameter"),
        ({"size": "huge"}, FILE, "size: must be one of", "invalid_size"),
        ({"format": "gif"}, FILE, "format: must be auto, png, jpg, webp or zip", "invalid_format"),
        ({"channels": "rgb"}, FILE, "channels: must be rgba or alpha", "invalid_channels"),
        ({"bg_color": "notacolour"}, FILE, "bg_color: must be a hex colour", "invalid_bg_color"),
        ({"bg_color": "#12345"}, FILE, "bg_color", "invalid_bg_color"),
        ({"bg_color": ""}, FILE, "bg_color", "invalid_bg_color"),
        ({"crop": "yes"}, FILE, "crop: must be true or false", "invalid_parameters"),
        ({"crop_margin": "10 px"}, FILE, "crop_margin: must be", "invalid_crop_margin"),
        ({"crop": "true", "crop_margin": "-5%"}, FILE, "crop_margin", "invalid_crop_margin"),
        (
            {"scale": "80%", "position": "original"},
            FILE,
            "position: original cannot go with a scale",
            "invalid_position",
        ),
        ({"bg_color": "red", "bg_image_url": URL}, FILE, "bg_color", "multiple_bg_sources"),
        ({"bg_color": "red"}, FILE | {"bg_image_file"}, "bg_color", "multiple_bg_sources"),
        ({"image_url": "", "image_file_b64": ""}, frozenset(), "exactly one", "missing_source"),
    ],
)
def test_mapping_refuses_with_remove_bg_titles(
    params: dict[str, str], files: frozenset[str], title: str, code: str
) -> None:
    """Refused with remove.bg's code for the parameter and a title naming it."""
    with pytest.raises(RemoveBgError) as refused:
        mapping(params, files)
    assert title in refused.value.title and refused.value.code == code
    assert refused.value.status == 400


@pytest.mark.parametrize(
    ("text", "rgba"),
    [
        ("fff", "255,255,255,255"),
        ("#000", "0,0,0,255"),
        ("0f08", "0,255,0,136"),
        ("#81D4FA", "129,212,250,255"),
        ("81d4fa7f", "129,212,250,127"),
        ("white", "255,255,255,255"),
        ("RebeccaPurple", "102,51,153,255"),
    ],
)
def test_bg_color_hex_and_names(text: str, rgba: str) -> None:
    assert bgcolor(text) == rgba


def test_type_level_none_asks_for_no_x_type() -> None:
    assert mapping({"type_level": "none"}, FILE).classify is False
    assert mapping({"type_level": "1"}, FILE).classify is True
    assert mapping({}, FILE).classify is True


def test_an_empty_source_beside_another_is_absent() -> None:
    mapped = mapping({"image_url": "", "image_file_b64": base64.b64encode(b"hi").decode()})
    assert mapped.image.kind == "b64" and mapped.background is None


@pytest.mark.parametrize(
    ("message", "title", "code"),
    [
        ("bgcolor: must be r,g,b,a", "bg_color: must be r,g,b,a", "invalid_bg_color"),
        ("invalid options: roi: must be x1 y1", "roi: must be x1 y1", "invalid_roi"),
        ("scale: must be 10% to 100%", "scale: must be 10% to 100%", "invalid_scale"),
        ("position: must be center", "position: must be center", "invalid_position"),
        ("crop: must be a JSON boolean", "crop: must be a JSON boolean", "invalid_parameters"),
        ("image_url: not http(s)", "image_url: not http(s)", "invalid_image_url"),
        ("fit_megapixels: too small", "size: too small", "invalid_size"),
        ("unknown field(s): colour", "unknown field(s): colour", "invalid_parameters"),
        ("malformed JSON body", "malformed JSON body", "invalid_parameters"),
    ],
)
def test_bgq_refusals_in_remove_bg_terms(message: str, title: str, code: str) -> None:
    assert in_remove_bg_terms(message) == (title, code)


@pytest.mark.parametrize(
    ("headers", "limit", "remaining", "reset"),
    [
        (
            {
                "RateLimit-Policy": '"interactive-rpm";q=5;w=60',
                "RateLimit": '"interactive-rpm";r=4;t=30',
            },
            "5",
            "4",
            30,
        ),
        (
            {
                "RateLimit-Policy": '"interactive-jobs";q=2;qu="concurrent-requests"',
                "RateLimit": '"interactive-jobs";r=0',
                "Retry-After": "7",
            },
            "2",
            "0",
            7,
        ),
        (
            {
                "RateLimit-Policy": '"interactive-jobs";q=3;qu="concurrent-requests"',
                "RateLimit": '"interactive-jobs";r=2',
            },
            "3",
            "2",
            0,
        ),
        (  # both limits, the jobs one used up: the fields describe the one that refused
            {
                "RateLimit-Policy": '"interactive-rpm";q=60;w=60, '
                '"interactive-jobs";q=2;qu="concurrent-requests"',
                "RateLimit": '"interactive-rpm";r=59;t=60, "interactive-jobs";r=0',
                "Retry-After": "4",
            },
            "2",
            "0",
            4,
        ),
    ],
)
def test_x_ratelimit_fields_for_a_rate_or_a_jobs_limit(
    headers: dict[str, str], limit: str, remaining: str, reset: int
) -> None:
    """A jobs-only limit gives them too: Limit its quota, Reset when Retry-After says."""
    fields = rate_headers(headers)
    assert (fields["X-RateLimit-Limit"], fields["X-RateLimit-Remaining"]) == (limit, remaining)
    now = int(fields["X-RateLimit-Reset"]) - reset
    assert abs(now - time.time()) < 5
    assert rate_headers({}) == {}


def test_the_body_limit_imports_no_route_module() -> None:
    """BodyLimit takes its per-path answers from create_app; it knows no route."""
    tree = ast.parse(Path("producer/api/limits.py").read_text())
    imported = {
        node.module or ""
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("producer")
    }
    assert imported == {"producer.api.errors"}


@pytest.mark.parametrize(
    ("name", "message", "title", "code"),
    [
        (
            "image_url",
            "cannot fetch image_url (bad_url): only http",
            "image_url: cannot fetch (bad_url): only http",
            "invalid_image_url",
        ),
        (
            "image_url",
            "cannot fetch image_url (timeout): slow",
            "image_url: cannot fetch (timeout): slow",
            "failed_image_download",
        ),
        (
            "bg_image_url",
            "cannot fetch image_url (status): 404",
            "bg_image_url: cannot fetch (status): 404",
            "failed_bg_download",
        ),
    ],
)
def test_failed_fetches_in_remove_bg_terms(name: str, message: str, title: str, code: str) -> None:
    assert fetch_terms(name, message) == (title, code)
