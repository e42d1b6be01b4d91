"""Per-stage seconds of one worker's path on 1920x1080 JPEGs: `python -m bench.profile`.

Replays what rembg.remove() does for u2netp stage by stage (same calls, so the same pixels)
to show where a worker's time goes, and times the PNG encoders bgq can use.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from bench.catalog import build
from bgq.settings import load_settings
from workers import imaging, session


def model_input(sess: Any, img: Image.Image) -> dict[str, Any]:
    """u2netp's input tensor for `img`, exactly as rembg's U2netpSession.predict makes it."""
    return sess.normalize(img, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (320, 320))


def _timed(results: dict[str, list[float]], stage: str, func: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    value = func()
    results[stage].append(time.perf_counter() - start)
    return value


def profile(paths: list[Path], threads: int) -> dict[str, list[float]]:
    """Seconds per stage for each image, single process."""
    from rembg import bg

    settings = load_settings(ort_threads=threads)
    sess = session.get("u2netp", settings)
    inner = sess.inner_session
    t: dict[str, list[float]] = defaultdict(list)
    for path in paths:
        data = _timed(t, "read", path.read_bytes)
        _timed(t, "sha256", lambda: hashlib.sha256(data).hexdigest())
        img = _timed(t, "decode", lambda: Image.open(io.BytesIO(data)).convert("RGB"))
        img = _timed(t, "exif transpose", lambda: ImageOps.exif_transpose(img))
        feed = _timed(t, "resize to 320 + normalise", lambda: model_input(sess, img))
        out = _timed(t, "inference", lambda: inner.run(None, feed))

        def mask() -> Image.Image:
            pred = out[0][:, 0, :, :]
            pred = np.squeeze((pred - pred.min()) / (pred.max() - pred.min()))
            small = Image.fromarray((pred * 255).astype("uint8"), mode="L")
            return small.resize(img.size, Image.Resampling.LANCZOS)

        m = _timed(t, "mask resize", mask)
        cut = _timed(t, "cutout", lambda: bg.get_concat_v_multi([bg.naive_cutout(img, m)]))
        for encoder, level in (("pillow", 6), ("pillow", 1), ("fast", 1)):
            name = f"PNG {encoder}" + (f" level {level}" if encoder == "pillow" else "")
            png = _timed(t, name, lambda: imaging.encode_png(cut, encoder, level))
            t[f"  bytes, {name}"].append(len(png))
        with tempfile.TemporaryDirectory() as tmp:
            _timed(t, "store write", lambda: (Path(tmp) / "x.png").write_bytes(png))
    return t


def main() -> None:
    """Print the median of each stage over a small catalog."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp), args.images)
        profile(paths[:1], args.threads)  # warm-up
        stages = profile(paths, args.threads)
    print(f"median of {args.images} 1920x1080 JPEGs, u2netp, {args.threads} ORT thread(s)")
    for stage, values in stages.items():
        med = statistics.median(values)
        text = f"{med / 1e6:8.2f} MB" if stage.startswith("  bytes") else f"{med * 1e3:8.1f} ms"
        print(f"  {stage:32} {text}")


if __name__ == "__main__":
    main()
