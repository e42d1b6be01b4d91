"""Header checks (bgq.imageinfo) and the worker's decode/encode steps (workers.imaging)."""

from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from bgq import imageinfo
from bgq.errors import ImageTooLarge, InvalidImage, PermanentError, UnsupportedImage
from bgq.imageinfo import ImageInfo, probe
from bgq.options import Options
from workers.imaging import decode, encode_png

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
LIMIT = 50.0  # megapixels


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR for a greyscale image of any size, without its pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def saved(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels must not be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# --- probe -----------------------------------------------------------------------------------


def test_empty_bytes_are_invalid() -> None:
    with pytest.raises(InvalidImage, match="empty"):
        probe(b"", LIMIT)


@pytest.mark.parametrize(
    "data",
    [random.Random(0).randbytes(4096), b"GIF89a", b"not an image at all"],
    ids=["random", "magic-only", "text"],
)
def test_non_images_are_invalid(data: bytes) -> None:
    with pytest.raises(InvalidImage, match="not a recognised image"):
        probe(data, LIMIT)


def test_a_corrupt_header_is_invalid() -> None:
    with pytest.raises(InvalidImage, match="corrupt image header"):
        probe(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, LIMIT)


@pytest.mark.usefixtures("no_pixel_decoding")
def test_a_large_image_is_rejected_from_its_header() -> None:
    with pytest.raises(ImageTooLarge, match=r"8000x8000 is 64\.0 megapixels.*limit of 50"):
        probe(png_header(8000, 8000), LIMIT)


@pytest.mark.usefixtures("no_pixel_decoding")
def test_an_image_at_the_limit_passes() -> None:
    assert probe(png_header(1000, 1000), 1.0) == ImageInfo("PNG", 1000, 1000, "L")
    with pytest.raises(ImageTooLarge):
        probe(png_header(1000, 1001), 1.0)


def test_a_real_large_png_is_rejected() -> None:
    data = saved(Image.new("L", (8000, 8000)))
    assert len(data) < 1_000_000
    with pytest.raises(ImageTooLarge):
        probe(data, LIMIT)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("car-1.jpg", ImageInfo("JPEG", 480, 360, "RGB")),
        ("anime-girl-1.jpg", ImageInfo("JPEG", 850, 601, "RGB")),
        # Named .jpg, but it is a PNG with alpha: detected by content.
        ("plants-1.jpg", ImageInfo("PNG", 987, 1481, "RGBA")),
    ],
)
def test_probe_reads_format_size_and_mode_by_content(name: str, expected: ImageInfo) -> None:
    assert probe(sample(name), LIMIT) == expected


def test_megapixels() -> None:
    assert ImageInfo("PNG", 2000, 1500, "RGB").megapixels == 3.0


def test_an_unsupported_mode_is_rejected() -> None:
    data = saved(Image.new("I;16B", (4, 4)), "TIFF")
    with pytest.raises(UnsupportedImage, match=r"unsupported image mode I;16B \(TIFF\)"):
        probe(data, LIMIT)


def test_supported_modes_come_from_supported_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    data = saved(Image.new("RGB", (4, 4)))
    assert probe(data, LIMIT).mode == "RGB"
    monkeypatch.setattr(imageinfo, "SUPPORTED_MODES", frozenset({"L"}))
    with pytest.raises(UnsupportedImage, match="RGB"):
        probe(data, LIMIT)


def test_probe_errors_are_permanent() -> None:
    for error in (InvalidImage, ImageTooLarge, UnsupportedImage):
        assert issubclass(error, PermanentError)


# --- decode ----------------------------------------------------------------------------------


def test_a_truncated_jpeg_passes_probe_but_not_decode() -> None:
    data = sample("car-1.jpg")
    data = data[: len(data) // 2]
    assert probe(data, LIMIT).format == "JPEG"
    with pytest.raises(InvalidImage, match="truncated"):
        decode(data, LIMIT, Options())


def test_decode_returns_every_pixel() -> None:
    data = sample("car-1.jpg")
    img = decode(data, LIMIT, Options())
    assert img.size == (480, 360)
    assert img.tobytes() == Image.open(io.BytesIO(data)).tobytes()


def test_decode_checks_the_header_first() -> None:
    with pytest.raises(ImageTooLarge):
        decode(png_header(8000, 8000), LIMIT, Options())


def test_alpha_matting_on_a_two_band_image_is_unsupported() -> None:
    data = saved(Image.new("LA", (8, 8)))
    with pytest.raises(UnsupportedImage, match="alpha matting does not support image mode LA"):
        decode(data, LIMIT, Options(alpha_matting=True))


@pytest.mark.parametrize(
    "options",
    [Options(), Options(alpha_matting=True, only_mask=True)],
    ids=["no-matting", "only-mask"],
)
def test_a_two_band_image_decodes_without_alpha_matting(options: Options) -> None:
    img = decode(saved(Image.new("LA", (8, 8), (7, 200))), LIMIT, options)
    assert img.mode == "LA"
    assert img.getpixel((3, 3)) == (7, 200)


# --- encode ----------------------------------------------------------------------------------


def _gradient_cutout(mode: str) -> Image.Image:
    img = Image.open(io.BytesIO(sample("car-1.jpg"))).convert("RGBA")
    img.putalpha(Image.linear_gradient("L").resize(img.size))
    return img.convert(mode)


@pytest.mark.parametrize(
    ("encoder", "level", "mode"),
    [("pillow", level, "RGBA") for level in (0, 1, 6, 9)]
    + [("fast", 6, mode) for mode in ("RGBA", "RGB", "LA", "L", "P", "I;16")],
)
def test_encode_png_keeps_every_pixel(encoder: str, level: int, mode: str) -> None:
    img = _gradient_cutout(mode)
    png = encode_png(img, encoder, level)
    back = Image.open(io.BytesIO(png))
    back.load()  # Pillow checks every chunk's CRC while reading
    assert back.format == "PNG"
    assert back.mode == img.mode
    assert back.size == img.size
    assert back.tobytes() == img.tobytes()


def test_the_fast_encoder_writes_a_one_row_image_and_a_one_pixel_image() -> None:
    for size in [(5, 1), (1, 1), (1, 7)]:
        img = Image.new("RGBA", size, (1, 2, 3, 4))
        assert Image.open(io.BytesIO(encode_png(img, "fast", 6))).tobytes() == img.tobytes()


def test_the_fast_encoder_compresses_and_falls_back_to_pillow_for_other_modes() -> None:
    img = _gradient_cutout("RGBA")
    assert len(encode_png(img, "fast", 6)) < 0.6 * len(encode_png(img, "pillow", 0))
    # Modes the fast path does not write (palette, 16-bit) go through Pillow: same bytes.
    for mode in ("P", "I;16"):
        other = _gradient_cutout(mode)
        assert encode_png(other, "fast", 6) == encode_png(other, "pillow", 6)


def test_encode_png_honours_the_compression_level() -> None:
    img = _gradient_cutout("RGBA")
    assert len(encode_png(img, "pillow", 0)) > len(encode_png(img, "pillow", 9))
