"""Catalog-ready outputs: rembg's cutout shaped (workers/layout.py), put on its background
(a colour, or an image: workers/backgrounds.py), encoded as PNG, WebP, JPEG or a zip of colour
and alpha.

Every transform starts from rembg.remove()'s output (with bgcolor held back when the output is
shaped) and is documented in docs/output.md: roi, crop, canvas or scale, fit, background, encode.
"""

from __future__ import annotations

import io
import zipfile

from PIL import Image

from bgq.errors import UnsupportedImage
from bgq.options import JPEG_BACKGROUND, Options
from workers.backgrounds import composite
from workers.imaging import encode_png
from workers.layout import arrange

WHITE = JPEG_BACKGROUND  # what JPEG, which has no alpha, flattens onto
# WebP: lossy colour at the requested quality, the alpha plane compressed losslessly (100):
# a cutout's value is its edge, and lossy alpha blurs it into halos for a few bytes saved.
WEBP_ALPHA_QUALITY = 100
# The members of a zip, in order: the colour (RGB) as a JPEG, the alpha as a greyscale PNG.
ZIP_COLOR, ZIP_ALPHA = "color.jpg", "alpha.png"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # every member's timestamp: the same bytes for the same pixels


def render(
    cutout: Image.Image,
    options: Options,
    png_encoder: str,
    png_level: int,
    background: Image.Image | None = None,
) -> bytes:
    """The output's bytes: rembg's cutout shaped and encoded as the options ask; `background`
    is bg_image's image (workers/backgrounds.py `open_background`), needed then only."""
    if (background is None) != (options.bg_image is None):
        raise ValueError("render takes a background exactly when the options have a bg_image")
    if not options.shaped and options.format == "png":
        return encode_png(cutout, png_encoder, png_level)  # rembg.remove()'s pixels, exactly
    img = cutout if cutout.mode in ("L", "RGBA") else cutout.convert("RGBA")
    img = arrange(img, options)
    if options.shaped and options.bgcolor is not None and not options.only_mask:
        img = apply_bgcolor(img, options.bgcolor)
    if background is not None:
        img = composite(img, background)
    return encode(img, options, png_encoder, png_level)


def apply_bgcolor(img: Image.Image, color: tuple[int, int, int, int]) -> Image.Image:
    """rembg's own apply_background_color: the image composited over a layer of `color`."""
    from rembg.bg import apply_background_color

    return apply_background_color(img, color)


def flatten(img: Image.Image) -> Image.Image:
    """An opaque image for JPEG: RGBA composited over white (a mask stays L, RGB stays RGB)."""
    if img.mode in ("L", "RGB"):
        return img
    return Image.alpha_composite(Image.new("RGBA", img.size, WHITE), img).convert("RGB")


def encode(img: Image.Image, options: Options, png_encoder: str, png_level: int) -> bytes:
    """The image's bytes in the requested format (quality applies to webp, jpeg and zip)."""
    if options.format == "png":
        return encode_png(img, png_encoder, png_level)
    if options.format == "zip":
        return encode_zip(img, options.effective_quality, png_encoder, png_level)
    if options.format == "jpeg":
        return save(flatten(img), "JPEG", quality=options.effective_quality)
    webp = img.convert("RGB") if img.mode == "L" else img  # no greyscale WebP: R = G = B
    return save(webp, "WEBP", quality=options.effective_quality, alpha_quality=WEBP_ALPHA_QUALITY)


def encode_zip(img: Image.Image, quality: int, png_encoder: str, png_level: int) -> bytes:
    """remove.bg's zip of an RGBA image: its RGB channels as they are (a transparent pixel's
    colour too) in a JPEG at `quality`, and its alpha channel in a PNG; deterministic."""
    color = save(img.convert("RGB"), "JPEG", quality=quality)
    alpha = encode_png(img.getchannel("A"), png_encoder, png_level)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for name, data in ((ZIP_COLOR, color), (ZIP_ALPHA, alpha)):  # already compressed
            member = zipfile.ZipInfo(name, ZIP_DATE)
            member.create_system = 3  # Unix, wherever the worker runs
            member.external_attr = 0o644 << 16  # rw-r--r--
            archive.writestr(member, data)
    return buf.getvalue()


def save(img: Image.Image, fmt: str, **params: int) -> bytes:
    """Pillow's encoding; one the format cannot hold (WebP: 16383 px a side) is permanent."""
    buf = io.BytesIO()
    try:
        img.save(buf, fmt, **params)
    except (OSError, ValueError) as exc:
        raise UnsupportedImage(f"cannot encode a {img.width}x{img.height} {fmt}: {exc}") from None
    return buf.getvalue()
