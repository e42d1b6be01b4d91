"""Output shaping and formats (workers/shaping.py), checked on the pixels of real photos.

rembg runs once per photo (the session-scoped `reference`); `render` then runs many times.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bgq import defaults
from bgq.errors import ImageTooLarge, UnsupportedImage
from bgq.lengths import length_pixels, parse_canvas
from bgq.options import FORMATS, Options
from tests.helpers import sample_bytes
from workers.imaging import check_memory, estimated_peak_mib
from workers.shaping import render

PHOTOS = ["car-1.jpg", "anime-girl-1.jpg", "cloth-1.jpg"]
Cutouts = dict[tuple[str, bool], Image.Image]


@pytest.fixture(scope="module")
def cutouts(reference: Callable[..., bytes]) -> Cutouts:
    """rembg.remove()'s output of each photo, as a cutout and as a mask (only_mask)."""
    out = {}
    for name in PHOTOS:
        for only_mask in (False, True):
            with Image.open(io.BytesIO(reference(sample_bytes(name), only_mask=only_mask))) as im:
                out[name, only_mask] = im.copy()
    return out


def shaped(cutout: Image.Image, encoder: str = "fast", **options: Any) -> Image.Image:
    """The decoded output of `render` with these options."""
    with Image.open(io.BytesIO(render(cutout, Options(**options), encoder, 6))) as im:
        im.load()
        return im


def box(img: Image.Image) -> tuple[int, int, int, int]:
    """The bbox of alpha > 0 (a mask's value > 0); the test fails if there is none."""
    found = (img.getchannel("A") if img.mode == "RGBA" else img).getbbox()
    assert found is not None, "no subject in the output"
    return found


def corners(img: Image.Image) -> list[Any]:
    w, h = img.size
    return [img.getpixel(xy) for xy in [(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)]]


@pytest.mark.parametrize("encoder", ["fast", "pillow"])
@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("only_mask", [False, True])
def test_unshaped_png_is_rembgs_output(
    cutouts: Cutouts, name: str, only_mask: bool, encoder: str
) -> None:
    cutout = cutouts[name, only_mask]
    out = shaped(cutout, encoder, only_mask=only_mask)
    assert out.mode == cutout.mode
    assert np.array_equal(np.asarray(out), np.asarray(cutout))


@pytest.mark.parametrize("margin", ["0", "20px", "5%", "100%"])
@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("only_mask", [False, True])
def test_crop_is_the_subjects_box_plus_margin(
    cutouts: Cutouts, name: str, only_mask: bool, margin: str
) -> None:
    cutout = cutouts[name, only_mask]
    left, top, right, bottom = box(cutout)
    dx, dy = length_pixels(margin, right - left), length_pixels(margin, bottom - top)
    want = (max(0, left - dx), max(0, top - dy))
    want_end = (min(cutout.width, right + dx), min(cutout.height, bottom + dy))
    out = shaped(cutout, only_mask=only_mask, crop=True, crop_margin=margin)
    assert out.mode == cutout.mode
    assert out.size == (want_end[0] - want[0], want_end[1] - want[1])
    # The subject sits at the margin from each edge (less where the margin was clipped).
    assert box(out) == (left - want[0], top - want[1], right - want[0], bottom - want[1])
    region = cutout.crop((*want, *want_end))
    assert np.array_equal(np.asarray(out), np.asarray(region))


@pytest.mark.parametrize("canvas", ["1000x1000", "1200x500", "400x900"])
@pytest.mark.parametrize("padding", ["0", "40px", "5%"])
@pytest.mark.parametrize("position", ["center", "top", "bottom"])
@pytest.mark.parametrize("name", PHOTOS)
def test_canvas_fits_and_places_the_cropped_subject(
    cutouts: Cutouts, name: str, position: str, padding: str, canvas: str
) -> None:
    cutout = cutouts[name, False]
    out = shaped(cutout, crop=True, canvas=canvas, padding=padding, position=position)
    width, height = parse_canvas(canvas)
    pad_x, pad_y = length_pixels(padding, width), length_pixels(padding, height)
    assert out.size == (width, height) and out.mode == "RGBA"
    left, top, right, bottom = box(out)
    assert left >= pad_x and top >= pad_y and right <= width - pad_x and bottom <= height - pad_y
    room_x, room_y = width - 2 * pad_x, height - 2 * pad_y
    # It fills the room on the limiting axis (a subject of 1 px alpha may round away: +-1).
    assert room_x - (right - left) <= 1 or room_y - (bottom - top) <= 1
    assert abs((left - pad_x) - (width - pad_x - right)) <= 2  # centred horizontally
    if position == "top":
        assert top - pad_y <= 1
    elif position == "bottom":
        assert height - pad_y - bottom <= 1
    else:
        assert abs((top - pad_y) - (height - pad_y - bottom)) <= 2
    assert corners(out) == [(0, 0, 0, 0)] * 4


@pytest.mark.parametrize("name", PHOTOS)
def test_canvas_without_crop_fits_the_whole_frame(cutouts: Cutouts, name: str) -> None:
    cutout = cutouts[name, False]
    out = shaped(cutout, canvas="1000x1000")
    scale = 1000 / max(cutout.size)
    size = (round(cutout.width * scale), round(cutout.height * scale))
    offset = ((1000 - size[0]) // 2, (1000 - size[1]) // 2)
    want = cutout.resize(size, Image.Resampling.LANCZOS)
    got = out.crop((*offset, offset[0] + size[0], offset[1] + size[1]))
    assert np.array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("bgcolor", [(20, 120, 220, 255), (250, 10, 10, 128)])
@pytest.mark.parametrize("shaping", [{"crop": True}, {"canvas": "800x800", "padding": "5%"}])
@pytest.mark.parametrize("name", PHOTOS)
def test_bgcolor_is_composited_after_shaping(
    cutouts: Cutouts, name: str, shaping: dict[str, Any], bgcolor: tuple[int, int, int, int]
) -> None:
    cutout = cutouts[name, False]
    plain = shaped(cutout, **shaping)
    out = shaped(cutout, bgcolor=bgcolor, **shaping)
    want = Image.alpha_composite(Image.new("RGBA", plain.size, bgcolor), plain)
    assert np.array_equal(np.asarray(out), np.asarray(want))
    if "canvas" in shaping:
        assert corners(out) == [bgcolor] * 4


@pytest.mark.parametrize("shaping", [{}, {"crop": True, "canvas": "600x600", "padding": "20px"}])
@pytest.mark.parametrize("name", PHOTOS)
def test_webp_keeps_alpha_exactly_and_colour_closely(
    cutouts: Cutouts, name: str, shaping: dict[str, Any]
) -> None:
    png = np.asarray(shaped(cutouts[name, False], **shaping))
    webp = shaped(cutouts[name, False], format="webp", **shaping)
    assert webp.format == "WEBP" and webp.mode == "RGBA"
    got = np.asarray(webp)
    assert np.array_equal(got[..., 3], png[..., 3])  # alpha_quality=100: lossless alpha
    visible = png[..., 3] > 0
    diff = np.abs(got[..., :3].astype(int) - png[..., :3].astype(int))[visible]
    assert diff.mean() < 4


def near(pixel: Any, want: tuple[int, ...], tolerance: int = 4) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, want, strict=True))


@pytest.mark.parametrize(
    ("bgcolor", "corner"),
    [(None, (255, 255, 255)), ((20, 120, 220, 255), (20, 120, 220)), ((0, 0, 0, 128), (127,) * 3)],
)
@pytest.mark.parametrize("shaping", [{}, {"crop": True, "canvas": "600x400", "padding": "5%"}])
@pytest.mark.parametrize("name", PHOTOS)
def test_jpeg_is_flattened_on_bgcolor_or_white(
    cutouts: Cutouts, name: str, shaping: dict[str, Any], bgcolor: Any, corner: tuple[int, ...]
) -> None:
    cutout = cutouts[name, False]
    if bgcolor and not shaping:  # unshaped: rembg.remove() applied bgcolor itself
        cutout = Image.alpha_composite(Image.new("RGBA", cutout.size, bgcolor), cutout)
    out = shaped(cutout, format="jpeg", bgcolor=bgcolor, **shaping)
    assert out.format == "JPEG" and out.mode == "RGB"
    rgba = shaped(cutout, bgcolor=bgcolor, **shaping)
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba).convert("RGB")
    diff = np.abs(np.asarray(out).astype(int) - np.asarray(flat).astype(int))
    assert diff.mean() < 4
    empty = [
        c
        for c, a in zip(corners(out), corners(shaped(cutouts[name, False], **shaping)), strict=True)
        if a[3] == 0
    ]
    assert empty and all(near(c, corner) for c in empty), corners(out)


def unzipped(data: bytes) -> list[tuple[zipfile.ZipInfo, Image.Image]]:
    """A zip output's members, in order, each with its decoded image."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None  # every member's CRC checks
        members = []
        for info in archive.infolist():
            with Image.open(io.BytesIO(archive.read(info))) as im:
                im.load()
                members.append((info, im))
        return members


@pytest.mark.parametrize("shaping", [{}, {"crop": True, "canvas": "600x600", "padding": "20px"}])
@pytest.mark.parametrize("name", PHOTOS)
def test_zip_holds_the_pngs_alpha_exactly_and_its_colours_closely(
    cutouts: Cutouts, name: str, shaping: dict[str, Any]
) -> None:
    cutout = cutouts[name, False]
    members = unzipped(render(cutout, Options(format="zip", **shaping), "fast", 6))
    assert [info.filename for info, _ in members] == ["color.jpg", "alpha.png"]
    (_, color), (_, alpha) = members
    assert (color.format, color.mode, alpha.format, alpha.mode) == ("JPEG", "RGB", "PNG", "L")
    png = np.asarray(shaped(cutout, **shaping))
    assert color.size == alpha.size == (png.shape[1], png.shape[0])
    assert np.array_equal(np.asarray(alpha), png[..., 3])  # exactly the PNG's alpha
    diff = np.abs(np.asarray(color).astype(int) - png[..., :3].astype(int))
    assert diff.mean() < 1  # the RGB channels as rendered, up to the JPEG's loss
    opaque = png[..., 3] == 255
    assert opaque.any() and diff[opaque].mean() < 5


@pytest.mark.parametrize("encoder", ["fast", "pillow"])
def test_zip_is_deterministic(cutouts: Cutouts, encoder: str) -> None:
    """Fixed timestamps, modes and member order: the same pixels give the same bytes."""
    cutout = cutouts["car-1.jpg", False]
    first = render(cutout, Options(format="zip"), encoder, 6)
    assert first == render(cutout.copy(), Options(format="zip"), encoder, 6)
    for info, _ in unzipped(first):
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        assert info.compress_type == zipfile.ZIP_STORED  # its members are compressed already
        assert info.external_attr >> 16 == 0o644 and info.create_system == 3


@pytest.mark.parametrize("fmt", ["webp", "jpeg", "zip"])
@pytest.mark.parametrize("name", PHOTOS)
def test_quality_changes_the_size(cutouts: Cutouts, name: str, fmt: str) -> None:
    sizes = [
        len(render(cutouts[name, False], Options(format=fmt, quality=q), "fast", 6))
        for q in (30, 95)
    ]
    assert sizes[0] < sizes[1]
    default = render(cutouts[name, False], Options(format=fmt), "fast", 6)
    assert default == render(cutouts[name, False], Options(format=fmt, quality=90), "fast", 6)


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
@pytest.mark.parametrize("position", ["top", "bottom"])
@pytest.mark.parametrize("name", PHOTOS)
def test_mask_on_a_canvas(cutouts: Cutouts, name: str, position: str, fmt: str) -> None:
    mask = cutouts[name, True]
    options = {"only_mask": True, "crop": True, "canvas": "500x700", "padding": "10px"}
    out = shaped(mask, format=fmt, position=position, **options)
    assert out.size == (500, 700)
    assert out.mode == {"png": "L", "jpeg": "L", "webp": "RGB"}[fmt]
    grey = np.asarray(out.convert("L")).astype(int)
    if fmt == "webp":  # no greyscale WebP: R = G = B, up to the lossy colour conversion
        rgb = np.asarray(out).astype(int)
        assert np.abs(rgb - grey[..., None]).max() <= 8
    png = np.asarray(shaped(mask, position=position, **options)).astype(int)
    assert np.abs(grey - png).mean() < 2
    assert (grey[[0, 0, -1, -1], [0, -1, 0, -1]] <= 4).all()
    left, top, right, bottom = box(Image.fromarray(png.astype(np.uint8)))
    gap = top - 10 if position == "top" else 700 - 10 - bottom
    assert 0 <= gap <= 1
    assert abs((left - 10) - (500 - 10 - right)) <= 2


@pytest.mark.parametrize("mode", ["RGBA", "L"])
@pytest.mark.parametrize("options", [{"crop": True}, {"crop": True, "crop_margin": "10%"}])
def test_crop_without_a_subject_keeps_the_frame(mode: str, options: dict[str, Any]) -> None:
    empty = Image.new(mode, (64, 48), 0)
    out = shaped(empty, only_mask=mode == "L", **options)
    assert out.size == (64, 48) and out.mode == mode
    assert not np.asarray(out).any()


@pytest.mark.parametrize("canvas", ["400x400", "30x30"])  # scaled up, scaled down
def test_resizing_premultiplies_alpha_no_dark_fringe(canvas: str) -> None:
    """rembg's transparent pixels are black (0,0,0,0): unpremultiplied, they would darken edges."""
    img = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    img.paste((255, 255, 255, 255), (20, 20, 80, 80))
    out = np.asarray(shaped(img, canvas=canvas))
    edge = out[..., 3] > 0
    assert (out[..., 3] < 255).any()  # there is a soft edge to look at
    assert out[..., :3][edge].min() >= 250


def test_a_canvas_adds_its_own_memory() -> None:
    plain = estimated_peak_mib(2.0, Options())
    assert estimated_peak_mib(2.0, Options(canvas="100x100")) == plain  # under rembg's peak
    small = estimated_peak_mib(2.0, Options(canvas="4000x4000"))
    largest = f"{defaults.CANVAS_MAX_SIDE}x{defaults.CANVAS_MAX_SIDE}"
    big = estimated_peak_mib(2.0, Options(canvas=largest))
    webp = estimated_peak_mib(2.0, Options(canvas=largest, format="webp"))
    assert plain <= small < big < webp
    assert big - small == pytest.approx(defaults.SHAPING_MIB_PER_MP["png"] * 48)


def test_every_format_has_its_memory_per_megapixel() -> None:
    assert set(defaults.SHAPING_MIB_PER_MP) == set(FORMATS)


def test_a_canvas_too_big_for_the_memory_limit_is_refused_before_decoding() -> None:
    small_input = Image.new("RGB", (100, 100))  # check_memory reads the size only
    largest = f"{defaults.CANVAS_MAX_SIDE}x{defaults.CANVAS_MAX_SIDE}"
    check_memory(small_input, Options(canvas=largest), defaults.MAX_MEMORY_PER_CHILD_MB)
    with pytest.raises(ImageTooLarge, match=f"on a {largest} canvas"):
        check_memory(small_input, Options(canvas=largest, format="webp"), 1024)


def test_an_output_webp_cannot_hold_fails_for_good() -> None:
    with pytest.raises(UnsupportedImage, match="16383"):
        render(Image.new("RGBA", (16384, 2), 0), Options(format="webp"), "fast", 6)
