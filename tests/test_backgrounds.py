"""Background images (workers/backgrounds.py): cover geometry on synthetic images, the checks
an input gets, and the composite under rembg's cutouts of real photos."""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import ExifTags, Image

from bgq import cache, contract, defaults
from bgq.contract import INPUTS, input_digest
from bgq.errors import ImageTooLarge, InvalidImage, JobFailed
from bgq.imageinfo import file_mib, open_header
from bgq.options import Options
from bgq.stack import LocalStack
from bgq.store import FileStore
from producer import Producer
from tests.helpers import (
    LocalStackControl,
    sample_bytes,
    settle,
    stale_leftovers,
    variant,
)
from workers.backgrounds import composite, cover, cover_region, decoded, open_background
from workers.imaging import check_memory, estimated_peak_mib, shaping_peak_mib
from workers.shaping import render

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def encoded(img: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def opened(data: bytes) -> Image.Image:
    """An image opened as open_background opens one: its header read, its pixels not yet."""
    return Image.open(io.BytesIO(data))


def bands(
    size: tuple[int, int], colours: list[tuple[int, int, int]], vertical: bool = True
) -> Image.Image:
    """An RGB image cut into equal bands of `colours`, left to right (or top to bottom)."""
    img = Image.new("RGB", size)
    step = (size[0] if vertical else size[1]) // len(colours)
    for i, colour in enumerate(colours):
        box = (
            (i * step, 0, (i + 1) * step, size[1])
            if vertical
            else (0, i * step, size[0], (i + 1) * step)
        )
        img.paste(colour, box)
    return img


@pytest.mark.parametrize(
    ("size", "frame"),
    [
        ((300, 100), (100, 100)),  # wider: the height fits, the width is cropped
        ((100, 300), (100, 100)),  # taller: the width fits
        ((200, 100), (50, 80)),  # scaled down
        ((20, 30), (640, 480)),  # scaled up
        ((640, 480), (1280, 960)),  # same aspect ratio: the whole background
        ((333, 77), (1001, 999)),  # odd sizes: fractional regions
    ],
)
def test_the_cover_region_has_the_frames_shape_fills_one_axis_and_is_centred(
    size: tuple[int, int], frame: tuple[int, int]
) -> None:
    left, top, right, bottom = cover_region(size, frame)
    width, height = right - left, bottom - top
    assert width / height == pytest.approx(frame[0] / frame[1])
    assert 0 <= left <= right <= size[0] and 0 <= top <= bottom <= size[1]
    assert width == pytest.approx(size[0]) or height == pytest.approx(size[1])
    assert left == pytest.approx(size[0] - right) and top == pytest.approx(size[1] - bottom)


def test_cover_keeps_the_centre_band_of_a_wider_background() -> None:
    out = np.asarray(cover(bands((300, 100), [RED, GREEN, BLUE]), (100, 100)))
    assert out.shape == (100, 100, 3)
    assert (out[:, 2:-2] == GREEN).all()  # Lanczos may mix in the neighbours at the very edge


def test_cover_keeps_the_centre_band_of_a_taller_background() -> None:
    out = np.asarray(cover(bands((90, 300), [RED, GREEN, BLUE], vertical=False), (60, 40)))
    assert out.shape == (40, 60, 3)
    assert (out[2:-2] == GREEN).all()


def test_cover_scales_up_and_crops_the_overflow_equally() -> None:
    """A 400x100 background (red, green, blue, red bands) on a 300x300 frame: scaled 3 times,
    its middle 100x100 kept: half the green band left of its centre line, half the blue right
    (Lanczos rings for a few pixels either side of the line)."""
    out = np.asarray(cover(bands((400, 100), [RED, GREEN, BLUE, RED]), (300, 300)))
    assert out.shape == (300, 300, 3)
    assert (out[:, :138] == GREEN).all() and (out[:, 162:] == BLUE).all()


def test_a_background_of_the_frames_size_is_kept_as_it_is() -> None:
    rng = np.random.default_rng(7)
    noise = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    out = cover(noise, (64, 48))
    assert out is not noise and np.array_equal(np.asarray(out), np.asarray(noise))


def test_a_transparent_background_is_flattened_over_white() -> None:
    half = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    half.paste((10, 20, 30, 255), (0, 0, 20, 20))
    out = np.asarray(decoded(opened(encoded(half))))
    assert out.shape == (20, 40, 3)
    assert (out[:, :20] == (10, 20, 30)).all() and (out[:, 20:] == 255).all()


def test_a_palette_background_becomes_rgb() -> None:
    palette = bands((30, 10), [RED, GREEN, BLUE]).convert("P")
    out = decoded(opened(encoded(palette)))
    assert out.mode == "RGB" and out.getpixel((15, 5)) == GREEN


def test_a_background_is_turned_as_its_exif_says() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encoded(bands((60, 20), [RED, BLUE]), "JPEG", exif=exif, quality=95)
    out = decoded(opened(data))
    assert out.size == (20, 60)  # turned upright
    top, bottom = np.asarray(out)[5, 10], np.asarray(out)[-5, 10]
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # red above, blue below


def stored(tmp_path: Path, data: bytes) -> tuple[FileStore, Options]:
    store = FileStore(tmp_path / "store")
    digest = input_digest(data)
    store.put_input(digest, data)
    return store, Options(bg_image=digest)


def test_open_background_reads_the_header_only(tmp_path: Path) -> None:
    store, options = stored(tmp_path, encoded(bands((40, 30), [RED, GREEN])))
    header = open_background(store, options, defaults.MAX_MEGAPIXELS)
    assert header is not None and header.size == (40, 30)
    assert open_background(store, Options(), defaults.MAX_MEGAPIXELS) is None


@pytest.mark.parametrize(
    ("data", "error", "why"),
    [
        (b"not an image at all", InvalidImage, "not a recognised image"),
        (b"", InvalidImage, "empty input"),
        (encoded(Image.new("1", (5000, 5000))), ImageTooLarge, "over the BGQ_MAX_MEGAPIXELS"),
    ],
)
def test_a_bad_background_is_refused_naming_bg_image(
    tmp_path: Path, data: bytes, error: type[Exception], why: str
) -> None:
    """The checks of an input, before any pixel is decoded (here with a 20 MP limit)."""
    store, options = stored(tmp_path, data)
    with pytest.raises(error, match=f"^bg_image: .*{why}"):
        open_background(store, options, 20)


def test_a_truncated_background_fails_when_decoded_naming_bg_image(tmp_path: Path) -> None:
    data = encoded(Image.effect_noise((300, 200), 40).convert("RGB"))
    store, options = stored(tmp_path, data[: len(data) // 2])
    header = open_background(store, options, defaults.MAX_MEGAPIXELS)  # the header is whole
    assert header is not None
    with pytest.raises(InvalidImage, match=r"^bg_image: truncated or corrupt PNG"):
        decoded(header)


# Composites under rembg's cutouts of real photos.


@pytest.fixture(scope="module")
def cutout(reference: Callable[..., bytes]) -> Image.Image:
    with Image.open(io.BytesIO(reference(sample_bytes("anime-girl-1.jpg")))) as im:
        return im.copy()


def shaped_over(cutout: Image.Image, background: bytes, **options: Any) -> Image.Image:
    """The decoded output of `render` over `background` (bg_image's digest stands in)."""
    over = Options(bg_image=input_digest(background), **options)
    with Image.open(io.BytesIO(render(cutout, over, "fast", 6, opened(background)))) as im:
        im.load()
        return im


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
@pytest.mark.parametrize("shaping", [{}, {"crop": True, "canvas": "500x400", "padding": "5%"}])
def test_the_output_is_opaque_with_the_background_where_the_cutout_is_transparent(
    cutout: Image.Image, fmt: str, shaping: dict[str, Any]
) -> None:
    background = variant("car-1.jpg", (0, 0, 400, 300), "PNG")
    out = shaped_over(cutout, background, format=fmt, **shaping)
    assert out.mode == "RGB"  # opaque in every format
    plain = np.asarray(Image.open(io.BytesIO(render(cutout, Options(**shaping), "fast", 6))))
    assert out.size == (plain.shape[1], plain.shape[0])
    alpha = plain[..., 3]
    want_bg = np.asarray(cover(decoded(opened(background)), out.size)).astype(int)
    got = np.asarray(out).astype(int)
    clear, solid = alpha == 0, alpha == 255
    assert clear.any() and solid.any()
    if fmt == "png":  # lossless: exactly the background's pixels, exactly the subject's
        assert np.array_equal(got[clear], want_bg[clear])
        assert np.array_equal(got[solid], plain[..., :3][solid])
    else:
        assert np.abs(got[clear] - want_bg[clear]).mean() < 4
        assert np.abs(got[solid] - plain[..., :3][solid].astype(int)).mean() < 4


def test_the_composite_blends_by_alpha() -> None:
    img = Image.new("RGBA", (4, 1))
    for x, a in enumerate((0, 64, 191, 255)):
        img.putpixel((x, 0), (200, 0, 0, a))
    out = composite(img, opened(encoded(Image.new("RGB", (4, 1), (0, 0, 200)))))
    reds = [out.getpixel((x, 0))[0] for x in range(4)]
    blues = [out.getpixel((x, 0))[2] for x in range(4)]
    assert reds[0] == 0 and reds[3] == 200 and reds == sorted(reds)
    assert blues[0] == 200 and blues[3] == 0 and blues == sorted(blues, reverse=True)


def test_render_takes_a_background_exactly_with_bg_image(cutout: Image.Image) -> None:
    background = opened(encoded(Image.new("RGB", (8, 8))))
    with pytest.raises(ValueError, match="bg_image"):
        render(cutout, Options(), "fast", 6, background)
    with pytest.raises(ValueError, match="bg_image"):
        render(cutout, Options(bg_image="0" * 64), "fast", 6)


# The memory model.


def test_a_background_adds_its_pixels_and_the_outputs_to_the_estimate() -> None:
    over = Options(bg_image="0" * 64, canvas="4000x4000")
    without = estimated_peak_mib(2.0, Options(canvas="4000x4000"))
    assert estimated_peak_mib(2.0, over, 0.0) - without == pytest.approx(
        defaults.BACKGROUND_MIB_PER_MP * 16
    )
    assert estimated_peak_mib(2.0, over, 30.0) - estimated_peak_mib(
        2.0, over, 10.0
    ) == pytest.approx(defaults.BACKGROUND_MIB_PER_MP * 20)


@pytest.mark.parametrize(
    "options",
    [
        {"alpha_matting": True},  # peaks in rembg: the file, read before the input, is held
        {"canvas": "4000x4000"},  # peaks in shaping: the file is held until it is decoded
    ],
)
def test_a_backgrounds_file_counts_at_its_size_in_either_phase(options: dict[str, Any]) -> None:
    """Not by its megapixels: a 16-bit PNG, or one with data after its end, is far larger."""
    over = Options(bg_image="0" * 64, **options)
    assert estimated_peak_mib(10.0, over, 5.0, 300.0) - estimated_peak_mib(
        10.0, over, 5.0
    ) == pytest.approx(300.0)
    assert shaping_peak_mib(10.0, over, 5.0, 300.0) - shaping_peak_mib(
        10.0, over, 5.0
    ) == pytest.approx(300.0)


def test_a_backgrounds_file_is_measured_to_the_byte() -> None:
    """20 MiB after a small PNG's end: Pillow opens it, and the estimate counts each byte."""
    small_input = Image.new("RGB", (100, 100))  # check_memory reads the sizes only
    image = encoded(bands((100, 100), [RED, GREEN]))
    padded = opened(image + bytes(20 * 2**20))
    options = Options(bg_image="0" * 64)
    assert file_mib(padded) == pytest.approx(20 + len(image) / 2**20)
    check_memory(small_input, options, defaults.POOL_BASE_MIB + 10, opened(image))
    with pytest.raises(ImageTooLarge, match=r"over a 100x100 bg_image \(a 20.0 MiB file\)"):
        check_memory(small_input, options, defaults.POOL_BASE_MIB + 10, padded)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "WEBP"])
def test_a_backgrounds_file_is_freed_once_decoded(fmt: str) -> None:
    """Its bytes are not held through shaping: only its pixels are (turned by its EXIF,
    which a TIFF's file holds)."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # turned a quarter
    data = encoded(bands((40, 30), [RED, GREEN]), fmt, exif=exif)
    header = open_header(data, defaults.MAX_MEGAPIXELS)
    held = sys.getrefcount(data)
    out = decoded(header)
    assert sys.getrefcount(data) == held - 1  # the file Pillow kept open on them is closed
    assert file_mib(header) == 0
    assert out.size == (30, 40) and out.mode == "RGB"


def test_a_background_too_big_for_the_memory_limit_is_refused_before_decoding() -> None:
    small_input = Image.new("RGB", (100, 100))  # check_memory reads the sizes only
    huge = opened(encoded(Image.new("1", (7000, 7000))))  # its header: 49 MP
    options = Options(bg_image="0" * 64)
    check_memory(small_input, options, defaults.MAX_MEMORY_PER_CHILD_MB)  # no background size
    with pytest.raises(ImageTooLarge, match="over a 7000x7000 bg_image"):
        check_memory(small_input, options, 1024, huge)


# Through a real worker: Producer.put_image, the job, and the background's life in the store.


def test_a_bg_image_job_composites_over_the_stored_background(
    producer: Producer, reference: Callable[..., bytes]
) -> None:
    data = variant("cloth-1.jpg", (0, 0, 320, 400))
    background = variant("car-1.jpg", (0, 0, 500, 300), "PNG")
    digest = producer.put_image(background)
    assert digest == input_digest(background)
    job = producer.submit(data, bg_image=digest)
    with Image.open(io.BytesIO(job.read(timeout=120))) as out:
        out.load()
    assert out.mode == "RGB" and out.size == (320, 400)  # opaque, the input's frame
    cut = np.asarray(Image.open(io.BytesIO(reference(data))))
    alpha, got = cut[..., 3], np.asarray(out)
    want_bg = np.asarray(cover(decoded(opened(background)), out.size))
    clear, solid = alpha == 0, alpha == 255
    assert clear.any() and solid.any()
    assert np.array_equal(got[clear], want_bg[clear])  # the background's pixels
    assert np.array_equal(got[solid], cut[..., :3][solid])  # the subject's
    assert producer.submit(data, bg_image=digest).cached
    other = producer.put_image(variant("car-1.jpg", (50, 0, 550, 300), "PNG"))
    assert producer.submit(data, bg_image=other).key != job.key


def test_put_image_checks_the_background_as_an_input(producer: Producer) -> None:
    with pytest.raises(InvalidImage, match="not a recognised image"):
        producer.put_image(b"not an image")
    with pytest.raises(ImageTooLarge, match="BGQ_MAX_MEGAPIXELS"):
        producer.put_image(encoded(Image.new("1", (8000, 8000))))
    noise = encoded(Image.effect_noise((200, 200), 40))  # about 40 KB
    tiny = encoded(Image.new("RGB", (20, 20)))
    with Producer(producer.settings.model_copy(update={"max_upload_mb": 0.01})) as small:
        with pytest.raises(ImageTooLarge, match=r"over the BGQ_MAX_UPLOAD_MB limit of 0.01 MiB"):
            small.put_image(noise)
        assert small.store.stat(INPUTS, input_digest(noise)) is None  # nothing stored
        assert small.put_image(tiny) == input_digest(tiny)  # under the limit
    missing = input_digest(b"never stored")
    with pytest.raises(InvalidImage, match=f"bg_image: no image {missing} in the store"):
        producer.submit(variant("car-1.jpg", (0, 0, 200, 200)), bg_image=missing)


def test_a_background_the_worker_cannot_decode_fails_the_job_for_good(
    producer: Producer,
) -> None:
    """Stored without put_image's check (straight into the store): the worker's own check
    fails the job, permanently, naming bg_image."""
    whole = encoded(Image.effect_noise((300, 200), 40).convert("RGB"))
    truncated = whole[: len(whole) // 2]
    producer.store.put_input(input_digest(truncated), truncated)
    job = producer.submit(variant("car-1.jpg", (0, 0, 240, 200)), bg_image=input_digest(truncated))
    with pytest.raises(JobFailed, match="bg_image: truncated or corrupt PNG") as failed:
        job.wait(timeout=120)
    assert failed.value.permanent


def test_the_background_survives_a_prune_while_its_job_waits(
    stack: LocalStack, producer: Producer, redis_client: redis.Redis
) -> None:
    """A job waits (its worker stopped consuming) while its background is older than prune's
    grace: prune keeps it (the job's reference), and removes it once the job is done."""
    store = producer.store
    assert isinstance(store, FileStore)
    data = variant("anime-girl-1.jpg", (0, 0, 300, 300))
    digest = producer.put_image(variant("cloth-1.jpg", (0, 0, 300, 200), "PNG"))
    path = store.path(INPUTS, digest)
    control = LocalStackControl(stack)
    control.pause()
    try:
        job = producer.submit(data, bg_image=digest)
        assert producer.task_meta(job.key)["status"] == "PENDING"
        assert redis_client.sismember(contract.input_refs_key(digest), job.key)
        age(path)
        stale, _ = stale_leftovers(store)  # an old input no job needs: this prune removes it
        report = cache.prune(store, redis_client)
        assert not stale.exists() and report.inputs_removed >= 1  # inputs were pruned
        assert path.exists() and report.inputs_kept >= 1  # but not the background
    finally:
        control.resume()
    assert Image.open(io.BytesIO(job.read(timeout=120))).mode == "RGB"
    settle(redis_client, job.key)
    assert not redis_client.exists(contract.input_refs_key(digest))  # the job's end released it
    age(path)
    cache.prune(store, redis_client)
    assert not path.exists()  # no job needs it any more


def age(path: Path) -> None:
    """Make a stored input older than prune's grace period for unreferenced inputs."""
    old = time.time() - 2 * defaults.PRUNE_INPUT_GRACE
    os.utime(path, (old, old))
