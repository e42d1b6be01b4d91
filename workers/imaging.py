"""The pixel pipeline: decode and check, rembg.remove(), PNG encode."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from PIL import Image

from bgq.contract import Options
from bgq.errors import InvalidImage, UnsupportedImage
from bgq.imageinfo import NO_ALPHA_MATTING_MODES, open_header

if TYPE_CHECKING:
    from rembg.sessions.base import BaseSession

# Workers own their process: BGQ_MAX_MEGAPIXELS, checked on the header, replaces Pillow's limit.
Image.MAX_IMAGE_PIXELS = None


def decode(data: bytes, max_megapixels: float, options: Options) -> Image.Image:
    """Check the header, then decode every pixel; bad input raises a PermanentError."""
    img = open_header(data, max_megapixels)
    if options.alpha_matting and not options.only_mask and img.mode in NO_ALPHA_MATTING_MODES:
        raise UnsupportedImage(f"alpha matting does not support image mode {img.mode}")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"truncated or corrupt {img.format} image: {exc}") from None
    return img


def remove_background(img: Image.Image, session: BaseSession, options: Options) -> Image.Image:
    """Exactly rembg.remove() on a decoded image; a failure inside rembg is permanent."""
    from rembg import remove

    try:
        result = remove(img, session=session, **options.rembg_kwargs())
    except MemoryError:
        raise  # the task turns it into OutOfMemory
    except Exception as exc:
        raise UnsupportedImage(
            f"rembg failed on this {img.mode} image: {type(exc).__name__}: {exc}"
        ) from exc
    assert isinstance(result, Image.Image)
    return result


def encode_png(img: Image.Image, compress_level: int) -> bytes:
    """PNG bytes; the compression level changes size and speed, never pixels."""
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=compress_level)
    return buf.getvalue()
