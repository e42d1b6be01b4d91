"""What an autoscaler would see during a real ingest: `make bench-autoscale`.

A local stack (embedded Redis, 2 prefork pool processes, u2netp) and a real `bgq ingest` of 60
distinct 1080p photos in the bulk lane (its default). Every 0.5 s, from Redis:
  - LLEN bgq and LLEN bgq.bulk: what KEDA's Redis lists scaler reads;
  - the jobs in the bulk runs' lists (`bgq.bulk.<run>`), which no Celery queue shows;
  - kombu's `unacked` hash: messages workers hold (running, or prefetched);
  - the exporter's `bgq_lane_waiting` and `bgq_lane_running` (bgq.lane_stats, summed over lanes).
Prints the table and, per column, its median and peak while the ingest ran: which one follows
the backlog. Figures, not a pass/fail test.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import astuple, dataclass
from pathlib import Path

import redis

from bench.lanes import Bench, catalog
from bgq import contract, lanes
from bgq.lane_stats import UNACKED_KEY, lane_stats
from bgq.settings import load_settings
from workers import models


@dataclass(frozen=True)
class Sample:
    """One look at Redis, `at` seconds after the ingest started."""

    at: float
    llen_bgq: int
    llen_bulk: int
    run_lists: int
    unacked: int
    waiting: int  # bgq_lane_waiting, both lanes
    running: int  # bgq_lane_running, both lanes


COLUMNS = ("t (s)", "LLEN bgq", "LLEN bgq.bulk", "run lists", "unacked", "waiting", "running")


def sample(client: redis.Redis, at: float) -> Sample:
    """Read what each scaler would read (a few round trips: close enough to one instant)."""
    with client.pipeline(transaction=False) as pipe:
        pipe.llen(contract.QUEUE)
        pipe.llen(contract.BULK_QUEUE)
        pipe.hlen(UNACKED_KEY)
        llen_bgq, llen_bulk, unacked = pipe.execute()
    runs = lanes.waiting_runs(client).values()
    snapshot = lane_stats(client, time.time())
    return Sample(
        at=at,
        llen_bgq=llen_bgq,
        llen_bulk=llen_bulk,
        run_lists=sum(runs),
        unacked=unacked,
        waiting=sum(stats.waiting for stats in snapshot.lanes.values()),
        running=sum(stats.running for stats in snapshot.lanes.values()),
    )


def watch(client: redis.Redis, done: threading.Event, interval: float) -> list[Sample]:
    """Samples every `interval` seconds until `done` is set."""
    found, start = [], time.monotonic()
    while not done.is_set():
        found.append(sample(client, time.monotonic() - start))
        done.wait(max(0.0, start + len(found) * interval - time.monotonic()))
    return found


def report(samples: list[Sample], images: int, processes: int, seconds: float) -> None:
    print(f"\n{images} images, {processes} pool processes, ingest {seconds:.1f} s\n")
    print(" | ".join(f"{c:>13}" for c in COLUMNS))
    for s in samples:
        print(" | ".join(f"{v:>13.1f}" if i == 0 else f"{v:>13}" for i, v in enumerate(astuple(s))))
    busy = [s for s in samples if s.waiting + s.running] or samples
    print(f"\nwhile jobs were waiting or running ({len(busy)} samples): median / peak")
    for i, name in enumerate(COLUMNS[1:], start=1):
        values = [astuple(s)[i] for s in busy]
        print(f"  {name:>13}: {statistics.median(values):>6.1f} / {max(values)}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--processes", type=int, default=2, help="pool processes of the stack")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temp folder)")
    args = parser.parse_args()
    models.fetch("u2netp", load_settings().model_home)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bgq-bench-autoscale-"))
    bench = Bench(work)
    with bench.stack(args.processes) as settings:
        src = catalog(bench.bases, bench.folder("ingest"), args.images)
        client = redis.Redis.from_url(settings.redis_url or "")
        done = threading.Event()
        samples: list[Sample] = []
        watcher = threading.Thread(
            target=lambda: samples.extend(watch(client, done, args.interval))
        )
        watcher.start()
        try:
            seconds = bench.ingest(settings, src)
        finally:
            done.set()
            watcher.join()
            client.close()
    report(samples, args.images, args.processes, seconds)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
