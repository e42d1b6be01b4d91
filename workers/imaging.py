"""The pixel pipeline: decode and check, rembg.remove(), PNG encode."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import ExifTags, Image

from bgq import defaults
from bgq.errors import BgqError, ImageTooLarge, InvalidImage, UnsupportedImage
from bgq.imageinfo import NO_ALPHA_MATTING_MODES, file_mib, open_header
from bgq.lengths import parse_canvas
from bgq.options import Options

# Workers own their process: BGQ_MAX_MEGAPIXELS, checked on the header, replaces Pillow's limit.
Image.MAX_IMAGE_PIXELS = None
_EXIF_TURNS = range(2, 9)  # EXIF orientations that ImageOps.exif_transpose turns or flips


_DEFAULT_MODELS = (defaults.MODEL,)
_weights_mib: dict[str, float] = {}  # model -> MiB of its weights file, as fetched here


def note_weights(model: str, path: Path) -> None:
    """Record the size of `model`'s weights file: an unmeasured model's session is sized by it."""
    _weights_mib[model] = path.stat().st_size / 2**20


def session_mib(model: str) -> float:
    """MiB a session of `model` costs: measured, else estimated from its weights file's size
    (u2net's session MiB per weights MiB, at least u2net's 440; 440 while the size is unknown)."""
    if model in defaults.MODEL_SESSION_MIB:
        return defaults.MODEL_SESSION_MIB[model]
    estimate = _weights_mib.get(model, 0.0) * defaults.SESSION_MIB_PER_WEIGHTS_MIB
    return max(float(defaults.UNMEASURED_SESSION_MIB), estimate)


def pool_base_mib(models: Iterable[str] = _DEFAULT_MODELS) -> float:
    """A pool process's resident MiB before any input: its runtime and the sessions of
    `models` (each model's cost, summed), by the memory model in defaults."""
    return defaults.POOL_RUNTIME_MIB + sum(session_mib(m) for m in set(models))


def estimated_peak_mib(
    megapixels: float,
    options: Options,
    background_mp: float = 0.0,
    background_mib: float = 0.0,
    models: Iterable[str] = _DEFAULT_MODELS,
) -> float:
    """A pool process's peak resident MiB for one input (and its bg_image's `background_mp`
    megapixels, from a file of `background_mib`) while it holds the sessions of `models`, by
    the memory model in defaults."""
    models = frozenset(models)
    if options.post_process_mask:
        per_mp = defaults.POST_PROCESS_MIB_PER_MP
    elif options.only_mask:
        per_mp = defaults.MASK_MIB_PER_MP
    else:
        per_mp = defaults.CUTOUT_MIB_PER_MP
    peak = pool_base_mib(models) + per_mp * megapixels
    if options.alpha_matting and not options.only_mask:
        peak += defaults.MATTING_MIB + defaults.MATTING_MIB_PER_MP * megapixels
    if options.bg_image is not None:  # its file, read before the input, waits while rembg runs
        peak += background_mib
    if options.shaped or options.format != "png":
        shaping = shaping_peak_mib(megapixels, options, background_mp, background_mib, models)
        peak = max(peak, shaping)
    return peak


def shaping_peak_mib(
    megapixels: float,
    options: Options,
    background_mp: float = 0.0,
    background_mib: float = 0.0,
    models: Iterable[str] = _DEFAULT_MODELS,
) -> float:
    """The peak while shaping and encoding, after rembg (the input is freed by then; the
    background's file is freed once its pixels are decoded)."""
    held = defaults.SHAPING_HELD_MIB_PER_MP * megapixels * held_frames(options)
    output = megapixels
    if options.canvas is not None:
        width, height = parse_canvas(options.canvas)
        output = width * height / 1e6
    if options.bg_image is not None:
        held += background_mib + defaults.BACKGROUND_MIB_PER_MP * (background_mp + output)
    if options.fit_megapixels is not None:  # the frame before fitting: premultiplied, a pass
        held += defaults.SHAPING_HELD_MIB_PER_MP * output * defaults.FIT_FRAMES
    return pool_base_mib(models) + held + defaults.SHAPING_MIB_PER_MP[options.format] * output


def held_frames(options: Options) -> int:
    """How many images up to the input's size shaping holds at once (workers/layout.py): the
    cutout, the image of the step before, and those a step makes."""
    before = int(options.roi is not None) + int(options.crop)  # made in turn, one kept
    frames = 1 + before
    if options.scale is not None:
        made = defaults.SCALE_FRAMES if options.scale != "original" else 2  # the subject, a frame
        frames = max(frames, 1 + min(before, 1) + made)
    return frames


def check_memory(
    img: Image.Image,
    options: Options,
    max_memory_mb: float,
    background: Image.Image | None = None,
    models: Iterable[str] = _DEFAULT_MODELS,
) -> None:
    """Refuse, before decoding, an input (and its bg_image's header and file, if any) that
    would take a pool process holding the sessions of `models` past its limit."""
    background_mp = background.width * background.height / 1e6 if background else 0.0
    background_mib = file_mib(background) if background else 0.0
    megapixels = img.width * img.height / 1e6
    peak = estimated_peak_mib(megapixels, options, background_mp, background_mib, models)
    if peak > max_memory_mb:
        what = " with alpha matting" if options.alpha_matting and not options.only_mask else ""
        what += f" on a {options.canvas} canvas" if options.canvas else ""
        if background:
            size = f"{background.width}x{background.height}"
            what += f" over a {size} bg_image (a {background_mib:.1f} MiB file)"
        raise ImageTooLarge(
            f"{img.width}x{img.height}{what} would need about {peak:.0f} MiB in a worker "
            f"process (holding {', '.join(sorted(set(models)))}), over the "
            f"BGQ_MAX_MEMORY_PER_CHILD_MB limit of {max_memory_mb:g}"
        )


def decode(
    data: bytes,
    max_megapixels: float,
    options: Options,
    max_memory_mb: float | None = None,
    background: Image.Image | None = None,
    models: Iterable[str] = _DEFAULT_MODELS,
) -> Image.Image:
    """Check the header and the memory it needs in a process holding the sessions of `models`
    (with `background`, bg_image's opened image), then decode every pixel; or a
    PermanentError."""
    img = open_header(data, max_megapixels)
    if options.alpha_matting and not options.only_mask and img.mode in NO_ALPHA_MATTING_MODES:
        raise UnsupportedImage(f"alpha matting does not support image mode {img.mode}")
    if max_memory_mb is not None:
        check_memory(img, options, max_memory_mb, background, models)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"truncated or corrupt {img.format} image: {exc}") from None
    return img


class _Lent(Image.Image):
    """A decoded input lent to rembg: its first copy shares the pixels instead of duplicating.

    rembg.remove() starts with ImageOps.exif_transpose, which copies an image that needs no
    turning; the caller never touches the input again, so the copy may be the same pixels.
    """

    def copy(self) -> Image.Image:
        """The same pixels under a new plain Image (the caller gave them up)."""
        return self._new(self.im)


def _lend(img: Image.Image) -> Image.Image:
    """The image to pass to rembg: lent (no copy) unless EXIF turns it, then as it is."""
    if img.getexif().get(ExifTags.Base.Orientation, 1) in _EXIF_TURNS:
        return img
    lent = img._new(img.im)
    lent.__class__ = _Lent
    return lent


class Predictor(Protocol):
    """What rembg.remove() asks of a session: the masks of an image."""

    def predict(self, img: Image.Image, *args: Any, **kwargs: Any) -> list[Image.Image]: ...


def remove_background(img: Image.Image, session: Predictor, options: Options) -> Image.Image:
    """Exactly rembg.remove() on a decoded image; a failure inside rembg is permanent.

    The caller must not use `img` afterwards: rembg may work on its very pixels.
    """
    from rembg import remove

    try:
        result = remove(_lend(img), session=session, **options.rembg_kwargs())
    except (MemoryError, BgqError):
        raise  # the task turns MemoryError into OutOfMemory; bgq's own errors say what they are
    except Exception as exc:
        raise UnsupportedImage(
            f"rembg failed on this {img.mode} image: {type(exc).__name__}: {exc}"
        ) from exc
    assert isinstance(result, Image.Image)
    return result


def encode_png(img: Image.Image, encoder: str, compress_level: int) -> bytes:
    """PNG bytes from the chosen encoder; encoder and level change size and speed, never pixels."""
    if encoder == "fast" and img.mode in _PNG_COLOR_TYPES:
        return fast_png(img)
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=compress_level)
    return buf.getvalue()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPES = {"L": 0, "RGB": 2, "LA": 4, "RGBA": 6}  # 8-bit modes -> PNG colour type
_PNG_FILTER_UP = 2  # each byte minus the byte above it: cutouts are mostly flat transparent runs
_PNG_BAND_BYTES = 1 << 20  # bytes of raw rows filtered and compressed at a time


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    body = tag + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def fast_png(img: Image.Image) -> bytes:
    """A standard PNG, ~10x faster than Pillow's: numpy "Up" filter + ISA-L deflate level 1.

    The same pixels as any PNG encoder (lossless); files are about Pillow level 1's size.
    Encoded in bands of rows, so it needs a few MiB beside the image, not copies of it.
    """
    from isal import isal_zlib

    width, height = img.size
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOR_TYPES[img.mode], 0, 0, 0)
    deflate = isal_zlib.compressobj(1)
    parts = [_PNG_SIGNATURE, _png_chunk(b"IHDR", header)]
    idat = [deflate.compress(band) for band in _filtered_bands(img)]
    idat.append(deflate.flush())
    parts += [_png_chunk(b"IDAT", b"".join(idat)), _png_chunk(b"IEND", b"")]
    return b"".join(parts)


def _filtered_bands(img: Image.Image) -> Iterator[bytes]:
    """The image's rows, "Up"-filtered with their filter byte, a band of about 1 MiB at a time."""
    width, height = img.size
    step = max(1, _PNG_BAND_BYTES // (width * len(img.getbands())))
    above = None  # the row above the band; the first row is filtered against zeros
    for top in range(0, height, step):
        rows = np.asarray(img.crop((0, top, width, min(top + step, height)))).reshape(
            min(step, height - top), -1
        )
        filtered = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
        filtered[:, 0] = _PNG_FILTER_UP
        if above is None:
            filtered[0, 1:] = rows[0]
        else:
            np.subtract(rows[0], above, out=filtered[0, 1:])
        np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 wraps, as PNG wants
        above = rows[-1]
        yield filtered.tobytes()
