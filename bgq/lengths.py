"""The shaping options' values as requests write them: lengths, margins, rectangles, scales,
positions and canvases; their patterns (also the OpenAPI schema's), parsing, one spelling each."""

from __future__ import annotations

# A percentage from 0 to 100, up to two decimals: "5%", "2.5%", "100%".
_PERCENT = r"(0|[1-9][0-9]?)(\.[0-9]{1,2})?%|100(\.0{1,2})?%"
# A length: "20px", "20" (pixels) or a _PERCENT (of the subject's box, or of the canvas side).
_LEN = rf"(0|[1-9][0-9]{{0,4}})(px)?|{_PERCENT}"
LENGTH_PATTERN = rf"^({_LEN})$"
# crop_margin: one length, "TB LR" or "T R B L" (CSS order), separated by single spaces.
MARGIN_PATTERN = rf"^({_LEN})( ({_LEN})( ({_LEN}) ({_LEN}))?)?$"
# roi: "x1 y1 x2 y2", four lengths (a % is of the image's width for x, of its height for y).
ROI_PATTERN = rf"^({_LEN}) ({_LEN}) ({_LEN}) ({_LEN})$"
# scale: "original" or a percentage of the frame from 10% to 100%.
SCALE_PATTERN = r"^original$|^[1-9][0-9](\.[0-9]{1,2})?%$|^100(\.0{1,2})?%$"
# position: a keyword, "X%" (both axes) or "X% Y%": where the subject sits in the free space.
POSITION_PATTERN = rf"^(center|top|bottom)$|^({_PERCENT})( ({_PERCENT}))?$"
POSITIONS = {"center": (5000, 5000), "top": (5000, 0), "bottom": (5000, 10000)}  # 1/100 of a %
CANVAS_PATTERN = r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$"  # "WxH" in pixels
# A plain decimal number as text ("0.25", "2", "1e-05"): no sign, no "_", "inf" or "nan".
NUMBER_PATTERN = r"^[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?$|^\.[0-9]+([eE][-+]?[0-9]+)?$"


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


def parse_margin(text: str) -> tuple[str, str, str, str]:
    """(top, right, bottom, left) of a crop_margin that matched MARGIN_PATTERN (CSS order)."""
    parts = text.split(" ")
    if len(parts) == 1:
        return parts[0], parts[0], parts[0], parts[0]
    if len(parts) == 2:
        return parts[0], parts[1], parts[0], parts[1]
    top, right, bottom, left = parts
    return top, right, bottom, left


def canonical_margin(text: str) -> str:
    """One spelling per crop_margin: one length when the four sides are equal, else four."""
    sides = [canonical_length(side) for side in parse_margin(text)]
    return sides[0] if len(set(sides)) == 1 else " ".join(sides)


def parse_roi(text: str) -> tuple[str, str, str, str]:
    """(x1, y1, x2, y2) of a roi that matched ROI_PATTERN."""
    x1, y1, x2, y2 = text.split(" ")
    return x1, y1, x2, y2


def never_after(first: str, second: str) -> bool:
    """True when the length `second` is not past `first` on any image: both in one unit (or
    one of them 0, the same in both) and `second` not greater."""
    (a, a_percent), (b, b_percent) = parse_length(first), parse_length(second)
    return (a_percent == b_percent or not a or not b) and b <= a


def is_whole_image(text: str) -> bool:
    """True for a roi that is the whole image whatever its size: "0% 0% 100% 100%"."""
    x1, y1, x2, y2 = (parse_length(length) for length in parse_roi(text))
    return not x1[0] and not y1[0] and x2 == y2 == (100, True)


def canonical_roi(text: str) -> str:
    """One spelling per roi: its four canonical lengths."""
    return " ".join(canonical_length(length) for length in parse_roi(text))


def parse_scale(text: str) -> float | None:
    """A scale's percentage; None for "original" (the subject keeps its size)."""
    return None if text == "original" else parse_length(text)[0]


def canonical_scale(text: str) -> str:
    """One spelling per scale: "original" or "X%"."""
    scale = parse_scale(text)
    return "original" if scale is None else f"{scale:g}%"


def parse_position(text: str) -> tuple[int, int]:
    """(x, y) of a position that matched POSITION_PATTERN, in hundredths of a percent."""
    if text in POSITIONS:
        return POSITIONS[text]
    parts = [round(parse_length(part)[0] * 100) for part in text.split(" ")]
    return parts[0], parts[-1]


def canonical_position(text: str) -> str:
    """One spelling per position: the keyword when one is equivalent, else "X% Y%"."""
    at = parse_position(text)
    named = [name for name, where in POSITIONS.items() if where == at]
    return named[0] if named else " ".join(f"{value / 100:g}%" for value in at)


def parse_canvas(text: str) -> tuple[int, int]:
    """(width, height) of a canvas that matched CANVAS_PATTERN."""
    width, height = text.split("x")
    return int(width), int(height)
