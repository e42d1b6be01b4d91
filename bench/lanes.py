"""Lanes under load, side by side in one run: `make bench-lanes`.

On local stacks (embedded Redis, prefork workers, u2netp), with real `bgq ingest` and `bgq api`
processes, prints:
  1. interactive latency under bulk load: synchronous `POST /v1/remove` of a 1280x720 photo,
     idle, then 20 such requests spread over an 80-image 1080p ingest, with lanes (the ingest in
     the bulk lane, its default) and without (`--lane interactive`: one FIFO queue, as before
     lanes); with where each request's time went (before its task started, its run, after);
  2. bulk throughput of that ingest in the bulk lane vs the interactive lane, no other traffic;
  3. fairness: a 40-image catalog started 10 s into a 400-image one, against the 40 alone on one
     pool process (half the workers); with lanes, then without.
Every image sent is distinct (catalogs: a JPEG comment naming the copy; requests: a few pixels
changed), so nothing is a cache hit. Figures with their targets, not a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import psutil

from bench import timed_requests
from bench.api import percentile, serve_api
from bench.catalog import build
from bench.cpuload import Load
from bench.timed_requests import Sent, breakdown, remove, waited
from bgq.settings import Settings, load_settings, settings_env
from bgq.stack import LocalStack
from workers import models

BIN = Path(sys.executable).parent
TARGET_FIRST = 2.5  # loaded / idle latency, with lanes
TARGET_P95 = 3.0  # p95 of the loaded requests / idle latency, with lanes
TARGET_THROUGHPUT = 0.97  # bulk lane / interactive lane img/s
TARGET_FAIR = 1.5  # small catalog beside a big one / alone on half the workers
SUMMARY = re.compile(r"(\d+) inputs in ([\d.]+)s .*: (\d+) done, (\d+) cached, (\d+) failed")


def tagged(jpeg: bytes, tag: str) -> bytes:
    """The same JPEG with a comment segment (COM) after its SOI: other bytes, same pixels."""
    text = tag.encode()
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text + jpeg[2:]


def catalog(bases: list[bytes], folder: Path, count: int) -> Path:
    """`count` distinct 1080p JPEGs in `folder` (the bases, each copy tagged by its path)."""
    for i in range(count):
        path = folder / f"set{i % 3}" / f"img{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tagged(bases[i % len(bases)], f"{folder}/{i}"))
    return folder


class Bench:
    """The work folder, the base images, and how to run `bgq ingest` against a stack."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.bases = [p.read_bytes() for p in build(work / "bases", 24)]
        self.model_home = load_settings().model_home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BGQ_")}
        self.photos = timed_requests.photos(100)
        self.count = 0
        self.rates: dict[str, list[float]] = {"bulk": [], "interactive": []}  # img/s, part 2
        self.latency: dict[str, dict] = {}  # part 1: run -> latency()'s figures
        self.load: dict[str, Load] = {}  # phase -> who had the CPU meanwhile

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Note how many cores other processes and the hypervisor took during a phase."""
        load = Load()
        yield
        self.load[name] = load.end()

    def folder(self, name: str) -> Path:
        self.count += 1
        return self.work / f"{self.count:02d}-{name}"

    @contextmanager
    def stack(self, processes: int) -> Iterator[Settings]:
        """A started local stack with `processes` pool processes, warmed up; stopped after."""
        home = self.folder(f"home-{processes}")
        settings = load_settings(
            home=home, redis_url=None, concurrency=processes, models_dir=self.model_home
        )
        with LocalStack(settings, log=home / "worker.log") as stack:
            settings = settings.model_copy(update={"redis_url": stack.url})
            # Each pool process runs the model once (onnxruntime sets up its arena then).
            self.ingest(settings, catalog(self.bases, self.folder("warm-up"), 2 * processes))
            yield settings

    def start_ingest(self, settings: Settings, src: Path, lane: str | None) -> subprocess.Popen:
        """`bgq ingest SRC --out SRC-out [--lane LANE]` on the stack, logging to SRC.log."""
        cmd = [str(BIN / "bgq"), "ingest", str(src), "--out", str(src) + "-out"]
        cmd += ["--lane", lane] if lane else []
        with open(str(src) + ".log", "wb") as log:
            return subprocess.Popen(
                cmd,
                env={**self.env, **settings_env(settings)},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def finish(self, ingest: subprocess.Popen, src: Path) -> float:
        """Wait for an ingest; its own elapsed seconds. Anything cached or failed stops here."""
        code = ingest.wait()
        log = Path(str(src) + ".log").read_text(errors="replace")
        found = SUMMARY.search(log)
        if code != 0 or found is None or found[4] != "0" or found[5] != "0":
            raise SystemExit(f"bgq ingest {src} (exit {code}): not all computed:\n{log[-2000:]}")
        return float(found[2])

    def ingest(self, settings: Settings, src: Path, lane: str | None = None) -> float:
        return self.finish(self.start_ingest(settings, src, lane), src)


def latency(bench: Bench, settings: Settings, url: str, lane: str | None, n: int) -> dict:
    """Idle requests, then 20 spread over an n-image ingest (from 6 s in, to near its end)."""
    idle = [remove(url, next(bench.photos)) for _ in range(6)][1:]  # the first warms the API
    span = n / statistics.median(bench.rates["bulk"])  # the ingest's expected seconds
    src = catalog(bench.bases, bench.folder(f"load-{lane or 'bulk'}"), n)
    photos = [next(bench.photos) for _ in range(20)]
    gap = max(0.5, (span - 8) / 20)
    before = waited(settings)
    start = time.time()
    ingest = bench.start_ingest(settings, src, lane)
    ended: list[float] = []  # when the ingest's process exits

    def watch() -> None:
        ingest.wait()
        ended.append(time.time())

    waiter = threading.Thread(target=watch)
    waiter.start()

    def at(i: int) -> Sent:
        time.sleep(max(0.0, start + 6 + i * gap - time.time()))
        return remove(url, photos[i])

    with ThreadPoolExecutor(20) as pool:
        loaded = list(pool.map(at, range(20)))
    waiter.join()
    elapsed = bench.finish(ingest, src)
    after = waited(settings)
    return {
        "idle": statistics.median(s.seconds for s in idle),
        "idle_parts": breakdown(settings, idle),
        "first": loaded[0].seconds,
        "median": statistics.median(s.seconds for s in loaded),
        "p95": percentile([s.seconds for s in loaded], 0.95),
        "parts": breakdown(settings, loaded),
        "during": sum(s.sent < ended[0] for s in loaded),
        "accepted": sum(s.accepted for s in loaded),
        "ingest": elapsed,
        "queue": (after[0] - before[0]) / max(1, after[1] - before[1]),
    }


def throughput(bench: Bench, settings: Settings, images: int, rounds: int) -> None:
    """img/s of an ingest in each lane, `rounds` each, in the order bulk, interactive,
    interactive, bulk, bulk, interactive...: neither lane always goes first."""
    for i in range(2 * rounds):
        lane = ("bulk", "interactive")[(i + 1) // 2 % 2]
        src = catalog(bench.bases, bench.folder(f"rate-{lane}"), images)
        load = Load()
        rate = images / bench.ingest(settings, src, None if lane == "bulk" else lane)
        bench.rates[lane].append(rate)
        others = load.end().others
        print(f"  throughput, {lane:11} lane: {rate:.2f} img/s (others: {others:.2f} cores)")


def fairness(bench: Bench, settings: Settings, big: int, small: int, lane: str | None) -> float:
    """Seconds of the small catalog's ingest started 10 s into the big one's (then stopped)."""
    big_src = catalog(bench.bases, bench.folder(f"big-{lane or 'bulk'}"), big)
    small_src = catalog(bench.bases, bench.folder(f"small-{lane or 'bulk'}"), small)
    first = bench.start_ingest(settings, big_src, lane)
    try:
        time.sleep(10)
        if first.poll() is not None:
            raise SystemExit(f"the {big}-image ingest ended within 10 s; raise --big")
        started = time.perf_counter()
        bench.ingest(settings, small_src, lane)
        seconds = time.perf_counter() - started
        if first.poll() is not None:
            print(f"  note: the {big}-image ingest ended before the {small}-image one")
    finally:
        first.send_signal(signal.SIGINT)  # it stops submitting; the stack stops what is left
        first.wait(timeout=60)
    return seconds


def alone(bench: Bench, settings: Settings, small: int) -> float:
    """Seconds of the small catalog's ingest alone, whole command."""
    src = catalog(bench.bases, bench.folder("small-alone"), small)
    started = time.perf_counter()
    bench.ingest(settings, src)
    return time.perf_counter() - started


def verdict(value: float, target: float, most: bool = True) -> str:
    ok = value <= target if most else value >= target
    return f"(target {'<=' if most else '>='} {target:g}: {'PASS' if ok else 'FAIL'})"


def report_latency(results: dict[str, dict], images: int) -> None:
    print("\n1. Interactive latency: POST /v1/remove, 1280x720 JPEG, default wait (30 s); idle =")
    print(f"   median of 5 just before; loaded = 20 distinct requests over a {images}-image ingest")
    print(
        "| ingest's lane | idle s | first s (x idle) | median s (x idle) | p95 s (x idle) | 202s |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        cells = [f"{r[k]:.2f} ({r[k] / r['idle']:.1f}x)" for k in ("first", "median", "p95")]
        print(f"| {name} | {r['idle']:.2f} | {' | '.join(cells)} | {r['accepted']} |")
    for name, r in results.items():
        print(
            f"{name}: first {verdict(r['first'] / r['idle'], TARGET_FIRST)}, "
            f"p95 {verdict(r['p95'] / r['idle'], TARGET_P95)}; "
            f"{r['during']}/20 sent while the ingest ran ({r['ingest']:.1f} s)"
        )
    print("where a request's time went (medians, s): sent -> its task started (upload, submit,")
    print("wait for a slot) | the task's run (stage times) | done -> answered (API poll, response)")
    for name, r in results.items():
        for label, parts in (("idle", r["idle_parts"]), ("loaded", r["parts"])):
            print(f"  {name}, {label:6}: {' | '.join(f'{p:.3f}' for p in parts)}")
        print(f"  {name}, interactive lane's mean enqueue -> start meanwhile: {r['queue']:.3f}")


def report(bench: Bench, args: argparse.Namespace, fair: dict[str, float]) -> None:
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}; "
        "u2netp, 1 ORT thread per pool process"
    )
    report_latency(bench.latency, args.images)
    rates = bench.rates
    ratio = statistics.median(rates["bulk"]) / statistics.median(rates["interactive"])
    print(f"\n2. Bulk throughput: {args.images}-image 1080p ingest, 2 pool processes, no requests")
    print("   (rounds: bulk, interactive, interactive, bulk, bulk, interactive...; medians;")
    print("   img/s from each ingest's own elapsed time)")
    for lane, values in rates.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"  {lane:11} lane: {statistics.median(values):.2f} img/s (rounds {shown})")
    print(f"  bulk / interactive: {ratio:.3f} {verdict(ratio, TARGET_THROUGHPUT, False)}")
    alone = fair["alone"]
    print(f"\n3. Fairness: a {args.small}-image ingest started 10 s into a {args.big}-image one,")
    print("   2 pool processes; whole command")
    print(f"  alone on 1 pool process (half the workers): {alone:.1f} s")
    for name, key in (("with lanes (both bulk)", "lanes"), ("without lanes", "interactive")):
        seconds = fair[key]
        target = verdict(seconds / alone, TARGET_FAIR) if key == "lanes" else ""
        print(f"  {name:22}: {seconds:.1f} s = {seconds / alone:.2f}x {target}")
    print("\nwho had the 2 cores, per phase (cores on average): other processes | hypervisor")
    print("(steal) | ours: pool processes, worker main, ingest, api, redis, bench")
    kinds = ("pool processes", "worker main", "ingest", "api", "redis", "bench")
    for phase, load in bench.load.items():
        ours = ", ".join(f"{load.kinds.get(k, 0.0):.2f}" for k in kinds)
        print(f"  {phase:26} {load.others:.2f} | {load.stolen:.2f} | {ours}")


def measure(bench: Bench, args: argparse.Namespace) -> dict[str, float]:
    """All three parts: one 2-process stack for parts 2, 1 and 3 with lanes, a 1-process stack
    for the small catalog alone, a fresh 2-process stack for part 3 without lanes. Returns
    part 3's seconds."""
    fair: dict[str, float] = {}
    with bench.stack(2) as settings:
        with bench.phase("2. throughput"):
            throughput(bench, settings, args.images, args.rounds)
        api, url = serve_api(settings, bench.work)
        try:
            for name, lane in (("lanes (bulk)", None), ("no lanes (interactive)", "interactive")):
                with bench.phase(f"1. {name}"):
                    bench.latency[name] = latency(bench, settings, url, lane, args.images)
                print(f"  latency, {name}: {bench.latency[name]['median']:.2f} s", flush=True)
        finally:
            api.terminate()
            api.wait(timeout=30)
        with bench.phase("3. with lanes"):
            fair["lanes"] = fairness(bench, settings, args.big, args.small, None)
        print(f"  fairness, with lanes: {fair['lanes']:.1f} s", flush=True)
    with bench.stack(1) as settings, bench.phase("3. alone, 1 process"):
        fair["alone"] = alone(bench, settings, args.small)
    print(f"  {args.small} images alone on 1 process: {fair['alone']:.1f} s", flush=True)
    with bench.stack(2) as settings, bench.phase("3. without lanes"):
        fair["interactive"] = fairness(bench, settings, args.big, args.small, "interactive")
    print(f"  fairness, without lanes: {fair['interactive']:.1f} s", flush=True)
    return fair


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=80, help="the ingest of parts 1 and 2")
    parser.add_argument("--rounds", type=int, default=3, help="part 2's rounds per lane")
    parser.add_argument("--big", type=int, default=400, help="part 3's big catalog")
    parser.add_argument("--small", type=int, default=40, help="part 3's small catalog")
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temp folder)")
    args = parser.parse_args()
    models.fetch("u2netp", load_settings().model_home)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bgq-bench-lanes-"))
    began = time.perf_counter()
    bench = Bench(work)
    fair = measure(bench, args)
    report(bench, args, fair)
    print(f"\nwhole benchmark: {time.perf_counter() - began:.0f} s")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
