"""Throughput of `bgq ingest` against `rembg p` and the model-bound limit: `make bench`.

Prints img/s for, alternating and repeated:
  1. `rembg p -m u2netp SRC OUT`, whole command;
  2. `bgq ingest SRC --out OUT`, cold (empty store), workers already running (as `bgq up`) and
     warmed up by one ingest of the sample photos, as a deployment's workers are;
  2s. the same with the S3 store, against a local S3 server (moto, on the same 2 cores);
  3. `bgq ingest` self-contained (it starts and stops its own embedded stack);
  4. the model-bound limit: bare onnxruntime u2netp inference (default session options, one
     thread, prepared 320x320 inputs), one process per core; 4'. the same through bgq's
     session, with bgq's onnxruntime options;
  4b. the compute-bound limit: what a worker computes (decode, rembg.remove, PNG encode) in a
      plain loop, one process per core, with no queue, store or producer: the most any queue
      could reach while keeping rembg's pixels;
then 5. `bgq ingest` warm (all cached, nothing running) over a few thousand files,
and the peak RSS of a worker pool process. Figures, not a pass/fail test.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import psutil

from bench.catalog import SAMPLES, build
from bench.profile import model_input
from bench.s3server import AWS_ENV, S3Server
from bgq.settings import Settings, load_settings, settings_env
from bgq.stack import LocalStack
from workers import models

BIN = Path(sys.executable).parent
TARGET_VS_REMBG = 2.0  # cold bgq / rembg p
TARGET_VS_MODEL = 0.90  # cold bgq / model-bound limit
TARGET_WARM = 1000.0  # img/s, all cache hits
TARGET_S3 = 0.90  # cold bgq on the S3 store / cold bgq on the filesystem store
MEAN, STD, SIZE = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (320, 320)  # U2netSession's


def timed(cmd: list[str], env: dict[str, str]) -> float:
    """Seconds one whole command takes; a failure stops the benchmark."""
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def _infer(paths: list[Path], settings: Settings, barrier: Barrier, out: mp.Queue) -> None:
    """One model-bound process (settings.model), bare: its weights file loaded directly with
    onnxruntime's default SessionOptions but one intra-op thread; rembg's 320x320 inputs
    prepared first, then only run() is timed."""
    import onnxruntime as ort
    from PIL import Image
    from rembg.sessions.base import BaseSession

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    weights = models.weights_path(settings.model, settings.model_home)
    sess = ort.InferenceSession(str(weights), opts, providers=["CPUExecutionProvider"])
    holder = types.SimpleNamespace(inner_session=sess)  # what rembg's normalize reads
    feeds = [BaseSession.normalize(holder, Image.open(p), MEAN, STD, SIZE) for p in paths]
    _time_runs(sess, feeds, barrier, out)


def infer_bgq(paths: list[Path], settings: Settings, barrier: Barrier, out: mp.Queue) -> None:
    """As _infer, through bgq's own session (its session options: bgq/defaults.py ORT_*)."""
    from PIL import Image

    from workers import session

    sess = session.get(settings.model, settings)
    feeds = [model_input(sess, Image.open(p).convert("RGB")) for p in paths]
    _time_runs(sess.inner_session, feeds, barrier, out)


def _time_runs(sess: Any, feeds: list[dict[str, Any]], barrier: Barrier, out: mp.Queue) -> None:
    """One warm-up run, then (all processes together) the seconds that `feeds` take."""
    sess.run(None, feeds[0])
    barrier.wait()
    start = time.perf_counter()
    for feed in feeds:
        sess.run(None, feed)
    out.put(time.perf_counter() - start)


def _compute(paths: list[Path], settings: Settings, barrier: Barrier, out: mp.Queue) -> None:
    """One compute-bound process: files read first, then a worker's pixel path is timed."""
    from bgq.options import Options
    from workers import imaging, session

    sess = session.get("u2netp", settings)
    blobs = [p.read_bytes() for p in paths]

    def one(data: bytes) -> bytes:
        img = imaging.decode(data, settings.max_megapixels, Options())
        cutout = imaging.remove_background(img, sess, Options())
        return imaging.encode_png(cutout, settings.png_encoder, settings.png_compress_level)

    one(blobs[0])  # warm-up
    barrier.wait()
    start = time.perf_counter()
    for data in blobs:
        one(data)
    out.put(time.perf_counter() - start)


def bound(
    paths: list[Path],
    settings: Settings,
    procs: int,
    target: Callable[[list[Path], Settings, Barrier, mp.Queue], None] = _infer,
) -> float:
    """img/s of `target` (bare onnxruntime by default) in `procs` processes started together."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    workers = [
        ctx.Process(target=target, args=(paths[i::procs], settings, barrier, out))
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    slowest = max(out.get() for _ in workers)
    for w in workers:
        w.join()
    return len(paths) / slowest


class PeakRss:
    """Samples the RSS of a worker's pool processes in the background."""

    def __init__(self, pid: int) -> None:
        self.parent = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            for child in self.parent.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self.peak = max(self.peak, child.memory_info().rss)


def warm_up_workers(work: Path, env: dict[str, str]) -> None:
    """Ingest the sample photos once, so that every pool process of the running stack has run
    the model (its first run sets up onnxruntime's arena), as a deployment's workers have.
    They are not in the catalog, and the store is emptied before each cold run."""
    folder = work / "warm-up"
    folder.mkdir(parents=True, exist_ok=True)
    for photo in sorted(SAMPLES.glob("*.jpg")):
        shutil.copyfile(photo, folder / photo.name)
    timed([str(BIN / "bgq"), "ingest", str(folder), "--out", str(work / "warm-up-out")], env)


def warm_catalog(src: Path, dest: Path, copies: int) -> int:
    """`copies` hard-linked copies of the catalog under new names: same content, all cached."""
    files = sorted(src.rglob("*.jpg"))
    for c in range(copies):
        for f in files:
            target = dest / f"copy{c:03d}" / f"{f.stem}-{c}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.link(f, target)
    return copies * len(files)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=60, help="distinct 1920x1080 JPEGs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warm-files", type=int, default=3000)
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temp folder)")
    args = parser.parse_args()

    base = load_settings(model="u2netp")  # the model of `rembg p -m u2netp` below
    models.fetch("u2netp", base.model_home)
    procs = base.concurrency
    work = args.keep or Path(tempfile.mkdtemp(prefix="bgq-bench-"))
    src = work / "catalog"
    paths = build(src, args.images)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGQ_")}
    env["BGQ_MODELS_DIR"] = str(base.model_home)
    rembg_env = {**env, "U2NET_HOME": str(models.weights_path("u2netp", base.model_home).parent)}
    up_settings = load_settings(home=work / "home-up", models_dir=base.model_home)
    up_env = {**env, **settings_env(up_settings)}
    runs = ("rembg", "cold", "s3", "self", "model", "modelbgq", "compute", "warm")
    results: dict[str, list[float]] = {k: [] for k in runs}
    n = len(paths)

    def run(name: str, seconds: Callable[[], float]) -> None:
        rate = seconds()
        results[name].append(rate)
        print(f"  {name:7} {rate:8.2f} img/s", flush=True)

    print(
        f"{n} images, {procs} worker processes x {base.ort_threads} ORT thread(s); work in {work}"
    )
    os.environ.update(AWS_ENV)
    s3_server = S3Server(work / "moto.log")
    bucket = s3_server.bucket()
    s3_settings = load_settings(
        home=work / "home-s3",
        models_dir=base.model_home,
        store_url=f"s3://{bucket}/bench",
        s3_endpoint_url=s3_server.url,
    )
    s3_env = {**env, **AWS_ENV, **settings_env(s3_settings)}
    stack = LocalStack(up_settings, log=work / "up-worker.log").start()  # what `bgq up` runs
    s3_stack = LocalStack(s3_settings, log=work / "s3-worker.log").start()
    try:
        assert stack.worker is not None
        rss = PeakRss(stack.worker.pid)
        up_env["BGQ_REDIS_URL"] = stack.url
        s3_env["BGQ_REDIS_URL"] = s3_stack.url
        warm_up_workers(work, up_env)
        warm_up_workers(work, s3_env)
        for rep in range(args.repeats):
            print(f"round {rep + 1}")
            shutil.rmtree(work / "rembg-out", ignore_errors=True)
            rembg = [str(BIN / "rembg"), "p", "-m", "u2netp", str(src), str(work / "rembg-out")]
            run("rembg", lambda: n / timed(rembg, rembg_env))
            shutil.rmtree(up_settings.store_dir, ignore_errors=True)
            ingest = [str(BIN / "bgq"), "ingest", str(src), "--out", str(work / "bgq-out")]
            run("cold", lambda: n / timed(ingest, up_env))
            s3_server.empty(bucket)
            s3_out = [str(BIN / "bgq"), "ingest", str(src), "--out", str(work / "s3-out")]
            run("s3", lambda: n / timed(s3_out, s3_env))
            self_env = {**env, "BGQ_HOME": str(work / f"home-self-{rep}")}
            shutil.rmtree(work / f"home-self-{rep}", ignore_errors=True)
            run("self", lambda: n / timed(ingest, self_env))
            run("model", lambda: bound(paths, base, procs))
            run("modelbgq", lambda: bound(paths, base, procs, infer_bgq))
            run("compute", lambda: bound(paths, base, procs, _compute))
        rss.stop.set()
    finally:
        s3_stack.stop()
        stack.stop()
        s3_server.stop()
    warm_src = work / "warm"
    files = warm_catalog(src, warm_src, max(1, args.warm_files // n))
    warm_env = {**env, "BGQ_HOME": str(work / "home-self-0")}
    warm = [str(BIN / "bgq"), "ingest", str(warm_src), "--out", str(work / "warm-out")]
    print(f"warm: {files} files, all cached, nothing running")
    for _ in range(args.repeats):
        run("warm", lambda: files / timed(warm, warm_env))

    med = {k: statistics.median(v) for k, v in results.items()}
    print()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}"
    )
    print(f"{'run':58} {'img/s (median)':>15}  all runs")
    rows = [
        ("rembg", "1. rembg p -m u2netp (whole command)"),
        ("cold", "2. bgq ingest, cold, workers running (bgq up)"),
        ("s3", "2s. the same on the S3 store (local moto server)"),
        ("self", "3. bgq ingest, self-contained (starts its own stack)"),
        ("model", f"4. model-bound: bare ORT inference, {procs} processes"),
        ("modelbgq", "4'. the same through bgq's session (bgq's ORT options)"),
        ("compute", f"4b. compute-bound: decode+rembg+PNG, {procs} processes"),
        ("warm", f"5. bgq ingest, warm, {files} files all cached"),
    ]
    for key, label in rows:
        print(f"{label:58} {med[key]:15.2f}  {', '.join(f'{v:.2f}' for v in results[key])}")
    vs_rembg, vs_model = med["cold"] / med["rembg"], med["cold"] / med["model"]
    print(f"cold bgq / rembg p:          {vs_rembg:5.2f}x  (target >= {TARGET_VS_REMBG})")
    print(f"cold bgq / model-bound:      {vs_model:5.2f}   (target >= {TARGET_VS_MODEL})")
    print(f"warm:                        {med['warm']:5.0f} img/s (target >= {TARGET_WARM:.0f})")
    print(f"cold S3 store / file store:  {med['s3'] / med['cold']:5.2f}   (target >= {TARGET_S3})")
    print("where the model-bound gap goes:")
    print(
        f"  compute-bound / model-bound: {med['compute'] / med['model']:5.2f}"
        "   (rembg's own decode, resizes and cutout, plus PNG: needed for identical pixels)"
    )
    print(
        f"  cold bgq / compute-bound:    {med['cold'] / med['compute']:5.2f}"
        "   (queue, store, producer and whole-command start-up)"
    )
    print(f"peak RSS of a worker process: {rss.peak / 2**20:.0f} MiB")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
