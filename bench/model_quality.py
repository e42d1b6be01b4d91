"""Which model to use: u2netp and u2net-int8 against u2net fp32 (`make bench-quality`).

u2net-int8 is the dropped experiment (bench/quantize.py), built here into
`$BGQ_HOME/bench/u2net-int8.onnx` when missing. On photos the int8 model was not calibrated on
(scikit-image's sample photos), per photo: mean |mask - u2net's mask| / 255 and IoU of the masks
at 0.5; then ms per inference at 320x320 with one onnxruntime thread for each model.
`--int8 FILE ...` compares other builds (recipe tries).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench import quantize
from bgq.settings import load_settings

# scikit-image's photos with a subject (none of them is a calibration photo).
HELD_OUT = (
    "astronaut.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "horse.png",
    "logo.png",
    "motorcycle_left.png",
    "retina.jpg",
    "rocket.jpg",
)
REFERENCE = "u2net"
MODELS = ("u2netp", quantize.NAME)


@dataclass(frozen=True)
class Agreement:
    photo: str
    mad: float  # mean |mask - reference| / 255
    iou: float  # of the masks thresholded at 0.5


def held_out_folder() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


def held_out_photos(names: tuple[str, ...] = HELD_OUT) -> dict[str, Image.Image]:
    return {name: Image.open(held_out_folder() / name).convert("RGB") for name in names}


def session(name: str) -> Any:
    """A rembg session with one intra-op thread, its weights fetched into BGQ_HOME's models
    folder (u2net-int8's: built under `$BGQ_HOME/bench/`) if missing."""
    import onnxruntime as ort
    from rembg import new_session

    from workers import models

    if name == quantize.NAME:
        return int8_session(quantize.ensure())
    models.fetch(name, load_settings().model_home)  # fetched if missing; sets U2NET_HOME
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    return new_session(name, sess_opts=opts)


def mask(sess: Any, photo: Image.Image) -> np.ndarray:
    return np.asarray(sess.predict(photo)[0], dtype=np.float32)


def agreement(photo: str, got: np.ndarray, ref: np.ndarray) -> Agreement:
    a, b = got >= 127.5, ref >= 127.5
    union = np.logical_or(a, b).sum()
    iou = float(np.logical_and(a, b).sum() / union) if union else 1.0
    return Agreement(photo, float(np.abs(got - ref).mean() / 255), iou)


def ms_per_inference(sessions: dict[str, Any], photo: Image.Image, runs: int) -> dict[str, float]:
    """Median ms per inference of each session, taken in turns so that load elsewhere on the
    machine slows them alike."""
    feeds = {
        label: sess.normalize(photo, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (320, 320))
        for label, sess in sessions.items()
    }
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for turn in range(runs + 1):
        for label, sess in sessions.items():
            start = time.perf_counter()
            sess.inner_session.run(None, feeds[label])
            if turn:  # the first turn warms up
                times[label].append((time.perf_counter() - start) * 1000)
    return {label: statistics.median(t) for label, t in times.items()}


def report(label: str, rows: list[Agreement]) -> None:
    for row in rows:
        print(f"  {label:<24} {row.photo:<20} |diff| {row.mad * 255:6.2f}/255  IoU {row.iou:.3f}")
    worst = min(rows, key=lambda r: r.iou)
    mad = statistics.mean(r.mad for r in rows) * 255
    iou = statistics.mean(r.iou for r in rows)
    print(
        f"{label}: |diff| {mad:.2f}/255, IoU mean {iou:.3f}, worst {worst.iou:.3f} ({worst.photo})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--int8", nargs="*", type=Path, default=[], help="other u2net-int8 files")
    parser.add_argument("--runs", type=int, default=5, help="timed inferences per model")
    parser.add_argument("--models", nargs="*", default=MODELS, help="models to compare")
    parser.add_argument(
        "--photos", nargs="*", choices=HELD_OUT, default=HELD_OUT, help="a quick subset"
    )
    args = parser.parse_args()
    photos = held_out_photos(tuple(args.photos))
    ref_sess = session(REFERENCE)
    refs = {name: mask(ref_sess, im) for name, im in photos.items()}
    candidates = [(m, session(m)) for m in args.models]
    candidates += [(str(p), int8_session(p)) for p in args.int8]
    for label, sess in candidates:
        report(label, [agreement(n, mask(sess, im), refs[n]) for n, im in photos.items()])
    sessions = {REFERENCE: ref_sess, **dict(candidates)}
    timings = ms_per_inference(sessions, next(iter(photos.values())), args.runs)
    for label, ms in timings.items():
        speedup = timings[REFERENCE] / ms
        print(f"{label:<24} {ms:7.0f} ms per inference (320x320, 1 thread), {speedup:.2f}x u2net")


def int8_session(path: Path) -> Any:
    """A u2net-int8 session on `path` (the build, or a recipe try), one intra-op thread."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    return quantize.session_class(path)(quantize.NAME, opts)


if __name__ == "__main__":
    main()
