"""What a request may ask for: rembg's options and how the output is shaped, validated.

Part of the producer-worker contract (`bgq.contract` re-exports `Options`): its canonical form
enters the cache key. Kept free of heavy imports, as the contract is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from bgq import defaults
from bgq.errors import InvalidRequest

Threshold = Annotated[int, Field(ge=0, le=255)]
_BYTE = " *(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9]) *"  # 0-255: no sign, no leading zero
# bgcolor as text (the HTTP API's form): "r,g,b,a"; the same pattern is in the OpenAPI schema.
BGCOLOR_PATTERN = f"^{_BYTE},{_BYTE},{_BYTE},{_BYTE}$"


# Output formats: file extension and content type. WebP keeps alpha; JPEG is flattened; a zip
# holds the colour as a JPEG and the alpha as a PNG (remove.bg's "zip").
FORMATS = {"png": ".png", "webp": ".webp", "jpeg": ".jpg", "zip": ".zip"}
CONTENT_TYPES = {
    "png": "image/png",
    "webp": "image/webp",
    "jpeg": "image/jpeg",
    "zip": "application/zip",
}
Format = Literal["png", "webp", "jpeg", "zip"]
Position = Literal["center", "top", "bottom"]
# A length: "20px", "20" (pixels) or "5%", "2.5%" (of the subject's box, or of the canvas side).
LENGTH_PATTERN = r"^(0|[1-9][0-9]{0,4})(px)?$|^(0|[1-9][0-9]?)(\.[0-9]{1,2})?%$|^100(\.0{1,2})?%$"
JPEG_BACKGROUND = (255, 255, 255, 255)  # what a JPEG is flattened on when no bgcolor is set
CANVAS_PATTERN = r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$"  # "WxH" in pixels
DIGEST_PATTERN = r"^[0-9a-f]{64}$"  # bg_image: the SHA-256 of an input in the store
# Options that bgq's own HTTP API and CLI do not take as fields: bg_image names a stored input,
# which Python callers store first (Producer.put_image) and the remove.bg route uploads.
PYTHON_ONLY = frozenset({"bg_image"})


# What each option must be: the one text of its per-field errors, on every surface.
_BOOL = "must be true or false"
_BYTES = "must be an integer from 0 to 255"
_LENGTH = "must be pixels (such as 20px) or a percentage up to 100 (5%)"
ZIP_HOLDS = "zip holds the subject's colours and alpha"
MUST = {
    "alpha_matting": _BOOL,
    "alpha_matting_foreground_threshold": _BYTES,
    "alpha_matting_background_threshold": _BYTES,
    "alpha_matting_erode_size": "must be an integer from 0 to 1000",
    "only_mask": _BOOL,
    "post_process_mask": _BOOL,
    "bgcolor": "must be r,g,b,a: four integers from 0 to 255",
    "format": "must be png, webp, jpeg or zip",
    "quality": "must be an integer from 1 to 100",
    "crop": _BOOL,
    "crop_margin": _LENGTH,
    "canvas": "must be WIDTHxHEIGHT in pixels, such as 1000x1000",
    "padding": _LENGTH,
    "position": "must be center, top or bottom",
    "bg_image": "must be the SHA-256 of a stored image: 64 lowercase hex digits",
}


@dataclass(frozen=True)
class Terms:
    """How a surface names the options in its errors: the API by field, the CLI by flag."""

    name: Callable[[str], str]  # an option as this surface names it
    given: Callable[[str], str]  # an option turned on, as a rule across options asks for it
    between: str  # what separates an option's name from what is wrong with it


# The HTTP API's (and Python callers') terms: "crop_margin: applies only with crop=true".
FIELD_TERMS = Terms(
    name=str,
    given=lambda field: f"{field}=true" if _is_switch(field) else f"a {field}",
    between=": ",
)


def _is_switch(field: str) -> bool:
    return Options.model_fields[field].annotation is bool


class Conflict(ValueError):
    """A rule across options broken: `template` says how, naming `other` as {given} or {other}."""

    def __init__(self, field: str, template: str, other: str) -> None:
        super().__init__(f"{field}: {template.format(given=other, other=other)}")
        self.field, self.template, self.other = field, template, other

    def describe(self, terms: Terms) -> str:
        said = self.template.format(given=terms.given(self.other), other=terms.name(self.other))
        return f"{terms.name(self.field)}{terms.between}{said}"


def describe(error: ErrorDetails, terms: Terms) -> str:
    """One validation error in a surface's terms: a per-option error says what the option
    must be (MUST, or our validator's own words), a broken rule says which options it joins."""
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, Conflict):
        return cause.describe(terms)
    field = str(error["loc"][0]) if error["loc"] else ""
    text = str(cause) if error["type"] == "value_error" else MUST.get(field, "is not an option")
    return f"{terms.name(field)}{terms.between}{text}"


def parse_length(text: str) -> tuple[float, bool]:
    """(value, is_percent) of a length that matched LENGTH_PATTERN."""
    if text.endswith("%"):
        return float(text[:-1]), True
    return float(text.removesuffix("px")), False


def length_pixels(text: str, whole: int) -> int:
    """A length in pixels: itself, or its percentage of `whole` (rounded)."""
    value, percent = parse_length(text)
    return round(whole * value / 100) if percent else int(value)


def canonical_length(text: str) -> str:
    """One spelling per length, for the cache key: "20px", "5%", "2.5%"; any zero is "0px"."""
    value, percent = parse_length(text)
    return f"{value:g}%" if percent and value else f"{value:g}px"


def parse_canvas(text: str) -> tuple[int, int]:
    """(width, height) of a canvas that matched CANVAS_PATTERN."""
    width, height = text.split("x")
    return int(width), int(height)


class Options(BaseModel):
    """rembg.remove() options bgq supports (defaults are rembg's), and how the output is shaped.

    Without crop, canvas or bg_image and with png, the output is exactly rembg.remove()'s. The
    shaping transforms are documented in docs/output.md.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha_matting: bool = False
    alpha_matting_foreground_threshold: Threshold = 240
    alpha_matting_background_threshold: Threshold = 10
    alpha_matting_erode_size: Annotated[int, Field(ge=0, le=1000)] = 10
    only_mask: bool = False
    post_process_mask: bool = False
    bgcolor: tuple[Threshold, Threshold, Threshold, Threshold] | None = None
    format: Format = "png"
    quality: Annotated[int, Field(ge=1, le=100)] | None = None  # webp and jpeg; png ignores it
    crop: bool = False
    crop_margin: str = "0"
    canvas: str | None = None
    padding: str = "0"
    position: Position = "center"
    bg_image: str | None = None  # an input's digest: the output composited over that image

    @field_validator("alpha_matting", "only_mask", "post_process_mask", "crop", mode="before")
    @classmethod
    def _parse_bool(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("true", "false"):
            raise ValueError(_BOOL)
        return value

    @field_validator("bgcolor", mode="before")
    @classmethod
    def _parse_bgcolor(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not re.fullmatch(BGCOLOR_PATTERN, value):
                raise ValueError(MUST["bgcolor"])
            return tuple(part.strip(" ") for part in value.split(","))
        return value

    @field_validator("canvas")
    @classmethod
    def _check_canvas(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.fullmatch(CANVAS_PATTERN, value):
            raise ValueError(MUST["canvas"])
        if max(parse_canvas(value)) > defaults.CANVAS_MAX_SIDE:
            raise ValueError(f"must have each side at most {defaults.CANVAS_MAX_SIDE} px")
        return value

    @field_validator("bg_image")
    @classmethod
    def _check_digest(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(DIGEST_PATTERN, value):
            raise ValueError(MUST["bg_image"])
        return value

    @field_validator("crop_margin", "padding")
    @classmethod
    def _check_length(cls, value: str) -> str:
        if not re.fullmatch(LENGTH_PATTERN, value):
            raise ValueError(_LENGTH)
        return value

    @model_validator(mode="after")
    def _check_backgrounds(self) -> Options:
        if self.format == "zip":
            if self.bgcolor is not None:
                raise Conflict("format", ZIP_HOLDS + ", not with {given}", "bgcolor")
            if self.bg_image is not None:
                raise Conflict("format", ZIP_HOLDS + ", not with {given}", "bg_image")
            if self.only_mask:
                raise Conflict("format", ZIP_HOLDS + ", not with {given}", "only_mask")
        if self.bg_image is not None:
            if self.bgcolor is not None:
                raise Conflict("bg_image", "sets the background, so not with {given}", "bgcolor")
            if self.only_mask:
                raise Conflict("bg_image", "applies to a cutout, not with {given}", "only_mask")
        return self

    @model_validator(mode="after")
    def _check_combinations(self) -> Options:
        if parse_length(self.crop_margin)[0] and not self.crop:
            raise Conflict("crop_margin", "applies only with {given}", "crop")
        if self.canvas is None:
            if parse_length(self.padding)[0]:
                raise Conflict("padding", "applies only with {given}", "canvas")
            if self.position != "center":
                raise Conflict("position", "applies only with {given}", "canvas")
            return self
        width, height = parse_canvas(self.canvas)
        value, percent = parse_length(self.padding)
        if (value >= 50) if percent else (2 * value >= min(width, height)):
            raise Conflict("padding", "must be under half the {other} side", "canvas")
        return self

    @property
    def shaped(self) -> bool:
        """True when the output is cropped, put on a canvas or on a background image."""
        return self.crop or self.canvas is not None or self.bg_image is not None

    @property
    def effective_quality(self) -> int:
        return self.quality if self.quality is not None else defaults.QUALITY

    @classmethod
    def parse(cls, values: dict[str, Any] | None = None, terms: Terms = FIELD_TERMS) -> Options:
        """Validate user-supplied options; a bad one raises InvalidRequest naming it in `terms`."""
        try:
            return cls(**(values or {}))
        except ValidationError as exc:
            problems = dict.fromkeys(describe(error, terms) for error in exc.errors())
            raise InvalidRequest(f"invalid options: {'; '.join(problems)}") from None

    def canonical(self) -> dict[str, Any]:
        """The options that can change the output, as they enter the cache key.

        rembg ignores the alpha-matting thresholds unless alpha_matting is on, and ignores
        alpha_matting and bgcolor when only_mask is on; leaving those out lets equivalent
        requests share one cache entry.
        Shaping options enter only when they are not the defaults, so a plain PNG keeps the
        key it had before they existed.
        """
        out: dict[str, Any]
        # A JPEG without bgcolor is flattened on white: the same pixels as a white bgcolor.
        bgcolor = self.bgcolor or (JPEG_BACKGROUND if self.format == "jpeg" else None)
        if self.only_mask:
            out = {"only_mask": True, "post_process_mask": self.post_process_mask}
        else:
            out = {
                "alpha_matting": self.alpha_matting,
                "post_process_mask": self.post_process_mask,
                "bgcolor": list(bgcolor) if bgcolor else None,
            }
        if self.alpha_matting and not self.only_mask:
            out["alpha_matting_foreground_threshold"] = self.alpha_matting_foreground_threshold
            out["alpha_matting_background_threshold"] = self.alpha_matting_background_threshold
            out["alpha_matting_erode_size"] = self.alpha_matting_erode_size
        if self.format != "png":
            out["format"] = self.format
            out["quality"] = self.effective_quality
        if self.crop:
            out["crop"] = True
            out["crop_margin"] = canonical_length(self.crop_margin)
        if self.canvas is not None:
            out["canvas"] = self.canvas
            out["padding"] = canonical_length(self.padding)
            out["position"] = self.position
        if self.bg_image is not None:
            out["bg_image"] = self.bg_image
        return out

    def rembg_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for rembg.remove(); a shaped output gets its bgcolor afterwards."""
        return self.model_dump(
            include={
                "alpha_matting",
                "alpha_matting_foreground_threshold",
                "alpha_matting_background_threshold",
                "alpha_matting_erode_size",
                "only_mask",
                "post_process_mask",
            }
        ) | {"bgcolor": None if self.shaped else self.bgcolor}
