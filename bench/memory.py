"""Memory of a worker pool process per input size, and its growth: `make bench-memory`.

Prints, for 640x480, 1920x1080, 3840x2160 and 5120x2880 JPEGs:
  - bgq: a local stack (real prefork pool processes fed through Redis), each size sent twice at
    once so that both pool processes run it, in ascending order: ms per image (the task's own
    read + decode + inference + encode + write), ms per megapixel, the peak RSS (VmHWM) of the
    pool processes after the input, and their USS and PSS (peak of 20 Hz samples);
  - rembg: `rembg.remove()` on the same files (each once) in a plain process with rembg's
    default session, same model, same run;
next to rembg's published figures. Then the growth figure: RSS of each pool process after 50
and after 1,000 mixed small tasks (160x120 to 640x480, a few options), recycling off.
Figures, not a pass/fail test; a few minutes on 2 cores, most of it the 1,000 tasks.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from PIL import Image, ImageOps

from bench.catalog import SAMPLES
from bgq.settings import Settings, load_settings
from bgq.stack import LocalStack
from producer import Producer
from workers import models

SIZES = [(640, 480), (1920, 1080), (3840, 2160), (5120, 2880)]
PUBLISHED_MB = {(640, 480): 320, (1920, 1080): 380, (3840, 2160): 510, (5120, 2880): 620}
MIB = 2**20
MB = 10**6
GROWTH_CHECK = 50  # tasks after which the growth baseline is read
GROWTH_LIMIT = 0.10  # RSS after N tasks over RSS after GROWTH_CHECK, at most
GROWTH_OPTIONS: list[dict[str, Any]] = [  # cycled; the first two and every 50th: alpha matting
    {},
    {"only_mask": True},
    {"bgcolor": (255, 255, 255, 255)},
    {"post_process_mask": True},
    {},
]
GROWTH_MATTING_EVERY = 50
WARM_SIZE = (200, 150)  # pixels of a warm-up task's input
WARM_ATTEMPTS = 20  # pairs of warm-up tasks at most, until every pool process has run one


def make_input(size: tuple[int, int], index: int, quality: int = 90) -> bytes:
    """A photo-like JPEG of `size` from the sample photos (index picks photo and crop)."""
    photos = sorted(SAMPLES.glob("*.jpg"))
    photo = Image.open(photos[index % len(photos)]).convert("RGB")
    frame = ImageOps.cover(photo, (size[0] + index % 7, size[1] + index % 5))
    buf = io.BytesIO()
    frame.crop((0, 0, *size)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def proc_memory(pid: int) -> dict[str, float]:
    """VmHWM, VmRSS, USS and PSS of a process, in bytes."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        fields = {p[0].rstrip(":"): int(p[1]) * 1024 for p in map(str.split, fh) if len(p) == 3}
    out["USS"] = fields["Private_Clean"] + fields["Private_Dirty"]
    out["PSS"] = fields["Pss"]
    return out


class Sampler:
    """Peak USS and PSS of a worker's pool processes, sampled at 20 Hz in the background."""

    def __init__(self, parent_pid: int) -> None:
        self.parent = psutil.Process(parent_pid)
        self.peaks: dict[int, dict[str, float]] = {}
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def pids(self) -> list[int]:
        """The pool processes alive now."""
        while True:
            with contextlib.suppress(psutil.Error):
                return [c.pid for c in self.parent.children()]

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            for pid in self.pids():
                with contextlib.suppress(OSError, KeyError, ValueError):
                    now = proc_memory(pid)
                    peak = self.peaks.setdefault(pid, {})
                    for key in ("USS", "PSS"):
                        peak[key] = max(peak.get(key, 0.0), now[key])


def task_result(producer: Producer, key: str) -> dict[str, Any]:
    """The task's return value, once Celery has stored it (the PNG is in the store before)."""
    while (meta := producer.task_meta(key))["status"] != "SUCCESS":
        time.sleep(0.02)
    return dict(meta["result"])


def size_inputs(size: tuple[int, int], repeats: int) -> list[bytes]:
    """One size's inputs, the same for bgq and for rembg.remove(): 2 x `repeats` distinct JPEGs
    (bgq's cache would answer a repeated input without running the model)."""
    return [make_input(size, index) for index in range(2 * repeats)]


def run_pair(producer: Producer, pair: tuple[bytes, bytes]) -> list[dict[str, Any]]:
    """Send two fresh inputs at once (one per pool process); their task results."""
    jobs = [producer.submit(data) for data in pair]
    for job in jobs:
        job.wait(timeout=600)
    return [task_result(producer, job.key) for job in jobs]


def bench_bgq(
    settings: Settings, repeats: int, log: Path, sizes: list[tuple[int, int]] = SIZES
) -> list[dict[str, Any]]:
    """Per size: median ms of the tasks (of settings.model), and the pool processes' memory
    after it."""
    rows = []
    with LocalStack(settings, log=log) as stack:
        assert stack.worker is not None
        sampler = Sampler(stack.worker.pid)
        producer = Producer(stack.settings)
        warm_every_process(producer, sampler.pids(), {})
        for size in sizes:
            results = []
            inputs = size_inputs(size, repeats)
            for pair in zip(inputs[::2], inputs[1::2], strict=True):
                results += run_pair(producer, pair)
            mem = {pid: proc_memory(pid) for pid in sampler.pids()}
            seconds = [sum(r["seconds"].values()) for r in results]
            rows.append(_row(size, seconds, mem, sampler.peaks))
        sampler.stop.set()
    return rows


def _row(
    size: tuple[int, int],
    seconds: list[float],
    mem: dict[int, dict[str, float]],
    peaks: dict[int, dict[str, float]],
) -> dict[str, Any]:
    """One table row: the largest figure of any pool process."""
    return {
        "size": size,
        "ms": statistics.median(seconds) * 1e3,
        "hwm": max(m["VmHWM"] for m in mem.values()),
        "rss": max(m["VmRSS"] for m in mem.values()),
        "uss": max(peaks.get(pid, m)["USS"] for pid, m in mem.items()),
        "pss": max(peaks.get(pid, m)["PSS"] for pid, m in mem.items()),
    }


def rembg_child(files: list[str], repeats: int, model: str = "u2netp") -> None:
    """In a plain process: rembg.remove() with rembg's defaults on each file once; print one
    JSON row per size (each 2 x `repeats` consecutive files, size_inputs's)."""
    import rembg

    session = rembg.new_session(model)
    rembg.remove(make_input(WARM_SIZE, 10**6), session=session)  # as a pool process's first task
    per_size = 2 * repeats
    for first in range(0, len(files), per_size):
        seconds = []
        for name in files[first : first + per_size]:
            data = Path(name).read_bytes()
            start = time.perf_counter()
            rembg.remove(data, session=session)
            seconds.append(time.perf_counter() - start)
        mem = proc_memory(os.getpid())
        row = {"ms": statistics.median(seconds) * 1e3, "hwm": mem["VmHWM"], "rss": mem["VmRSS"]}
        print(json.dumps({**row, "uss": mem["USS"], "pss": mem["PSS"]}), flush=True)


def bench_rembg(
    work: Path, settings: Settings, repeats: int, sizes: list[tuple[int, int]] = SIZES
) -> list[dict[str, Any]]:
    """rembg.remove() with settings.model on the same inputs as bench_bgq's, sizes ascending,
    in one fresh plain process."""
    files = []
    for size in sizes:
        for index, data in enumerate(size_inputs(size, repeats)):
            path = work / f"rembg-{size[0]}x{size[1]}-{index}.jpg"
            path.write_bytes(data)
            files.append(str(path))
    env = {**os.environ, "U2NET_HOME": str(settings.model_home)}
    cmd = [sys.executable, "-m", "bench.memory", "--rembg-child", *files]
    cmd += ["--repeats", str(repeats), "--model", settings.model]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return [{**row, "size": size} for row, size in zip(rows, sizes, strict=True)]


def mixed_inputs(count: int) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """`count` distinct small JPEGs (160x120 to 640x480) with a cycle of options."""
    for i in range(count):
        width = 160 + 32 * (i % 16)
        options = GROWTH_OPTIONS[i % len(GROWTH_OPTIONS)]
        if i < 2 or i % GROWTH_MATTING_EVERY == GROWTH_MATTING_EVERY - 1:
            options = {**options, "alpha_matting": True}
        yield make_input((width, width * 3 // 4), i, 85), options


def drain(producer: Producer, inputs: Iterator[tuple[bytes, dict[str, Any]]], n: int) -> None:
    """Submit the next `n` inputs, at most 8 outstanding, and wait for all of them."""
    pending: list[Any] = []
    for _, (data, options) in zip(range(n), inputs, strict=False):
        pending.append(producer.submit(data, **options))
        if len(pending) >= 8:
            pending.pop(0).wait(timeout=600)
    for job in pending:
        job.wait(timeout=600)


def warm_every_process(
    producer: Producer, pids: list[int], options: dict[str, Any] | None = None
) -> None:
    """Run a small task in every pool process: by default with the lazily imported paths
    (alpha matting, post-processing), so that the growth baseline is not taken before a
    library's first use; `{}` runs the model once (its first run sets up onnxruntime)."""
    if options is None:
        options = {"alpha_matting": True, "post_process_mask": True}
    warmed: set[int] = set()
    for attempt in range(WARM_ATTEMPTS):
        if warmed >= set(pids):
            return
        jobs = [
            producer.submit(make_input(WARM_SIZE, 10**6 + 2 * attempt + k), **options)
            for k in range(2)
        ]
        for job in jobs:
            job.wait(timeout=600)
            warmed.add(int(task_result(producer, job.key)["pid"]))
    raise SystemExit(f"could not warm every pool process: {sorted(warmed)} of {sorted(pids)}")


def bench_growth(settings: Settings, tasks: int, log: Path) -> dict[int, tuple[float, float]]:
    """RSS of each pool process after GROWTH_CHECK tasks and after `tasks`, recycling off; each
    process first runs alpha matting and post-processing once (their libraries load lazily)."""
    off = settings.model_copy(
        update={"max_tasks_per_child": 10**9, "max_memory_per_child_mb": 10**9}
    )
    with LocalStack(off, log=log) as stack:
        assert stack.worker is not None
        parent = psutil.Process(stack.worker.pid)
        producer = Producer(stack.settings)
        warm_every_process(producer, [c.pid for c in parent.children()])
        inputs = mixed_inputs(tasks)
        drain(producer, inputs, GROWTH_CHECK)
        early = {c.pid: proc_memory(c.pid)["VmRSS"] for c in parent.children()}
        drain(producer, inputs, tasks - GROWTH_CHECK)
        late = {c.pid: proc_memory(c.pid)["VmRSS"] for c in parent.children()}
    return {pid: (early[pid], late.get(pid, 0.0)) for pid in early}


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    """One table: size, MP, ms, ms/MP, peak RSS, USS, PSS (MiB), published (MB), pass."""
    print(f"\n{title}")
    head = "input      MPix  ms/img  ms/MP  peakRSS MiB (MB)  USS MiB  PSS MiB  published MB"
    print(head + "  <= published")
    for row in rows:
        w, h = row["size"]
        mp = w * h / 1e6
        published = PUBLISHED_MB[row["size"]]
        print(
            f"{w}x{h:<5} {mp:5.2f} {row['ms']:7.0f} {row['ms'] / mp:6.0f}  "
            f"{row['hwm'] / MIB:7.0f} ({row['hwm'] / MB:4.0f})  {row['uss'] / MIB:7.0f}  "
            f"{row['pss'] / MIB:7.0f}  {published:12d}  "
            f"{'pass' if row['hwm'] <= published * MB else 'FAIL'}"
        )


def print_growth(growth: dict[int, tuple[float, float]], tasks: int) -> None:
    """RSS of each pool process after GROWTH_CHECK and after `tasks` tasks."""
    print(f"\ngrowth, recycling off: RSS after {GROWTH_CHECK} and {tasks} mixed small tasks")
    for pid, (early, late) in growth.items():
        change = late / early - 1
        verdict = "pass" if change <= GROWTH_LIMIT else "FAIL"
        print(
            f"  pool process {pid}: {early / MIB:5.0f} -> {late / MIB:5.0f} MiB "
            f"({change:+.1%}, {verdict}: within {GROWTH_LIMIT:.0%})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="inputs per size (timing)")
    parser.add_argument("--growth-tasks", type=int, default=1000, help="0: skip growth")
    parser.add_argument("--growth-only", action="store_true", help="skip the per-size tables")
    parser.add_argument("--rembg-child", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="u2netp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rembg_child is not None:
        return rembg_child(args.rembg_child, args.repeats, args.model)
    base = load_settings()
    models.fetch("u2netp", base.model_home)
    with tempfile.TemporaryDirectory(prefix="bgq-bench-memory-") as tmp:
        work = Path(tmp)
        settings = load_settings(home=work / "home", models_dir=base.model_home)
        print(f"{settings.concurrency} pool processes x {settings.ort_threads} ORT thread(s)")
        if not args.growth_only:
            rows = bench_bgq(settings, args.repeats, work / "worker.log")
            print_table("bgq (pool processes, through the queue)", rows)
            rows = bench_rembg(work, settings, args.repeats)
            print_table("rembg.remove() in a plain process (rembg's default session)", rows)
        if args.growth_tasks > GROWTH_CHECK:
            growth = bench_growth(settings, args.growth_tasks, work / "growth.log")
            print_growth(growth, args.growth_tasks)


if __name__ == "__main__":
    main()
