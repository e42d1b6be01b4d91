"""The geometry of roi, crop margins, scale, position and fit_megapixels (workers/layout.py), on
small synthetic images where every box is known to the pixel; and their memory estimate."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bgq import defaults
from bgq.options import Options
from workers.imaging import estimated_peak_mib, shaping_peak_mib
from workers.layout import arrange, crop_box, megapixels_size
from workers.shaping import render

OPAQUE = {"RGBA": (200, 100, 50, 255), "L": 255}


def frame(size: tuple[int, int], *boxes: tuple[int, int, int, int], mode: str = "RGBA") -> Any:
    """An empty frame with opaque rectangles (subjects) at `boxes`."""
    img = Image.new(mode, size, 0)
    for box in boxes:
        img.paste(OPAQUE[mode], box)
    return img


def subject(img: Image.Image) -> tuple[int, int, int, int] | None:
    return (img.getchannel("A") if img.mode == "RGBA" else img).getbbox()


def arranged(img: Image.Image, **options: Any) -> Image.Image:
    return arrange(img, Options.parse(options))


@pytest.mark.parametrize("mode", ["RGBA", "L"])
@pytest.mark.parametrize(
    ("roi", "kept"),
    [
        ("2 1 50% 75%", (2, 1, 5, 6)),  # x's % of the width (10), y's of the height (8)
        ("2px 1px 5px 6px", (2, 1, 5, 6)),
        ("5px 0 99999px 100%", (5, 0, 10, 8)),  # clipped to the image
        ("0 0 10% 12.5%", (0, 0, 1, 1)),
    ],
)
def test_roi_keeps_only_its_rectangle(mode: str, roi: str, kept: tuple[int, ...]) -> None:
    img = frame((10, 8), (0, 0, 10, 8), mode=mode)
    out = arranged(img, roi=roi)
    assert out.size == img.size and out.mode == mode
    assert subject(out) == kept
    inside = out.crop(kept)
    assert inside.tobytes() == img.crop(kept).tobytes()  # the subject's pixels, untouched
    nothing = Image.new(mode, out.size, 0)
    nothing.paste(inside, kept[:2])
    assert out.tobytes() == nothing.tobytes()  # outside: (0,0,0,0), or mask 0


@pytest.mark.parametrize("roi", ["8px 0 50% 100%", "0 99999px 100% 100%"])
def test_a_roi_past_its_own_end_on_this_image_leaves_only_background(roi: str) -> None:
    img = frame((10, 8), (0, 0, 10, 8))
    out = arranged(img, roi=roi)
    assert out.size == (10, 8) and subject(out) is None


@pytest.mark.parametrize(
    ("margin", "box"),
    [
        ("1px 2px 3px 4px", (0, 2, 10, 9)),  # top 1, right 2, bottom 3, left 4 (clipped at 0)
        ("1 2", (2, 2, 10, 7)),  # top and bottom 1, left and right 2
        ("50% 25%", (3, 1, 9, 8)),  # 50% of the box's height (3 -> 2), 25% of its width (4 -> 1)
        ("0 100% 0 0", (4, 3, 12, 6)),
        ("3", (1, 0, 11, 9)),
    ],
)
def test_crop_margins_per_side(margin: str, box: tuple[int, ...]) -> None:
    img = frame((20, 12), (4, 3, 8, 6))
    assert crop_box(img, margin) == box
    assert arranged(img, crop=True, crop_margin=margin).size == (box[2] - box[0], box[3] - box[1])


@pytest.mark.parametrize("mode", ["RGBA", "L"])
@pytest.mark.parametrize(
    ("scale", "position", "box"),
    [
        ("original", "100% 100%", (16, 8, 20, 10)),
        ("original", "0%", (0, 0, 4, 2)),
        ("original", "center", (8, 4, 12, 6)),  # free 16 x 8: half of each
        ("original", "33.33% 50%", (5, 4, 9, 6)),  # 16 x 33.33% = 5.33, floored
        ("original", "top", (8, 0, 12, 2)),
        ("50%", "center", (5, 2, 15, 7)),  # 4x2 fitted into 10x5: 10x5, free 10 x 5
        ("50%", "0% 100%", (0, 5, 10, 10)),
        ("100%", "center", (0, 0, 20, 10)),
        ("10%", "100% 0%", (18, 0, 20, 1)),  # 4x2 into 2x1
    ],
)
def test_scale_puts_the_subject_at_its_position(
    mode: str, scale: str, position: str, box: tuple[int, ...]
) -> None:
    img = frame((20, 10), (1, 1, 5, 3), mode=mode)
    out = arranged(img, scale=scale, position=position)
    assert out.size == (20, 10) and out.mode == mode
    assert subject(out) == box


def test_scale_of_a_frame_without_a_subject_is_the_empty_frame() -> None:
    out = arranged(frame((20, 10)), scale="50%", position="0% 0%")
    assert out.size == (20, 10) and subject(out) is None


def test_scale_follows_crop_and_roi_in_that_order() -> None:
    """Two subjects: the roi keeps the left one, crop frames it with its margin, scale moves
    it to the bottom right of that frame."""
    img = frame((40, 20), (2, 2, 6, 10), (30, 5, 38, 15))
    options = {"roi": "0 0 50% 100%", "crop": True, "crop_margin": "2px", "scale": "original"}
    out = arranged(img, **options, position="100%")
    assert out.size == (8, 12)  # the left subject (4x8) and 2 px each side
    assert subject(out) == (4, 4, 8, 12)


@pytest.mark.parametrize(
    ("position", "box"),
    [("0% 0%", (0, 0, 20, 20)), ("100%", (10, 0, 30, 20)), ("75% 0%", (7, 0, 27, 20))],
)
def test_canvas_positions_in_percent(position: str, box: tuple[int, ...]) -> None:
    out = arranged(frame((10, 10), (0, 0, 10, 10)), canvas="30x20", position=position)
    assert out.size == (30, 20) and subject(out) == box


@pytest.mark.parametrize(
    ("keyword", "percent"), [("center", "50%"), ("top", "50% 0%"), ("bottom", "50% 100%")]
)
@pytest.mark.parametrize("canvas", ["31x17", "17x31"])  # odd free space each way
def test_a_keyword_and_its_percentages_place_alike(keyword: str, percent: str, canvas: str) -> None:
    img = frame((10, 6), (1, 1, 9, 5))
    by_keyword = arranged(img, canvas=canvas, padding="2px", position=keyword)
    assert (
        by_keyword.tobytes()
        == arranged(img, canvas=canvas, padding="2px", position=percent).tobytes()
    )


KEYWORDS = {"center": "50% 50%", "top": "50% 0%", "bottom": "50% 100%"}  # and their percents
# The boxes de89114's place gave for center, top and bottom: a keyword keeps its pixels (and its
# key) where a percent padding rounds to half a side and leaves no room (20x6 at 49%) too.
KEYWORD_BOXES = [
    ((10, 10), "20x6", "49%", ((10, 3, 11, 4), (10, 3, 11, 4), (10, 2, 11, 3))),
    ((10, 10), "6x20", "49%", ((3, 10, 4, 11), (3, 10, 4, 11), (3, 9, 4, 10))),
    ((10, 10), "30x2", "49%", ((15, 1, 16, 2), (15, 1, 16, 2), (15, 0, 16, 1))),
    ((7, 3), "40x12", "46%", ((19, 6, 21, 7), (19, 6, 21, 7), (19, 5, 21, 6))),
    ((10, 6), "17x31", "2px", ((2, 11, 15, 19), (2, 2, 15, 10), (2, 21, 15, 29))),  # room left
]


@pytest.mark.parametrize(("size", "canvas", "padding", "boxes"), KEYWORD_BOXES, ids=str)
def test_a_keyword_places_as_before_percent_positions(
    size: tuple[int, int], canvas: str, padding: str, boxes: tuple[tuple[int, ...], ...]
) -> None:
    img = frame(size, (0, 0, *size))
    for (keyword, percent), box in zip(KEYWORDS.items(), boxes, strict=True):
        out = arranged(img, canvas=canvas, padding=padding, position=keyword)
        assert subject(out) == box, keyword
        same_key = arranged(img, canvas=canvas, padding=padding, position=percent)
        assert same_key.tobytes() == out.tobytes(), percent  # one cache key, one output


@pytest.mark.parametrize(
    ("size", "megapixels", "fitted"),
    [
        ((1000, 1000), 0.25, (500, 500)),
        ((640, 480), 0.0768, (320, 240)),  # exactly the limit: no pixel lost to rounding
        ((4000, 3000), 3, (2000, 1500)),
        ((1000, 1000), 0.3, (547, 547)),
        ((100, 100), 1, (100, 100)),  # never scaled up
        ((100, 100), 0.01, (100, 100)),  # exactly fits
        ((100000, 1), 1e-5, (10, 1)),  # at least 1 px a side, the other cut to the limit
        ((1, 100000), 1e-5, (1, 10)),
        ((5, 5), 1e-7, (1, 1)),
    ],
)
def test_fit_megapixels_size(
    size: tuple[int, int], megapixels: float, fitted: tuple[int, int]
) -> None:
    assert megapixels_size(size, megapixels) == fitted
    assert fitted[0] * fitted[1] <= max(1, megapixels * 1e6 + 1e-6)


@pytest.mark.parametrize("megapixels", [0.001, 0.0123, 0.5, 0.77777, 1.9999])
@pytest.mark.parametrize("size", [(1920, 1080), (1081, 1921), (3001, 2999), (7, 1500)])
def test_fit_megapixels_is_at_most_the_limit_keeping_the_aspect(
    size: tuple[int, int], megapixels: float
) -> None:
    width, height = megapixels_size(size, megapixels)
    if size[0] * size[1] <= megapixels * 1e6:
        assert (width, height) == size  # never scaled up
        return
    assert width * height <= megapixels * 1e6
    assert width <= size[0] and height <= size[1]
    if min(width, height) > 1:  # within a pixel of the aspect ratio, and of the limit
        assert abs(width / height - size[0] / size[1]) <= size[0] / size[1] / min(width, height)
        assert width * height > megapixels * 1e6 * (1 - 2 / min(width, height))


@pytest.mark.parametrize(
    ("size", "asked", "fitted"),
    [
        ((1000, 1000), "0.2499999999", (499, 499)),  # 249,999.9999 px: 500x500 is over it
        ((100, 1), "2.0999999e-05", (20, 1)),  # 20.999999 px: 21 is over it
        ((1000, 1000), "0.2500005", (500, 500)),
    ],
)
def test_fit_megapixels_never_goes_over_the_limit_asked(
    size: tuple[int, int], asked: str, fitted: tuple[int, int]
) -> None:
    """The option keeps six significant digits: cut, not rounded up past what was asked."""
    out = arranged(frame(size, (0, 0, *size)), fit_megapixels=asked)
    assert out.size == fitted
    assert out.width * out.height <= float(asked) * 1e6


def test_fit_megapixels_comes_after_the_canvas_and_before_the_background() -> None:
    img = frame((100, 50), (10, 10, 90, 40))
    options = Options(canvas="2000x1000", fit_megapixels=0.5, bgcolor=(0, 0, 255, 255))
    with Image.open(io.BytesIO(render(img, options, "fast", 6))) as out:
        assert out.size == (1000, 500)
        assert out.getpixel((0, 0)) == (0, 0, 255, 255) == out.getpixel((999, 499))


def test_scale_then_bgcolor_fills_the_whole_frame() -> None:
    img = frame((40, 20), (2, 2, 6, 10))
    options = Options(scale="50%", position="100% 100%", bgcolor=(10, 20, 30, 255))
    with Image.open(io.BytesIO(render(img, options, "fast", 6))) as out:
        assert out.size == (40, 20)
        assert out.getpixel((0, 0)) == (10, 20, 30, 255)
        assert out.getpixel((39, 19)) == OPAQUE["RGBA"]  # the subject, moved to the corner


@pytest.mark.parametrize(
    "options",
    [
        {"roi": "0 0 100px 100px"},
        {"fit_megapixels": 0.0006},
        {"scale": "original"},
        {"scale": "100%", "position": "0%"},
        {"crop": True, "roi": "0 0 30 20", "fit_megapixels": 1},
    ],
    ids=str,
)
def test_a_transform_with_nothing_to_do_keeps_every_pixel(options: dict[str, Any]) -> None:
    """A roi of the whole image, a fit it already meets, a subject that fills the frame."""
    noise = np.random.default_rng(25).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    noise[..., 3] = 255
    img = Image.fromarray(noise, "RGBA")
    assert arranged(img, **options).tobytes() == img.tobytes()


# --- memory ----------------------------------------------------------------------------------


def test_each_transform_adds_its_own_memory() -> None:
    base = estimated_peak_mib(40, Options(format="webp"))
    for extra in [{"roi": "0 0 9 9"}, {"scale": "original"}, {"fit_megapixels": 1}]:
        assert estimated_peak_mib(40, Options(format="webp", **extra)) > base, extra
    assert estimated_peak_mib(40, Options(scale="50%")) > estimated_peak_mib(
        40, Options(scale="original")
    )


def test_scale_at_the_megapixel_limit_fits_the_default_memory_limit() -> None:
    peak = estimated_peak_mib(defaults.MAX_MEGAPIXELS, Options(scale="80%"))
    assert peak <= defaults.MAX_MEMORY_PER_CHILD_MB


MEASURE = """
import json, re, sys
from PIL import Image
from bgq.options import Options
from workers.shaping import render

def mib(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024

options = Options(**json.loads(sys.argv[1]))
render(Image.new("RGBA", (64, 64), (1, 1, 1, 255)), options, "fast", 6)  # imports done
cutout = Image.new("RGBA", (4000, 3000), 0)
cutout.paste((200, 100, 50, 255), (0, 0, 3999, 2999))
before = mib("VmRSS") - 4000 * 3000 * 4 / 2**20  # the estimate counts the cutout
open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here
render(cutout, options, "fast", 6)
print(mib("VmHWM") - before)
"""


@pytest.mark.parametrize(
    "options",
    [
        {"scale": "99%"},
        {"roi": "0 0 100% 99%", "crop": True, "scale": "100%"},
        {"roi": "0 0 100% 99%", "scale": "100%", "format": "webp", "fit_megapixels": 11},
        {"scale": "original", "fit_megapixels": 3, "format": "jpeg"},
    ],
    ids=str,
)
def test_the_estimate_is_above_the_measured_peak(options: dict[str, Any]) -> None:
    """The shaping peak of a 12 MP cutout (VmHWM, in a fresh process) stays under its estimate."""
    run = [sys.executable, "-c", MEASURE, json.dumps(options)]
    done = subprocess.run(run, capture_output=True, text=True, check=True, timeout=120)
    measured = float(done.stdout)
    estimate = shaping_peak_mib(12, Options(**options)) - defaults.POOL_BASE_MIB
    assert 4 * 12 < measured < estimate, (measured, estimate)  # more than the cutout alone
