"""Catalog-ready outputs: crop to the subject, place it on a canvas, encode as PNG, WebP or JPEG.

Every transform starts from rembg.remove()'s output (with bgcolor held back when the output is
shaped) and is documented in docs/output.md.
"""

from __future__ import annotations

from PIL import Image

from bgq.contract import Options
from workers.imaging import encode_png


def render(cutout: Image.Image, options: Options, png_encoder: str, png_level: int) -> bytes:
    """The output's bytes: rembg's cutout shaped and encoded as the options ask."""
    if options.shaped or options.format != "png":
        raise NotImplementedError("shaping")
    return encode_png(cutout, png_encoder, png_level)
