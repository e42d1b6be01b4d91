"""Catalog-ready outputs: crop to the subject, place it on a canvas, encode as PNG, WebP or JPEG.

Every transform starts from rembg.remove()'s output (with bgcolor held back when the output is
shaped) and is documented in docs/output.md: crop, scale to fit, place, bgcolor, encode.
"""

from __future__ import annotations

import io

from PIL import Image

from bgq.errors import UnsupportedImage
from bgq.options import JPEG_BACKGROUND, Options, length_pixels, parse_canvas
from workers.imaging import encode_png

Box = tuple[int, int, int, int]  # left, top, right, bottom (right and bottom exclusive)
WHITE = JPEG_BACKGROUND  # what JPEG, which has no alpha, flattens onto
# WebP: lossy colour at the requested quality, the alpha plane compressed losslessly (100):
# a cutout's value is its edge, and lossy alpha blurs it into halos for a few bytes saved.
WEBP_ALPHA_QUALITY = 100


def render(cutout: Image.Image, options: Options, png_encoder: str, png_level: int) -> bytes:
    """The output's bytes: rembg's cutout shaped and encoded as the options ask."""
    if not options.shaped and options.format == "png":
        return encode_png(cutout, png_encoder, png_level)  # rembg.remove()'s pixels, exactly
    img = cutout if cutout.mode in ("L", "RGBA") else cutout.convert("RGBA")
    if options.crop:
        img = img.crop(crop_box(img, options.crop_margin))
    if options.canvas is not None:
        img = place(img, options)
    if options.shaped and options.bgcolor is not None and not options.only_mask:
        img = apply_bgcolor(img, options.bgcolor)
    return encode(img, options, png_encoder, png_level)


def subject_box(img: Image.Image) -> Box | None:
    """The bounding box of the pixels with alpha (a mask's value) over 0; None if there are none."""
    plane = img.getchannel("A") if img.mode == "RGBA" else img
    return plane.getbbox()


def crop_box(img: Image.Image, margin: str) -> Box:
    """The subject's box grown by the margin (a % is of the box's own side), clipped to the image.

    With no subject at all (every pixel transparent), the whole frame.
    """
    box = subject_box(img)
    if box is None:
        return (0, 0, *img.size)
    left, top, right, bottom = box
    dx = length_pixels(margin, right - left)
    dy = length_pixels(margin, bottom - top)
    return (
        max(0, left - dx),
        max(0, top - dy),
        min(img.width, right + dx),
        min(img.height, bottom + dy),
    )


def fit_size(size: tuple[int, int], room: tuple[int, int]) -> tuple[int, int]:
    """`size` scaled up or down to fit inside `room`, keeping its aspect ratio (at least 1 px)."""
    scale = min(room[0] / size[0], room[1] / size[1])
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


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
    left = pad_x + (room[0] - size[0]) // 2
    top = {
        "center": pad_y + (room[1] - size[1]) // 2,
        "top": pad_y,
        "bottom": height - pad_y - size[1],
    }[options.position]
    canvas = Image.new(img.mode, (width, height), 0)  # transparent (0,0,0,0), or mask value 0
    canvas.paste(img, (left, top))
    return canvas


def apply_bgcolor(img: Image.Image, color: tuple[int, int, int, int]) -> Image.Image:
    """rembg's own apply_background_color: the image composited over a layer of `color`."""
    from rembg.bg import apply_background_color

    return apply_background_color(img, color)


def flatten(img: Image.Image) -> Image.Image:
    """An opaque RGB image for JPEG: RGBA composited over white (a mask stays L)."""
    if img.mode == "L":
        return img
    return Image.alpha_composite(Image.new("RGBA", img.size, WHITE), img).convert("RGB")


def encode(img: Image.Image, options: Options, png_encoder: str, png_level: int) -> bytes:
    """The image's bytes in the requested format (quality applies to webp and jpeg)."""
    if options.format == "png":
        return encode_png(img, png_encoder, png_level)
    if options.format == "jpeg":
        return save(flatten(img), "JPEG", quality=options.effective_quality)
    webp = img.convert("RGB") if img.mode == "L" else img  # no greyscale WebP: R = G = B
    return save(webp, "WEBP", quality=options.effective_quality, alpha_quality=WEBP_ALPHA_QUALITY)


def save(img: Image.Image, fmt: str, **params: int) -> bytes:
    """Pillow's encoding; one the format cannot hold (WebP: 16383 px a side) is permanent."""
    buf = io.BytesIO()
    try:
        img.save(buf, fmt, **params)
    except (OSError, ValueError) as exc:
        raise UnsupportedImage(f"cannot encode a {img.width}x{img.height} {fmt}: {exc}") from None
    return buf.getvalue()
