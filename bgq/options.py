"""What a request may ask for: rembg's options and how the output is shaped, validated.

Part of the producer-worker contract (`bgq.contract` re-exports `Options`): its canonical form
enters the cache key. Kept free of heavy imports, as the contract is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from bgq import defaults
from bgq.errors import InvalidRequest
from bgq.lengths import (
    CANVAS_PATTERN,
    LENGTH_PATTERN,
    MARGIN_PATTERN,
    NUMBER_PATTERN,
    POSITION_PATTERN,
    ROI_PATTERN,
    SCALE_PATTERN,
    canonical_length,
    canonical_margin,
    canonical_position,
    canonical_roi,
    canonical_scale,
    is_whole_image,
    never_after,
    parse_canvas,
    parse_length,
    parse_margin,
    parse_roi,
)

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
JPEG_BACKGROUND = (255, 255, 255, 255)  # what a JPEG is flattened on when no bgcolor is set
ROI_ORDER = "must have x2 greater than x1 and y2 greater than y1"  # roi's corners, in one unit
DIGEST_PATTERN = r"^[0-9a-f]{64}$"  # bg_image: the SHA-256 of an input in the store
# Options that bgq's own HTTP API and CLI do not take as fields: bg_image names a stored input,
# which Python callers store first (Producer.put_image) and the remove.bg route uploads.
PYTHON_ONLY = frozenset({"bg_image"})


# The options passed to rembg.remove() as they are (bgcolor aside: shaped outputs get it later).
REMBG_FIELDS = frozenset(
    {
        "alpha_matting",
        "alpha_matting_foreground_threshold",
        "alpha_matting_background_threshold",
        "alpha_matting_erode_size",
        "only_mask",
        "post_process_mask",
    }
)

# What each option must be: the one text of its per-field errors, on every surface.
_BOOL = "must be true or false"
_BYTES = "must be an integer from 0 to 255"
_LENGTH = "must be pixels (such as 20px) or a percentage up to 100 (5%)"
ZIP_HOLDS = "zip holds the subject's colours and alpha"
QUALITY_RANGE = (1, 100)  # the lowest and highest quality a request may ask for
MUST = {
    "alpha_matting": _BOOL,
    "alpha_matting_foreground_threshold": _BYTES,
    "alpha_matting_background_threshold": _BYTES,
    "alpha_matting_erode_size": "must be an integer from 0 to 1000",
    "only_mask": _BOOL,
    "post_process_mask": _BOOL,
    "bgcolor": "must be r,g,b,a: four integers from 0 to 255",
    "format": "must be png, webp, jpeg or zip",
    "quality": f"must be an integer from {QUALITY_RANGE[0]} to {QUALITY_RANGE[1]}",
    "crop": _BOOL,
    "crop_margin": "must be one, two (TB LR) or four (T R B L) lengths: pixels (such as 20px) "
    "or percentages up to 100 (5%), separated by single spaces",
    "canvas": "must be WIDTHxHEIGHT in pixels, such as 1000x1000",
    "padding": _LENGTH,
    "position": "must be center, top, bottom, X% or X% Y% (percentages up to 100)",
    "roi": "must be x1 y1 x2 y2: four lengths, pixels (such as 20px) or percentages up to 100 "
    "(5%), separated by single spaces",
    "scale": "must be original or a percentage from 10% to 100%",
    "fit_megapixels": "must be a number of megapixels over 0 and at most "
    f"{defaults.FIT_MAX_MEGAPIXELS}",
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
    """A rule across options broken: `template` says how, naming `other` as {given} or {other}
    (and a third option, `also`, as {also})."""

    def __init__(self, field: str, template: str, other: str, also: str = "") -> None:
        super().__init__(f"{field}: {template.format(given=other, other=other, also=also)}")
        self.field, self.template, self.other, self.also = field, template, other, also

    def describe(self, terms: Terms) -> str:
        said = self.template.format(
            given=terms.given(self.other), other=terms.name(self.other), also=terms.name(self.also)
        )
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


class Options(BaseModel):
    """rembg.remove() options bgq supports (defaults are rembg's), and how the output is shaped.

    Without a shaping option (roi, crop, canvas, scale, fit_megapixels, bg_image) and with png,
    the output is exactly rembg.remove()'s. The shaping transforms are documented in
    docs/output.md.
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
    # webp, jpeg and zip; png ignores it
    quality: Annotated[int, Field(ge=QUALITY_RANGE[0], le=QUALITY_RANGE[1])] | None = None
    crop: bool = False
    crop_margin: str = "0"
    canvas: str | None = None
    padding: str = "0"
    position: str = "center"
    roi: str | None = None
    scale: str | None = None
    fit_megapixels: Annotated[float, Field(gt=0, le=defaults.FIT_MAX_MEGAPIXELS)] | None = None
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

    @field_validator("padding")
    @classmethod
    def _check_length(cls, value: str) -> str:
        if not re.fullmatch(LENGTH_PATTERN, value):
            raise ValueError(_LENGTH)
        return value

    @field_validator("crop_margin", "position", "scale")
    @classmethod
    def _check_pattern(cls, value: str | None, info: ValidationInfo) -> str | None:
        pattern = {
            "crop_margin": MARGIN_PATTERN,
            "position": POSITION_PATTERN,
            "scale": SCALE_PATTERN,
        }[str(info.field_name)]
        if value is not None and not re.fullmatch(pattern, value):
            raise ValueError(MUST[str(info.field_name)])
        return value

    @field_validator("roi")
    @classmethod
    def _check_roi(cls, value: str | None) -> str | None:
        """A valid roi; None for one that is surely the whole image (no roi at all)."""
        if value is None:
            return None
        if not re.fullmatch(ROI_PATTERN, value):
            raise ValueError(MUST["roi"])
        x1, y1, x2, y2 = parse_roi(value)
        if never_after(x1, x2) or never_after(y1, y2):
            raise ValueError(ROI_ORDER)
        return None if is_whole_image(value) else value

    @field_validator("fit_megapixels", mode="before")
    @classmethod
    def _parse_number(cls, value: Any) -> Any:
        if isinstance(value, bool) or (
            isinstance(value, str) and not re.fullmatch(NUMBER_PATTERN, value)
        ):
            raise ValueError(MUST["fit_megapixels"])
        return value

    @field_validator("fit_megapixels")
    @classmethod
    def _round_megapixels(cls, value: float | None) -> float | None:
        """Six significant digits, as the cache key has them (one key, one output), cut and
        never rounded up: the output stays within the limit asked for."""
        if value is None:
            return None
        exact = Decimal(repr(value))  # the shortest decimal that is this float
        return float(exact.quantize(Decimal(1).scaleb(exact.adjusted() - 5), ROUND_DOWN))

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
        if any(parse_length(side)[0] for side in parse_margin(self.crop_margin)) and not self.crop:
            raise Conflict("crop_margin", "applies only with {given}", "crop")
        if self.scale is not None and self.canvas is not None:
            raise Conflict(
                "scale", "applies only without {given} (the canvas has padding for that)", "canvas"
            )
        if self.canvas is None:
            if parse_length(self.padding)[0]:
                raise Conflict("padding", "applies only with {given}", "canvas")
            if self.scale is None and canonical_position(self.position) != "center":
                raise Conflict("position", "applies only with {given} or {also}", "canvas", "scale")
            return self
        width, height = parse_canvas(self.canvas)
        value, percent = parse_length(self.padding)
        if (value >= 50) if percent else (2 * value >= min(width, height)):
            raise Conflict("padding", "must be under half the {other} side", "canvas")
        return self

    @property
    def shaped(self) -> bool:
        """True when the output is shaped after rembg: a roi, crop, canvas, scale, fit or a
        background image."""
        transforms = (self.roi, self.canvas, self.scale, self.fit_megapixels, self.bg_image)
        return self.crop or any(value is not None for value in transforms)

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
        return out | self._canonical_layout()

    def _canonical_layout(self) -> dict[str, Any]:
        """Where the subject goes, as it enters the cache key: each option not at its default."""
        out: dict[str, Any] = {}
        if self.roi is not None:
            out["roi"] = canonical_roi(self.roi)
        if self.crop:
            out["crop"] = True
            out["crop_margin"] = canonical_margin(self.crop_margin)
        if self.canvas is not None:
            out["canvas"] = self.canvas
            out["padding"] = canonical_length(self.padding)
        if self.scale is not None:
            out["scale"] = canonical_scale(self.scale)
        if self.canvas is not None or self.scale is not None:
            out["position"] = canonical_position(self.position)
        if self.fit_megapixels is not None:
            out["fit_megapixels"] = self.fit_megapixels
        if self.bg_image is not None:
            out["bg_image"] = self.bg_image
        return out

    def rembg_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for rembg.remove(); a shaped output gets its bgcolor afterwards."""
        return self.model_dump(include=set(REMBG_FIELDS)) | {
            "bgcolor": None if self.shaped else self.bgcolor
        }
