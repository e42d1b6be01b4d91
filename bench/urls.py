"""A URL catalog through `bgq ingest`: part of `make bench`.

A manifest of `url` rows served by a real HTTP server on loopback, against the same photos as
files, side by side in one run:
  1. cold: every image computed (workers already running), files vs URLs;
  2. warm: every result cached (each image under 20 URLs, so 800 rows), so the rate is fetch +
     hash + placing the output: URLs fetched one at a time
     (`--fetch-concurrency 1`) vs the default, with no added latency and with 50 ms per request
     (a CDN's round trip). Figures, not a pass/fail test.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.catalog import build
from bench.ingest import timed, warm_up_workers
from bench.photoserver import PhotoServer
from bgq import defaults
from bgq.settings import load_settings, settings_env
from bgq.stack import LocalStack
from workers import models

BIN = Path(sys.executable).parent
LATENCY = 0.05  # seconds added to each request in the "CDN" rows


def manifest(paths: list[Path], root: Path, base_url: str, dest: Path, copies: int = 1) -> Path:
    """A CSV manifest naming each photo under `root` by URL, `copies` times under different
    URLs (a query string the server ignores): the same bytes, so one job each."""
    with dest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "url"])
        for copy in range(copies):
            for path in paths:
                url = f"{base_url}/{path.relative_to(root).as_posix()}?copy={copy}"
                writer.writerow([f"{path.stem}-{copy}", url])
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=40, help="distinct 1920x1080 JPEGs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copies", type=int, default=20, help="URLs per image, warm rows")
    args = parser.parse_args()

    base = load_settings()
    models.fetch("u2netp", base.model_home)
    work = Path(tempfile.mkdtemp(prefix="bgq-bench-urls-"))
    paths = build(work / "catalog", args.images)
    n = len(paths)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGQ_")}
    settings = load_settings(home=work / "home", models_dir=base.model_home)
    env.update(settings_env(settings), BGQ_FETCH_ALLOW_PRIVATE="true")
    results: dict[str, list[float]] = {}

    def run(name: str, seconds: Callable[[], float], images: int = n) -> None:
        results.setdefault(name, []).append(images / seconds())
        print(f"  {name:24} {results[name][-1]:8.1f} img/s", flush=True)

    def ingest(src: Path, *extra: str) -> float:
        shutil.rmtree(work / "out", ignore_errors=True)
        cmd = [str(BIN / "bgq"), "ingest", str(src), "--out", str(work / "out"), *extra]
        return timed(cmd, env)

    def fetching(src: Path, at_once: str) -> Callable[[], float]:
        return lambda: ingest(src, "--fetch-concurrency", at_once)

    print(f"{n} images, {settings.concurrency} worker processes; work in {work}")
    stack = LocalStack(settings, log=work / "worker.log").start()
    fast, slow = PhotoServer(work / "catalog"), PhotoServer(work / "catalog", LATENCY)
    try:
        env["BGQ_REDIS_URL"] = stack.url
        warm_up_workers(work, env)
        cold_csv = manifest(paths, work / "catalog", fast.url, work / "cold.csv")
        fast_csv = manifest(paths, work / "catalog", fast.url, work / "urls.csv", args.copies)
        slow_csv = manifest(paths, work / "catalog", slow.url, work / "cdn.csv", args.copies)
        default = str(defaults.FETCH_CONCURRENCY)
        for rep in range(args.repeats):
            print(f"round {rep + 1}")
            shutil.rmtree(settings.store_dir, ignore_errors=True)
            run("cold files", lambda: ingest(work / "catalog"))
            shutil.rmtree(settings.store_dir, ignore_errors=True)
            run("cold urls", lambda: ingest(cold_csv))
            for label, src in (("loopback", fast_csv), ("cdn 50ms", slow_csv)):
                for at_once in ("1", default):
                    run(f"warm {label} x{at_once}", fetching(src, at_once), n * args.copies)
    finally:
        fast.stop()
        slow.stop()
        stack.stop()
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\n{'run':28} {'img/s (median)':>15}  all runs")
    for key, values in results.items():
        print(f"{key:28} {med[key]:15.1f}  {', '.join(f'{v:.1f}' for v in values)}")
    print(f"cold urls / cold files:       {med['cold urls'] / med['cold files']:5.2f}")
    for label in ("loopback", "cdn 50ms"):
        gain = med[f"warm {label} x{defaults.FETCH_CONCURRENCY}"] / med[f"warm {label} x1"]
        print(f"warm {label}: x{defaults.FETCH_CONCURRENCY} / x1 fetches at once: {gain:5.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
