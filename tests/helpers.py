"""Test data helpers: the sample photos and fresh variants of them."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
GOLDEN = ROOT / "tests" / "data" / "anime-girl-1.u2netp.png"


def sample_bytes(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def variant(name: str, box: tuple[int, int, int, int], fmt: str = "JPEG") -> bytes:
    """A new image (never seen by the cache) cropped from a sample photo."""
    buf = io.BytesIO()
    Image.open(SAMPLES / name).convert("RGB").crop(box).save(buf, fmt)
    return buf.getvalue()
