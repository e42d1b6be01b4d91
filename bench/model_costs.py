"""What a model costs a pool process: docs/memory.md's constants (part of `make bench-models`).

Each figure comes from a fresh process:
  - a probe that imports what a pool process imports (rembg without its extras, onnxruntime,
    Celery, the task module, as `session.preload` and the task do), loads the sessions of the
    models named, with bgq's options, and runs a small cutout (320x240) through each, twice:
    RSS with the libraries, with the sessions, and the peak (VmHWM). One model, then two in one
    process (sized as the sum of their costs?);
  - bare onnxruntime with the model alone, one 320x320 input run twice, at several memory
    options: what the model's own inference needs at the least.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

MIB = 2**20
SMALL = (320, 240)  # pixels of the probe's cutout: its image work is under 2 MiB
# onnxruntime memory options tried bare: (label, arena, memory pattern, planned buffer reuse)
# and whether glibc's free heap is trimmed after loading (workers/session.py `trim_heap`)
BARE_OPTIONS = [
    ("bgq's: arena, no pattern, no reuse, trim", True, False, False, True),
    ("arena off, no pattern, no reuse, trim", False, False, False, True),
    ("bgq's options without the trim", True, False, False, False),
    ("onnxruntime's defaults", True, True, True, False),
]


def status(key: str) -> float:
    """VmRSS or VmHWM of this process, in bytes."""
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def probe(names: list[str]) -> dict[str, float]:
    """In this fresh process: the pool process's libraries, the sessions, two small cutouts."""
    os.environ.setdefault("BGQ_REDIS_URL", "redis://127.0.0.1:1/0")  # never contacted
    from workers import session

    session.defer_rembg_extras()
    session.preload()
    import workers.tasks  # noqa: F401  (what a pool process has imported when a task runs)
    from bench.memory import make_input
    from bgq.options import Options
    from bgq.settings import load_settings
    from workers import imaging

    settings = load_settings()
    libs = status("VmRSS")
    for name in names:
        session.get(name, settings)
    loaded, load_peak = status("VmRSS"), status("VmHWM")
    data = make_input(SMALL, 0)
    for name in names:
        for _ in range(2):
            img = imaging.decode(data, settings.max_megapixels, Options())
            imaging.remove_background(img, session.get(name, settings), Options())
    peak = status("VmHWM")
    return {"libs": libs, "loaded": loaded, "load_peak": load_peak, "peak": peak}


def bare(path: str, arena: bool, pattern: bool, reuse: bool, trim: bool) -> dict[str, float]:
    """In this fresh process: only onnxruntime and the model, one 320x320 input twice."""
    import numpy as np
    import onnxruntime as ort

    before = status("VmRSS")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.enable_cpu_mem_arena = arena
    opts.enable_mem_pattern, opts.enable_mem_reuse = pattern, reuse
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    load_peak = status("VmHWM")
    if trim:  # as workers/session.py `trim_heap`, without importing bgq into this process
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    loaded = status("VmRSS")
    feed = {sess.get_inputs()[0].name: np.random.default_rng(0).random((1, 3, 320, 320), "f4")}
    for _ in range(2):
        sess.run(None, feed)
    return {"libs": before, "loaded": loaded, "load_peak": load_peak, "peak": status("VmHWM")}


def child(*args: str) -> dict[str, float]:
    """Run this module with `args` in a fresh process; its JSON answer."""
    cmd = [sys.executable, "-m", "bench.model_costs", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def line(label: str, got: dict[str, float]) -> str:
    """libs, then above them: loading's peak, the session, the peak with inference; peak."""
    libs = got["libs"]
    return (
        f"  {label:52} {libs / MIB:5.0f} {(got['load_peak'] - libs) / MIB:6.0f} "
        f"{(got['loaded'] - libs) / MIB:8.0f} {(got['peak'] - libs) / MIB:6.0f} "
        f"{got['peak'] / MIB:6.0f}"
    )


def report(names: list[str], model_home: Path) -> dict[str, dict[str, float]]:
    """Print the probes (each model, then pairs) and bare onnxruntime; return the probes."""
    from workers import models

    head = f"  {'process':52}  libs  +load  +session  +peak   peak"
    print("\nwhat a model costs a pool process (MiB): libraries, then above them the peak")
    print("while loading, the session once loaded, and the peak with two small cutouts")
    print(head)
    probes: dict[str, dict[str, float]] = {}
    for name in names:
        probes[name] = child("--probe", name)
        print(line(f"probe: {name}", probes[name]))
    for pair in [["u2netp", "u2net"]]:
        if all(name in names for name in pair):
            key = "+".join(pair)
            probes[key] = child("--probe", *pair)
            alone = sum(probes[n]["peak"] - probes[n]["libs"] for n in pair)
            print(f"{line(f'probe: {key}', probes[key])}  (sum alone: {alone / MIB:.0f})")
    for name in [n for n in names if n != "u2netp"]:
        path = str(models.weights_path(name, model_home))
        for label, *flags in BARE_OPTIONS:
            got_bare = child("--bare", path, *(str(int(f)) for f in flags))
            print(line(f"bare {name}: {label}", got_bare))
    return probes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--probe", nargs="+")
    parser.add_argument("--bare", nargs=5)
    args = parser.parse_args()
    if args.probe:
        answer: dict[str, Any] = probe(args.probe)
    elif args.bare:
        path, *flags = args.bare
        answer = bare(path, *(flag == "1" for flag in flags))
    else:
        from bgq.settings import load_settings

        report(["u2netp", "u2net"], load_settings().model_home)
        return
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
