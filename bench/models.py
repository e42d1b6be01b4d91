"""rembg's published table reproduced, per model, beside rembg itself: `make bench-models`.

Prints, for u2netp and u2net:
  1. the table's rows, 640x480 to 5120x2880: a bgq pool process (a local stack serving the
     model, each size sent twice at once, as `make bench-memory` does: the task's own seconds,
     ms per megapixel, peak RSS (VmHWM), USS and PSS) beside `rembg.remove()` in a plain process
     with the same model and rembg's default session, same run, and bgq ÷ rembg;
  2. what a model costs a pool process (bench/model_costs.py: docs/memory.md's constants);
  3. the 1080p catalog (16 images, bench/catalog.py), alternating: `rembg p -m u2net`,
     `bgq ingest --model u2net` (workers running and warm, as after `bgq up`), the bare
     onnxruntime limit of u2net (2 processes x 1 thread, prepared 320x320 inputs);
then a summary of the target ratios. Figures, not a pass/fail test; about 6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import ingest, memory, model_costs
from bench.catalog import build
from bgq.settings import Settings, load_settings, settings_env
from bgq.stack import LocalStack
from workers import models

SIZES = [
    (640, 480),
    (960, 720),
    (1280, 720),
    (1920, 1080),
    (2560, 1440),
    (3840, 2160),
    (5120, 2880),
]
# rembg's published figures (u2net, a 4-core/8-thread Xeon): peak MB by size, seconds at 1080p.
PUBLISHED_MB = memory.PUBLISHED_MB
PUBLISHED_S = {(1920, 1080): 3.6}
MODELS = ["u2netp", "u2net"]
CATALOG = 16  # 1080p images
MIB, MB = 2**20, 10**6
TARGET_RSS = 0.6  # peak RSS of a pool process with u2net / rembg.remove()'s, every row
TARGET_VS_BARE = 0.90  # bgq ingest --model u2net / bare onnxruntime u2net
TARGET_VS_REMBG = 1.6  # bgq ingest --model u2net / rembg p -m u2net


def present_models(model_home: Path) -> list[str]:
    """The models benchmarked: u2netp and u2net, fetched."""
    for name in MODELS:
        models.fetch(name, model_home)
    return list(MODELS)


def table(base: Settings, work: Path, model: str, repeats: int) -> list[dict[str, Any]]:
    """The table's rows for `model`: bgq's pool processes, then rembg.remove() beside them."""
    settings = load_settings(home=work / f"home-{model}", models_dir=base.model_home, model=model)
    rows = memory.bench_bgq(settings, repeats, work / f"table-{model}.log", SIZES)
    plain = memory.bench_rembg(work, settings, repeats, SIZES)
    for row, other in zip(rows, plain, strict=True):
        row["plain"] = other
    return rows


def print_table(model: str, rows: list[dict[str, Any]]) -> None:
    """One model's rows: bgq and rembg.remove() side by side, bgq ÷ rembg, published."""
    print(f"\n{model}: bgq pool process | rembg.remove(), plain process | bgq/rembg | published")
    print(
        "input      MPix   s/img  ms/MP  peak MiB (MB)  USS  PSS |   s/img  peak MiB (MB) |"
        "  time  peak | MB    s"
    )
    for row in rows:
        w, h = row["size"]
        mp = w * h / 1e6
        line = (
            f"{w}x{h:<5} {mp:5.2f} {row['ms'] / 1e3:7.2f} {row['ms'] / mp:6.0f} "
            f"{row['hwm'] / MIB:6.0f} ({row['hwm'] / MB:4.0f}) {row['uss'] / MIB:4.0f} "
            f"{row['pss'] / MIB:4.0f} |"
        )
        plain = row.get("plain")
        if plain:
            line += (
                f" {plain['ms'] / 1e3:7.2f} {plain['hwm'] / MIB:6.0f} ({plain['hwm'] / MB:4.0f}) |"
                f" {row['ms'] / plain['ms']:5.2f} {row['hwm'] / plain['hwm']:5.2f} |"
            )
        else:
            line += "  (not a rembg model)       |             |"
        published = PUBLISHED_MB.get(row["size"])
        line += f" {published if published else '-':>4}"
        line += f" {PUBLISHED_S[row['size']]:4.1f}" if row["size"] in PUBLISHED_S else "    -"
        print(line)
    print(f"  peak growth, {model}: {growth_per_mp(rows):.1f} MiB per MP (2560x1440 to 5120x2880)")


def growth_per_mp(rows: list[dict[str, Any]]) -> float:
    """MiB of peak per megapixel between the last three rows (past loading's peak): rembg's
    image work, which the memory model takes as the same for every model."""
    low, high = rows[-3], rows[-1]
    mp = [w * h / 1e6 for w, h in (low["size"], high["size"])]
    return float((high["hwm"] - low["hwm"]) / MIB / (mp[1] - mp[0]))


def catalog(base: Settings, work: Path, names: list[str], rounds: int) -> dict[str, list[float]]:
    """img/s on the 1080p catalog: rembg p, bgq ingest per model (workers up), bare u2net."""
    src = work / "catalog"
    paths = build(src, CATALOG)
    n = len(paths)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGQ_")}
    env["BGQ_MODELS_DIR"] = str(base.model_home)
    rembg_env = {**env, "U2NET_HOME": str(base.model_home)}
    results: dict[str, list[float]] = {k: [] for k in ["rembg", *names, "bare", "bare-bgq"]}

    def run(name: str, rate: Callable[[], float]) -> None:
        results[name].append(rate())
        print(f"  {name:10} {results[name][-1]:6.2f} img/s", flush=True)

    stacks: dict[str, tuple[LocalStack, dict[str, str]]] = {}
    try:
        for model in names:
            settings = load_settings(
                home=work / f"home-up-{model}", models_dir=base.model_home, model=model
            )
            stack = LocalStack(settings, log=work / f"up-{model}.log").start()
            stacks[model] = (stack, {**env, **settings_env(settings), "BGQ_REDIS_URL": stack.url})
            ingest.warm_up_workers(work, stacks[model][1])
        for rnd in range(rounds):
            print(f"catalog round {rnd + 1}")
            shutil.rmtree(work / "rembg-out", ignore_errors=True)
            rembg = [str(ingest.BIN / "rembg"), "p", "-m", "u2net", str(src)]
            rembg.append(str(work / "rembg-out"))
            run("rembg", lambda: n / ingest.timed(rembg, rembg_env))
            for model, (stack, up_env) in stacks.items():
                shutil.rmtree(stack.settings.store_dir, ignore_errors=True)
                out = work / f"out-{model}"
                cmd = [str(ingest.BIN / "bgq"), "ingest", str(src), "--out", str(out)]
                run(model, lambda: n / ingest.timed([*cmd, "--model", model], up_env))
            u2net = base.model_copy(update={"model": "u2net"})
            run("bare", lambda: ingest.bound(paths, u2net, base.concurrency))
            run("bare-bgq", lambda: ingest.bound(paths, u2net, base.concurrency, ingest.infer_bgq))
    finally:
        for stack, _ in stacks.values():
            stack.stop()
    return results


def print_catalog(results: dict[str, list[float]], procs: int) -> dict[str, float]:
    med = {k: statistics.median(v) for k, v in results.items() if v}
    labels = {
        "rembg": "rembg p -m u2net (whole command)",
        "u2netp": "bgq ingest --model u2netp",
        "u2net": "bgq ingest --model u2net, cold, workers running",
        "bare": f"bare onnxruntime u2net, {procs} processes x 1 thread",
        "bare-bgq": "  the same through bgq's session (bgq's ORT options)",
    }
    print(f"\n1080p catalog, {CATALOG} images: {'img/s (median)':>38}  all rounds")
    for key, rates in results.items():
        if rates:
            line = f"{labels[key]:55} {med[key]:6.2f}"
            print(f"{line}  {', '.join(f'{r:.2f}' for r in rates)}")
    return med


def summary(tables: dict[str, list[dict[str, Any]]], med: dict[str, float], wall: float) -> None:
    """The target ratios, one line each."""
    print("\nsummary (targets of issue 26)")
    u2net = tables.get("u2net", [])
    ratios = [(r["size"], r["hwm"] / r["plain"]["hwm"]) for r in u2net if "plain" in r]
    if ratios:
        size, worst = max(ratios, key=lambda item: item[1])
        verdict = "met" if worst <= TARGET_RSS else "NOT met"
        print(
            f"  peak RSS, u2net pool process / rembg.remove(): worst {worst:.2f} at "
            f"{size[0]}x{size[1]} (target <= {TARGET_RSS} at every row: {verdict})"
        )
    over = [r for r in u2net if r["hwm"] > PUBLISHED_MB.get(r["size"], 10**9) * MB]
    if u2net:
        print(f"  u2net rows over the published peak: {len(over)} of {len(PUBLISHED_MB)}")
    for size, seconds in PUBLISHED_S.items():
        row = next((r for r in u2net if r["size"] == size), None)
        if row:
            took = row["ms"] / 1e3
            print(f"  u2net {size[0]}x{size[1]}: {took:.2f} s/img (published {seconds} s)")
    for key, target, label in [
        ("bare", TARGET_VS_BARE, "bgq ingest u2net / bare onnxruntime u2net"),
        ("rembg", TARGET_VS_REMBG, "bgq ingest u2net / rembg p -m u2net  "),
    ]:
        if key in med and "u2net" in med:
            ratio = med["u2net"] / med[key]
            verdict = "met" if ratio >= target else "NOT met"
            print(f"  {label}: {ratio:5.2f} (target >= {target}: {verdict})")
    print(f"  wall time: {wall / 60:.1f} min")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=1, help="inputs per size and process")
    parser.add_argument("--rounds", type=int, default=2, help="catalog rounds, alternating")
    parser.add_argument("--skip", nargs="*", default=[], choices=["table", "costs", "catalog"])
    parser.add_argument("--models", nargs="*", help="only these of the models present")
    args = parser.parse_args()
    start = time.monotonic()
    base = load_settings()
    names = [m for m in present_models(base.model_home) if not args.models or m in args.models]
    tables: dict[str, list[dict[str, Any]]] = {}
    med: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bgq-bench-models-") as tmp:
        work = Path(tmp)
        print(f"{base.concurrency} pool processes x {base.ort_threads} ORT thread(s); {names}")
        if "table" not in args.skip:
            for model in names:
                tables[model] = table(base, work, model, args.repeats)
                print_table(model, tables[model])
        if "costs" not in args.skip:
            model_costs.report(names, base.model_home)
        if "catalog" not in args.skip:
            catalog_models = [m for m in names if m != "u2netp"]
            med = print_catalog(catalog(base, work, catalog_models, args.rounds), base.concurrency)
    summary(tables, med, time.monotonic() - start)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
