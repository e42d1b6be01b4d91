"""Where the subject goes: the geometric transforms of a shaped output, in docs/output.md's order.

roi, crop, then a canvas or a scale (at `position`), then fit_megapixels; each takes rembg's
RGBA cutout (or `L` mask) and gives a new image of the same mode.
"""

from __future__ import annotations

import math

from PIL import Image

from bgq.lengths import (
    POSITIONS,
    length_pixels,
    parse_canvas,
    parse_margin,
    parse_position,
    parse_roi,
    parse_scale,
)
from bgq.options import Options

Box = tuple[int, int, int, int]  # left, top, right, bottom (right and bottom exclusive)


def arrange(img: Image.Image, options: Options) -> Image.Image:
    """The image through each geometric transform the options ask for, in order."""
    if options.roi is not None:
        img = keep_roi(img, options.roi)
    if options.crop:
        img = img.crop(crop_box(img, options.crop_margin))
    if options.canvas is not None:
        img = place(img, options)
    elif options.scale is not None:
        img = scale_subject(img, options.scale, options.position)
    if options.fit_megapixels is not None:
        img = fit_megapixels(img, options.fit_megapixels)
    return img


def empty(mode: str, size: tuple[int, int]) -> Image.Image:
    """A frame of nothing: transparent (0,0,0,0), or a mask's 0."""
    return Image.new(mode, size, 0)


def subject_box(img: Image.Image) -> Box | None:
    """The bounding box of the pixels with alpha (a mask's value) over 0; None if there are none."""
    plane = img.getchannel("A") if img.mode == "RGBA" else img
    return plane.getbbox()


def roi_box(size: tuple[int, int], roi: str) -> Box:
    """The roi in pixels, clipped to the image; empty (right <= left or bottom <= top) when
    x2 is not past x1 or y2 not past y1."""
    width, height = size
    x1, y1, x2, y2 = parse_roi(roi)
    left = min(length_pixels(x1, width), width)
    top = min(length_pixels(y1, height), height)
    right = max(left, min(length_pixels(x2, width), width))
    bottom = max(top, min(length_pixels(y2, height), height))
    return left, top, right, bottom


def keep_roi(img: Image.Image, roi: str) -> Image.Image:
    """A copy of the image with everything outside the roi cleared to nothing."""
    left, top, right, bottom = roi_box(img.size, roi)
    width, height = img.size
    out = img.copy()
    nothing = 0 if img.mode == "L" else (0, 0, 0, 0)
    strips = [(0, 0, width, top), (0, bottom, width, height)]
    strips += [(0, top, left, bottom), (right, top, width, bottom)]
    for strip in strips:
        if strip[2] > strip[0] and strip[3] > strip[1]:
            out.paste(nothing, strip)
    return out


def crop_box(img: Image.Image, margin: str) -> Box:
    """The subject's box grown by the margins (a % is of the box's own side), clipped to the image.

    With no subject at all (every pixel transparent), the whole frame.
    """
    box = subject_box(img)
    if box is None:
        return (0, 0, *img.size)
    left, top, right, bottom = box
    above, after, below, before = parse_margin(margin)  # CSS order: top, right, bottom, left
    width, height = right - left, bottom - top
    return (
        max(0, left - length_pixels(before, width)),
        max(0, top - length_pixels(above, height)),
        min(img.width, right + length_pixels(after, width)),
        min(img.height, bottom + length_pixels(below, height)),
    )


def fit_size(size: tuple[int, int], room: tuple[float, float]) -> tuple[int, int]:
    """`size` scaled up or down to fit inside `room`, keeping its aspect ratio (at least 1 px)."""
    scale = min(room[0] / size[0], room[1] / size[1])
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def offset(free: int, at: int) -> int:
    """Where a side starts in `free` pixels of room, `at` hundredths of a percent along (floor:
    centred, an odd pixel left over goes right or down)."""
    return free * at // 10000


def place(img: Image.Image, options: Options) -> Image.Image:
    """The image scaled to fit the canvas less its padding, on an empty canvas at `position`."""
    assert options.canvas is not None
    width, height = parse_canvas(options.canvas)
    pad_x = length_pixels(options.padding, width)
    pad_y = length_pixels(options.padding, height)
    room = (max(1, width - 2 * pad_x), max(1, height - 2 * pad_y))
    size = fit_size(img.size, room)
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS)  # RGBA: Pillow premultiplies alpha
    at = parse_position(options.position)
    top = pad_y + offset(room[1] - size[1], at[1])
    if at == POSITIONS["bottom"]:  # the keyword's own rule, where padding leaves no room too
        top = height - pad_y - size[1]
    canvas = empty(img.mode, (width, height))
    canvas.paste(img, (pad_x + offset(room[0] - size[0], at[0]), top))
    return canvas


def scale_subject(img: Image.Image, scale: str, position: str) -> Image.Image:
    """The subject taken out of the frame and put back on an empty one at `position`: fitted
    to `scale` of the frame's width and height, or at its own size ("original")."""
    subject = img.crop(subject_box(img) or (0, 0, *img.size))
    percent = parse_scale(scale)
    if percent is not None:
        size = fit_size(subject.size, (img.width * percent / 100, img.height * percent / 100))
        if size != subject.size:
            subject = subject.resize(size, Image.Resampling.LANCZOS)
    x, y = parse_position(position)
    frame = empty(img.mode, img.size)
    frame.paste(
        subject, (offset(img.width - subject.width, x), offset(img.height - subject.height, y))
    )
    return frame


def megapixels_size(size: tuple[int, int], megapixels: float) -> tuple[int, int]:
    """`size` scaled down, keeping its aspect ratio, to at most `megapixels` (never up); at
    least 1 px a side, the other side cut where that alone would go over."""
    limit = max(1, math.floor(megapixels * 1e6 + 1e-6))  # whole pixels
    width, height = size
    if width * height <= limit:
        return size
    factor = math.sqrt(limit / (width * height))
    new_width = max(1, min(limit, math.floor(width * factor + 1e-9)))
    new_height = max(1, min(limit // new_width, math.floor(height * factor + 1e-9)))
    return new_width, new_height


def fit_megapixels(img: Image.Image, megapixels: float) -> Image.Image:
    """The image scaled down (Lanczos) to at most `megapixels`; as it is when it already fits."""
    size = megapixels_size(img.size, megapixels)
    return img if size == img.size else img.resize(size, Image.Resampling.LANCZOS)
