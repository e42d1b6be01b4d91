"""Read an image's header (format, size, mode) without decoding its pixels."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from bgq.errors import ImageTooLarge, InvalidImage, UnsupportedImage

# Modes rembg.remove() processes (checked against rembg 2.0.86 for every Pillow mode);
# alpha matting fails inside pymatting for the two-band modes.
SUPPORTED_MODES = frozenset(
    {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F"}
)
NO_ALPHA_MATTING_MODES = frozenset({"LA", "PA"})


@dataclass(frozen=True)
class ImageInfo:
    """What an image's header says."""

    format: str
    width: int
    height: int
    mode: str

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


def open_header(data: bytes, max_megapixels: float) -> Image.Image:
    """Open an image lazily and check it before any pixel is decoded; raise a PermanentError."""
    if not data:
        raise InvalidImage("empty input (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidImage(f"not a recognised image ({len(data)} bytes)") from None
    except Image.DecompressionBombError as exc:
        # Only where the process kept Pillow's own guard (a library user's); bgq's CLI and
        # workers lift it, so that BGQ_MAX_MEGAPIXELS alone decides.
        raise ImageTooLarge(f"over Pillow's decompression-bomb limit: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"corrupt image header: {exc}") from None
    info = ImageInfo(img.format or "?", img.width, img.height, img.mode)
    if info.megapixels > max_megapixels:
        raise ImageTooLarge(
            f"{info.width}x{info.height} is {info.megapixels:.1f} megapixels, over the "
            f"BGQ_MAX_MEGAPIXELS limit of {max_megapixels:g}"
        )
    if info.mode not in SUPPORTED_MODES:
        raise UnsupportedImage(f"unsupported image mode {info.mode} ({info.format})")
    return img


def probe(data: bytes, max_megapixels: float) -> ImageInfo:
    """Check an image's header; raise InvalidImage, ImageTooLarge or UnsupportedImage."""
    img = open_header(data, max_megapixels)
    return ImageInfo(img.format or "?", img.width, img.height, img.mode)


def _streams(img: Image.Image) -> list[io.BytesIO]:
    """The open in-memory files behind an image opened by open_header: Pillow keeps its file
    after load() too (as `_fp`), and with it the bytes the file wraps."""
    found = (getattr(img, "fp", None), getattr(img, "_fp", None))
    streams = [stream for stream in found if isinstance(stream, io.BytesIO) and not stream.closed]
    return list({id(stream): stream for stream in streams}.values())


def file_mib(img: Image.Image) -> float:
    """The size in MiB of the file an image opened by open_header reads its pixels from (0
    once free_file has let it go)."""
    for stream in _streams(img):
        where = stream.tell()
        size = stream.seek(0, io.SEEK_END)
        stream.seek(where)
        return size / 2**20
    return 0.0


def free_file(img: Image.Image) -> None:
    """Let go of the bytes an image opened by open_header was read from, once it is loaded
    (its pixels and info stay)."""
    for stream in _streams(img):
        stream.close()
