"""A synthetic product catalog: distinct 1920x1080 JPEGs made from the sample photos."""

from __future__ import annotations

import itertools
from pathlib import Path

from PIL import Image, ImageOps

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
SIZE = (1920, 1080)  # pixels of every catalog image
QUALITY = 90  # JPEG quality


def _variant(photo: Image.Image, index: int) -> Image.Image:
    """A distinct 1920x1080 frame: the photo scaled, cropped off-centre and maybe mirrored."""
    scale = 1.1 + 0.15 * (index % 4)
    cx = 0.5 + 0.08 * ((index // 4) % 3 - 1)
    fitted = ImageOps.cover(photo, (int(SIZE[0] * scale), int(SIZE[1] * scale)))
    left = int((fitted.width - SIZE[0]) * cx)
    top = (fitted.height - SIZE[1]) // 2
    frame = fitted.crop((left, top, left + SIZE[0], top + SIZE[1]))
    if (index // 12) % 2:
        frame = ImageOps.mirror(frame)
    return frame


def build(folder: Path, count: int) -> list[Path]:
    """Write `count` distinct JPEGs (nested in a few subfolders) into `folder`; reuse if present."""
    photos = [Image.open(p).convert("RGB") for p in sorted(SAMPLES.glob("*.jpg"))]
    paths = []
    for index, photo in zip(range(count), itertools.cycle(photos)):
        path = folder / f"set{index % 3}" / f"img{index:05d}.jpg"
        paths.append(path)
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        _variant(photo, index // len(photos)).save(path, "JPEG", quality=QUALITY)
    return paths
