"""u2net-int8, a measured experiment (not a bgq model): u2net quantized by onnxruntime's quantizer.

`python -m bench.quantize [OUT]` builds it, deterministically, from u2net's verified weights
(default OUT: `$BGQ_HOME/bench/u2net-int8.onnx`), calibrated on the sample photos as 320x320
PNGs (`bench/calibration/`) and their mirror images, and checks its md5. `register()` makes
`rembg.new_session("u2net-int8")` load it through rembg's `U2netSession`, for the benchmarks.
Why it is not served: docs/models.md ("A quantized u2net: measured, then dropped").
"""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from bgq.errors import ConfigError
from bgq.fileio import atomic_write
from bgq.settings import load_settings

if TYPE_CHECKING:
    from rembg.sessions.base import BaseSession

NAME = "u2net-int8"
SOURCE = "u2net"
CALIBRATION = Path(__file__).with_name("calibration")
MEAN, STD, SIZE = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (320, 320)  # U2netSession's


@dataclass(frozen=True)
class Recipe:
    """How the quantized model is made; `md5` is what the build must produce."""

    md5: str
    method: str = "MinMax"  # onnxruntime.quantization.CalibrationMethod's member name
    exclude: tuple[str, ...] = ()  # nodes left in float, by name
    float_ends: bool = True  # the first conv and the output head left in float (`float_ends`)
    digits: int = 3  # significant digits the calibrated ranges are rounded (outwards) to


RECIPE = Recipe(md5="799299cb806bbb9ad6998247d43c92bf")


def calibration_inputs() -> list[np.ndarray]:
    """The calibration photos and their mirror images, normalized as rembg's U2netSession does."""
    photos = [Image.open(p).convert("RGB") for p in sorted(CALIBRATION.glob("*.png"))]
    return [_normalize(im) for photo in photos for im in (photo, ImageOps.mirror(photo))]


def _normalize(img: Image.Image) -> np.ndarray:
    """rembg's BaseSession.normalize, for one image already at 320x320."""
    ary = np.array(img.resize(SIZE, Image.Resampling.LANCZOS))
    ary = ary / max(np.max(ary), 1e-6)
    out = (ary - np.array(MEAN)) / np.array(STD)
    return np.expand_dims(out.transpose((2, 0, 1)), 0).astype(np.float32)


def quantize(source: Path, recipe: Recipe = RECIPE) -> bytes:
    """`source` (u2net fp32) quantized by `recipe`: the .onnx file's bytes.

    Made in a temporary directory, never in the models folder: a failed build leaves nothing.
    """
    from onnxruntime import quantization as q  # heavy: only when building

    with tempfile.TemporaryDirectory(prefix="bgq-int8-") as tmp:
        work = Path(tmp)
        opset13 = work / "opset13.onnx"
        _convert_opset(source, opset13)
        prepared = work / "prepared.onnx"
        q.quant_pre_process(str(opset13), str(prepared))
        exclude = _check_excluded(prepared, recipe)
        ranges = work / "ranges.json"
        _calibrate(prepared, ranges, recipe, work)
        out = work / "int8.onnx"
        q.quantize_static(
            str(prepared),
            str(out),
            calibration_data_reader=None,
            quant_format=q.QuantFormat.QDQ,
            per_channel=True,
            weight_type=q.QuantType.QInt8,
            activation_type=q.QuantType.QUInt8,
            calibrate_method=q.CalibrationMethod[recipe.method],
            nodes_to_exclude=exclude,
            calibration_cache_path=str(ranges),
        )
        _check_optimized(out)
        return out.read_bytes()


def _convert_opset(source: Path, dest: Path) -> None:
    import onnx
    from onnx import version_converter

    model = version_converter.convert_version(onnx.load(str(source)), 13)
    onnx.save(model, str(dest))


def _check_excluded(model: Path, recipe: Recipe) -> list[str]:
    """The nodes to leave in float; quantize_static ignores unknown names, so they are checked."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    names = {node.name for node in graph.node}
    if missing := sorted(set(recipe.exclude) - names):
        raise ConfigError(f"{NAME}: the recipe excludes nodes the model lacks: {missing}")
    return sorted(set(recipe.exclude) | (set(float_ends(graph)) if recipe.float_ends else set()))


def float_ends(graph: Any) -> list[str]:
    """The first conv (it reads the image) and the head: the side convs, their Resizes, the
    Concat, the fusing conv and the Sigmoids. Their logits span about 250 in 8 bits otherwise."""
    made_by = {out: node for node in graph.node for out in node.output}
    first = next(n for n in graph.node if n.op_type == "Conv" and graph.input[0].name in n.input)
    head, todo = [first.name], [made_by[o.name] for o in graph.output]
    while todo:
        node = todo.pop()
        if node.name in head:
            continue
        head.append(node.name)
        data = node.input if node.op_type == "Concat" else node.input[:1]
        sources = [made_by[i] for i in data if i in made_by]
        if node.op_type != "Conv" or sources[0].op_type == "Concat":  # a side conv: stop
            todo += sources
    return head


def _check_optimized(model: Path) -> None:
    """onnxruntime's optimizer quantizes by itself a float conv between a DequantizeLinear and a
    QuantizeLinear (per tensor): check that the optimized model computes what the file says."""
    import onnxruntime as ort

    feed = calibration_inputs()[0]
    outs = []
    for level in (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    ):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {sess.get_inputs()[0].name: feed})[0])
    if (diff := float(np.abs(outs[0] - outs[1]).mean())) > 0.01:  # 1.5e-4 when all is well
        raise ConfigError(f"{NAME}: optimized by onnxruntime, its mask moves by {diff:.3f}")


def _calibrate(model: Path, ranges: Path, recipe: Recipe, work: Path) -> None:
    """Tensor ranges from one-thread fp32 runs, rounded, saved where quantize_static reads them."""
    import onnxruntime as ort
    from onnxruntime.quantization import calibrate as cal

    calibrator = cal.create_calibrator(
        model,
        augmented_model_path=str(work / "augmented.onnx"),
        calibrate_method=cal.CalibrationMethod[recipe.method],
    )
    with _one_thread(ort):  # fp32 sums' last bits depend on how the threads split them
        calibrator.create_inference_session()
    name = calibrator.infer_session.get_inputs()[0].name
    calibrator.collect_data(_Reader([{name: x} for x in calibration_inputs()]))
    tensors = calibrator.compute_data()
    cal.save_tensors_data(_rounded(tensors, recipe.digits), ranges)
    # save_tensors_data records smooth_quant=False, which is what quantize_static checks


@contextmanager
def _one_thread(ort: Any) -> Iterator[None]:
    """onnxruntime.SessionOptions made with one intra-op thread, while the block runs."""
    original = ort.SessionOptions

    def single() -> Any:
        opts = original()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        return opts

    ort.SessionOptions = single
    try:
        yield
    finally:
        ort.SessionOptions = original


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def _rounded(tensors: Any, digits: int) -> Any:
    """The same ranges, widened to `digits` significant digits: CPU-independent last bits."""
    for data in tensors.data.values():
        data.lowest = _round_array(data.lowest, digits, math.floor)
        data.highest = _round_array(data.highest, digits, math.ceil)
    return tensors


def _round_array(values: np.ndarray, digits: int, direction: Any) -> np.ndarray:
    flat = [_round(float(v), digits, direction) for v in np.asarray(values).ravel()]
    return np.array(flat, values.dtype).reshape(np.shape(values))


def _round(value: float, digits: int, direction: Any) -> float:
    if value == 0 or not math.isfinite(value):
        return value
    scale = 10 ** (digits - 1 - math.floor(math.log10(abs(value))))
    return float(direction(value * scale) / scale)


def default_path() -> Path:
    """Where the benchmarks build and load u2net-int8: `$BGQ_HOME/bench/u2net-int8.onnx`."""
    return load_settings().home / "bench" / f"{NAME}.onnx"


def build(dest: Path) -> Path:
    """u2net (fetched) quantized into `dest`, md5 checked, written atomically; `dest` returned."""
    from workers import models

    data = quantize(models.fetch(SOURCE, load_settings().model_home))
    got = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if got != RECIPE.md5:
        raise ConfigError(f"{NAME} built from {SOURCE}: md5 {got}, expected {RECIPE.md5}")
    atomic_write(dest, data)
    return dest


def ensure(dest: Path | None = None) -> Path:
    """`dest` (default `default_path()`), built first by `python -m bench.quantize` if missing:
    in a child, as calibration leaves hundreds of MiB of freed heap resident."""
    dest = dest or default_path()
    if not dest.is_file():
        subprocess.run([sys.executable, "-m", "bench.quantize", str(dest)], check=True)
    return dest


def session_class(path: Path) -> type[BaseSession]:
    """rembg's U2netSession under the name u2net-int8, loading the file at `path` only."""
    from rembg.sessions.u2net import U2netSession

    class U2netInt8Session(U2netSession):
        """u2net quantized to int8 (QDQ), built by `python -m bench.quantize`."""

        @classmethod
        def name(cls, *args: Any, **kwargs: Any) -> str:
            return NAME

        @classmethod
        def download_models(cls, *args: Any, **kwargs: Any) -> str:
            if not path.is_file():
                raise ConfigError(f"{NAME}: no weights at {path}; run `python -m bench.quantize`")
            return str(path)

    return U2netInt8Session


def register(path: Path | None = None) -> None:
    """Make `rembg.new_session("u2net-int8")` load `path` (default `default_path()`) here."""
    from rembg import sessions

    if NAME in sessions.sessions:
        return
    cls = session_class(path or default_path())
    sessions.sessions[NAME] = cls
    sessions.sessions_class.append(cls)
    sessions.sessions_names.append(NAME)


def main(argv: list[str]) -> int:
    """`python -m bench.quantize [OUT]`: build u2net-int8 into OUT; prints its path."""
    try:
        print(build(Path(argv[0]) if argv else default_path()))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
