"""What a request may ask for: rembg's options and how the output is shaped, validated.

Part of the producer-worker contract (`bgq.contract` re-exports `Options`): its canonical form
enters the cache key. Kept free of heavy imports, as the contract is.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bgq import defaults
from bgq.errors import InvalidRequest

Threshold = Annotated[int, Field(ge=0, le=255)]
_BYTE = " *(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9]) *"  # 0-255: no sign, no leading zero
# bgcolor as text (the HTTP API's form): "r,g,b,a"; the same pattern is in the OpenAPI schema.
BGCOLOR_PATTERN = f"^{_BYTE},{_BYTE},{_BYTE},{_BYTE}$"


# Output formats: file extension and content type. WebP keeps alpha; JPEG is flattened.
FORMATS = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}
CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
Format = Literal["png", "webp", "jpeg"]
Position = Literal["center", "top", "bottom"]
# A length: "20px", "20" (pixels) or "5%", "2.5%" (of the subject's box, or of the canvas side).
LENGTH_PATTERN = r"^(0|[1-9][0-9]{0,4})(px)?$|^(0|[1-9][0-9]?)(\.[0-9]{1,2})?%$|^100(\.0{1,2})?%$"
JPEG_BACKGROUND = (255, 255, 255, 255)  # what a JPEG is flattened on when no bgcolor is set
CANVAS_PATTERN = r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$"  # "WxH" in pixels


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

    Without crop or canvas and with png, the output is exactly rembg.remove()'s. The shaping
    transforms are documented in docs/output.md.
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

    @field_validator("alpha_matting", "only_mask", "post_process_mask", "crop", mode="before")
    @classmethod
    def _parse_bool(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("true", "false"):
            raise ValueError("must be true or false")
        return value

    @field_validator("bgcolor", mode="before")
    @classmethod
    def _parse_bgcolor(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not re.fullmatch(BGCOLOR_PATTERN, value):
                raise ValueError("must be r,g,b,a: four integers from 0 to 255")
            return tuple(part.strip(" ") for part in value.split(","))
        return value

    @field_validator("canvas")
    @classmethod
    def _check_canvas(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.fullmatch(CANVAS_PATTERN, value):
            raise ValueError("must be WIDTHxHEIGHT in pixels, such as 1000x1000")
        if max(parse_canvas(value)) > defaults.CANVAS_MAX_SIDE:
            raise ValueError(f"each side must be at most {defaults.CANVAS_MAX_SIDE} px")
        return value

    @field_validator("crop_margin", "padding")
    @classmethod
    def _check_length(cls, value: str) -> str:
        if not re.fullmatch(LENGTH_PATTERN, value):
            raise ValueError("must be pixels (such as 20px) or a percentage up to 100 (5%)")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Options:
        if parse_length(self.crop_margin)[0] and not self.crop:
            raise ValueError("crop_margin: applies only with crop=true")
        if self.canvas is None:
            if parse_length(self.padding)[0]:
                raise ValueError("padding: applies only with a canvas")
            if self.position != "center":
                raise ValueError("position: applies only with a canvas")
            return self
        width, height = parse_canvas(self.canvas)
        value, percent = parse_length(self.padding)
        if (value >= 50) if percent else (2 * value >= min(width, height)):
            raise ValueError("padding: must be under half the canvas side")
        return self

    @property
    def shaped(self) -> bool:
        """True when the output is cropped or put on a canvas (not rembg's frame)."""
        return self.crop or self.canvas is not None

    @property
    def effective_quality(self) -> int:
        return self.quality if self.quality is not None else defaults.QUALITY

    @classmethod
    def parse(cls, values: dict[str, Any] | None = None) -> Options:
        """Validate user-supplied options; a bad one raises InvalidRequest naming it."""
        try:
            return cls(**(values or {}))
        except ValidationError as exc:
            problems = "; ".join(
                ": ".join(
                    [".".join(str(p) for p in e["loc"])] * bool(e["loc"])
                    + [e["msg"].removeprefix("Value error, ")]
                )
                for e in exc.errors()
            )
            raise InvalidRequest(f"invalid options: {problems}") from None

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
