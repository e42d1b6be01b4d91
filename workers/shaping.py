"""Catalog-ready outputs: rembg's cutout shaped (workers/layout.py), its background, encoded
as PNG, WebP or JPEG.

Every transform starts from rembg.remove()'s output (with bgcolor held back when the output is
shaped) and is documented in docs/output.md: roi, crop, canvas or scale, fit, bgcolor, encode.
"""

from __future__ import annotations

import io

from PIL import Image

from bgq.errors import UnsupportedImage
from bgq.options import JPEG_BACKGROUND, Options
from workers.imaging import encode_png
from workers.layout import arrange

WHITE = JPEG_BACKGROUND  # what JPEG, which has no alpha, flattens onto
# WebP: lossy colour at the requested quality, the alpha plane compressed losslessly (100):
# a cutout's value is its edge, and lossy alpha blurs it into halos for a few bytes saved.
WEBP_ALPHA_QUALITY = 100


def render(cutout: Image.Image, options: Options, png_encoder: str, png_level: int) -> bytes:
    """The output's bytes: rembg's cutout shaped and encoded as the options ask."""
    if not options.shaped and options.format == "png":
        return encode_png(cutout, png_encoder, png_level)  # rembg.remove()'s pixels, exactly
    img = cutout if cutout.mode in ("L", "RGBA") else cutout.convert("RGBA")
    img = arrange(img, options)
    if options.shaped and options.bgcolor is not None and not options.only_mask:
        img = apply_bgcolor(img, options.bgcolor)
    return encode(img, options, png_encoder, png_level)


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
