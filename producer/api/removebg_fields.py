"""remove.bg's request parameters mapped onto bgq's: pure functions, no I/O.

`mapping` turns one request's parameters (and the names of its uploaded files) into the bgq
fields `Options.parse` takes, where the image and the background come from, and whether the
format was `auto`. What bgq cannot do is refused with a `RemoveBgError` naming the parameter.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import ImageColor

from bgq.lengths import (
    MARGIN_PATTERN,
    canonical_length,
    canonical_margin,
    parse_length,
    parse_margin,
)

FILES = frozenset({"image_file", "bg_image_file"})  # the parameters sent as multipart files
IMAGE_SOURCES = ("image_file", "image_file_b64", "image_url")
BACKGROUND_SOURCES = ("bg_image_url", "bg_image_file")
# Megapixels the output is scaled down to, by `size` (None: the original resolution).
SIZES: dict[str, float | None] = {
    "preview": 0.25,
    "small": 0.25,
    "regular": 0.25,
    "medium": 1.5,
    "hd": 4.0,
    "full": None,
    "4k": None,
    "50MP": None,
    "auto": None,
}
DEFAULT_SIZE = "preview"  # remove.bg's default
FORMATS = {"png": "png", "jpg": "jpeg", "webp": "webp", "zip": "zip"}  # besides auto
# The parameters bgq accepts at remove.bg's default value only, with what it cannot do instead.
DEFAULT_ONLY = {
    "type": (("auto",), "bgq does not classify the foreground; only type=auto"),
    "type_level": (("1", "none"), "bgq does not classify the foreground; only 1 or none"),
    "add_shadow": (("false",), "bgq adds no shadows; only add_shadow=false"),
    "semitransparency": (
        ("true",),
        "only true: bgq has no car-window handling, so it cannot make windows opaque",
    ),
}
# remove.bg's cap on each crop_margin side: 50% of the subject, or 500 pixels.
MARGIN_CAP = {True: 50.0, False: 500.0}
# remove.bg's error code for a bad value of each parameter (invalid_parameters otherwise).
CODES = {
    "size": "invalid_size",
    "format": "invalid_format",
    "channels": "invalid_channels",
    "bg_color": "invalid_bg_color",
    "crop_margin": "invalid_crop_margin",
    "position": "invalid_position",
    "roi": "invalid_roi",
    "scale": "invalid_scale",
    "image_url": "invalid_image_url",
    "image_file_b64": "failed_to_read_image",
    "image_file": "failed_to_read_image",
    "bg_image_url": "failed_bg_download",
    "bg_image_file": "failed_to_read_image",
}
# bgq's option names in remove.bg's terms (for the titles of bgq's own refusals).
NAMES = {
    "bgcolor": "bg_color",
    "only_mask": "channels",
    "fit_megapixels": "size",
    "bg_image": "bg_image_url/bg_image_file",
}
SHADOW_ONLY = ("shadow_type", "shadow_opacity")  # refused whenever sent: bgq adds no shadows
PASSED = ("crop", "crop_margin", "roi")  # the same name in bgq's options
PARAMETERS = frozenset(
    [
        *IMAGE_SOURCES,
        *BACKGROUND_SOURCES,
        *DEFAULT_ONLY,
        *SHADOW_ONLY,
        *PASSED,
        "size",
        "format",
        "channels",
        "bg_color",
        "scale",
        "position",
    ]
)
ONE_SOURCE = "send exactly one of image_file, image_file_b64 and image_url"
SCALED_ORIGINAL = "original cannot go with a scale: bgq centres a scaled subject"
ONE_BACKGROUND = "send at most one of bg_image_url, bg_image_file and bg_color"
PATHS = ("/v1.0/removebg", "/api/removebg")  # where remove.bg's clients post
HEX_COLOR = re.compile(r"#?([0-9a-fA-F]{3,4}|[0-9a-fA-F]{6}|[0-9a-fA-F]{8})")


class RemoveBgError(Exception):
    """A request refused in remove.bg's terms: its status, title and code."""

    def __init__(self, title: str, code: str = "invalid_parameters", status: int = 400) -> None:
        super().__init__(title)
        self.title, self.code, self.status = title, code, status


def invalid(name: str, why: str) -> RemoveBgError:
    """A bad value of remove.bg's parameter `name`, with its code."""
    return RemoveBgError(f"{name}: {why}", CODES.get(name, "invalid_parameters"))


def error_body(title: str, code: str) -> dict[str, Any]:
    """remove.bg's error shape."""
    return {"errors": [{"title": title, "code": code}]}


@dataclass(frozen=True)
class Source:
    """Where an image comes from: an uploaded file, base64 bytes, or a URL."""

    kind: str  # file | b64 | url
    url: str | None = None
    data: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Mapped:
    """One remove.bg request in bgq's terms."""

    fields: dict[str, str]  # for Options.parse (bg_image comes once the background is stored)
    image: Source
    background: Source | None = None
    auto_format: bool = False
    classify: bool = True  # False for type_level=none: the answer has no X-Type


def mapping(params: dict[str, str], files: frozenset[str] = frozenset()) -> Mapped:
    """The bgq fields and sources of remove.bg's `params` (an empty source counts as absent)."""
    unknown = sorted((set(params) | files) - PARAMETERS)
    if unknown:
        raise RemoveBgError(f"unknown parameter(s): {', '.join(unknown)}", "unknown_parameters")
    sources = (*IMAGE_SOURCES, *BACKGROUND_SOURCES)
    given = {k: v for k, v in params.items() if not (k in sources and v == "")}
    refuse_unsupported(given)
    background = background_source(given, files)
    fields = size_fields(given.get("size", DEFAULT_SIZE))
    fields |= crop_fields(given)
    if "roi" in given:
        fields["roi"] = given["roi"]
    fields |= placement_fields(given.get("scale", "original"), given.get("position"))
    if given.get("channels", "rgba") not in ("rgba", "alpha"):
        raise invalid("channels", "must be rgba or alpha")
    if given.get("channels") == "alpha":
        fields["only_mask"] = "true"
    if "bg_color" in given:
        fields["bgcolor"] = bgcolor(given["bg_color"])
        if background is not None:
            raise RemoveBgError(ONE_BACKGROUND, "multiple_bg_sources")
    fmt = given.get("format", "auto")
    if fmt != "auto" and fmt not in FORMATS:
        raise invalid("format", "must be auto, png, jpg, webp or zip")
    fields |= format_fields(fmt, fields, background is not None)
    classify = given.get("type_level") != "none"
    return Mapped(fields, image_source(given, files), background, fmt == "auto", classify)


def refuse_unsupported(given: dict[str, str]) -> None:
    """What bgq cannot do, refused with a title naming the parameter."""
    for name, (allowed, why) in DEFAULT_ONLY.items():
        if given.get(name, allowed[0]) not in allowed:
            raise RemoveBgError(f"{name}: {why}", "unsupported_parameter")
    for name in SHADOW_ONLY:
        if name in given:
            raise RemoveBgError(f"{name}: bgq adds no shadows", "unsupported_parameter")


def crop_fields(given: dict[str, str]) -> dict[str, str]:
    """crop, and crop_margin (validated, each side capped at 50% or 500px) only with crop=true:
    remove.bg's crop_margin has no effect otherwise."""
    crop = given.get("crop", "false")
    if crop not in ("true", "false"):
        raise invalid("crop", "must be true or false")
    fields = {"crop": crop} if "crop" in given else {}
    if "crop_margin" not in given:
        return fields
    margin = given["crop_margin"]
    if not re.fullmatch(MARGIN_PATTERN, margin):
        raise invalid("crop_margin", "must be one, two or four lengths (20px or 10%)")
    if crop == "true":
        fields["crop_margin"] = canonical_margin(" ".join(map(capped, parse_margin(margin))))
    return fields


def capped(side: str) -> str:
    """A crop_margin side at most remove.bg's cap: 50% of the subject, or 500 pixels."""
    value, percent = parse_length(side)
    if value <= MARGIN_CAP[percent]:
        return canonical_length(side)
    return f"{MARGIN_CAP[percent]:g}{'%' if percent else 'px'}"


def image_source(given: dict[str, str], files: frozenset[str]) -> Source:
    """Exactly one of image_file, image_file_b64 and image_url."""
    sent = [name for name in IMAGE_SOURCES if name in given or name in files]
    if len(sent) != 1:
        raise RemoveBgError(ONE_SOURCE, "missing_source" if not sent else "multiple_sources")
    if "image_file" in given:
        raise invalid("image_file", "must be a file (multipart), or use image_file_b64")
    if sent[0] == "image_url":
        return Source("url", url=given["image_url"])
    if sent[0] == "image_file_b64":
        return Source("b64", data=decode_b64(given["image_file_b64"]))
    return Source("file")


def background_source(given: dict[str, str], files: frozenset[str]) -> Source | None:
    """At most one of bg_image_url and bg_image_file."""
    sent = [name for name in BACKGROUND_SOURCES if name in given or name in files]
    if len(sent) > 1:
        raise RemoveBgError(ONE_BACKGROUND, "multiple_bg_sources")
    if "bg_image_file" in given:
        raise invalid("bg_image_file", "must be a file (multipart)")
    if not sent:
        return None
    return Source("url", url=given["bg_image_url"]) if sent[0] == "bg_image_url" else Source("file")


def decode_b64(text: str) -> bytes:
    """image_file_b64's bytes (standard base64; whitespace ignored)."""
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise invalid("image_file_b64", "not valid base64") from None


def size_fields(size: str) -> dict[str, str]:
    """`size` as bgq's fit_megapixels (none for the original resolution)."""
    if size not in SIZES:
        raise invalid("size", f"must be one of {', '.join(SIZES)}")
    megapixels = SIZES[size]
    return {} if megapixels is None else {"fit_megapixels": f"{megapixels:g}"}


def placement_fields(scale: str, position: str | None) -> dict[str, str]:
    """scale and position: without a scale, a position moves the subject at its own size; a
    scaled subject is centred when position is absent (bgq cannot keep its place)."""
    if scale == "original":
        return {} if position in (None, "original") else {"scale": "original", "position": position}
    if position is None:
        return {"scale": scale}  # bgq centres a scaled subject, as remove.bg does
    if position == "original":
        raise invalid("position", SCALED_ORIGINAL)
    return {"scale": scale, "position": position}


def bgcolor(text: str) -> str:
    """bg_color (hex of 3, 4, 6 or 8 digits, with or without '#', or a CSS colour name) as
    bgq's "r,g,b,a"."""
    if HEX_COLOR.fullmatch(text):
        digits = text.removeprefix("#")
        if len(digits) in (3, 4):
            digits = "".join(d * 2 for d in digits)
        channels = [int(digits[i : i + 2], 16) for i in range(0, len(digits), 2)]
    elif text.lower() in ImageColor.colormap:
        channels = list(ImageColor.getrgb(text.lower()))
    else:
        raise invalid("bg_color", "must be a hex colour (81d4fa, #fff) or a colour name")
    if len(channels) == 3:
        channels.append(255)
    return ",".join(str(c) for c in channels)


def format_fields(fmt: str, fields: dict[str, str], background: bool) -> dict[str, str]:
    """The bgq format: auto is jpeg when the result is opaque (an opaque bg_color or a
    background image, not a mask), else png."""
    if fmt == "auto":
        opaque = background or fields.get("bgcolor", "").endswith(",255")
        fmt = "jpg" if opaque and "only_mask" not in fields else "png"
    return {} if fmt == "png" else {"format": FORMATS[fmt]}
