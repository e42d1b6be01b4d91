"""`bgq exporter`: Prometheus metrics Flower does not have, for the whole cluster.

Everything comes from where all processes on all machines write: Redis (queue lengths, the
lanes, the counters producers and workers add to, the workers' stage and wait histograms) and
the store (its size, from a scan repeated every STORE_SCAN_INTERVAL seconds in the background).
The exporter keeps no counts of its own, so it can restart, or run anywhere, without losing any.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from bgq import cache, contract, defaults
from bgq.connections import redis_client
from bgq.contract import OUTCOMES, Counter
from bgq.errors import BgqError
from bgq.lane_stats import Snapshot, lane_stats
from bgq.store import open_store

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from bgq.settings import Settings

log = logging.getLogger(__name__)

QUEUES = (contract.QUEUE, contract.WEBHOOK_QUEUE, contract.MAINTENANCE_QUEUE, contract.BULK_QUEUE)


class StoreScanner:
    """The store's size, re-scanned in a background thread (a scan can take seconds)."""

    def __init__(self, settings: Settings, interval: float = defaults.STORE_SCAN_INTERVAL) -> None:
        self.store = open_store(settings)
        self.interval = interval
        self.stats: cache.StoreStats | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bgq-store-scan", daemon=True)

    def start(self) -> StoreScanner:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.stats = cache.store_stats(self.store)
            except (OSError, BgqError) as exc:  # refused credentials too: keep scanning
                log.warning("cannot scan the store %s: %s", self.store.url, exc)
            self._stop.wait(self.interval)


class BgqCollector(Collector):
    """Reads the cluster's state at each scrape."""

    def __init__(self, client: redis.Redis, scanner: StoreScanner) -> None:
        self.client = client
        self.scanner = scanner

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("bgq_redis_up", "1 when the exporter could read Redis.")
        try:
            snapshot = lane_stats(self.client, time.time())
            metrics = [*self._from_redis(snapshot.queues), *lane_metrics(snapshot)]
            up.add_metric([], 1)
        except redis.RedisError as exc:
            log.warning("cannot read Redis: %s", exc)
            metrics = []
            up.add_metric([], 0)
        yield up
        yield from metrics
        yield from self._from_store()

    def _from_redis(self, model_queues: dict[str, int] | None = None) -> Iterator[Metric]:
        """The queues' depths (`model_queues`: the lane_stats snapshot's), counters, stage
        timings and lane waits."""
        with self.client.pipeline(transaction=False) as pipe:
            for queue in QUEUES:
                pipe.llen(queue)
            pipe.hgetall(contract.STATS_KEY)
            for stage in contract.STAGES:
                pipe.hgetall(contract.stage_key(stage))
            for lane in contract.LANES:
                pipe.hgetall(contract.wait_key(lane))
            replies = pipe.execute()
        depths = replies[: len(QUEUES)]
        raw_stats = replies[len(QUEUES)]
        stages = replies[len(QUEUES) + 1 : len(QUEUES) + 1 + len(contract.STAGES)]
        waits = replies[-len(contract.LANES) :]
        depth = GaugeMetricFamily(
            "bgq_queue_depth", "Messages waiting in each queue.", labels=["queue"]
        )
        for queue, n in {**dict(zip(QUEUES, depths, strict=True)), **(model_queues or {})}.items():
            depth.add_metric([queue], n)
        yield depth
        yield from counter_metrics({k.decode(): float(v) for k, v in raw_stats.items()})
        yield histogram(
            "bgq_stage_seconds",
            "Seconds per stage of a computed result, all worker processes on all machines.",
            "stage",
            dict(zip(contract.STAGES, stages, strict=True)),
            contract.STAGE_BUCKETS,
        )
        yield histogram(
            "bgq_lane_wait_seconds",
            "Seconds a job waited in its lane, from enqueue to the start of its first run.",
            "lane",
            dict(zip(contract.LANES, waits, strict=True)),
            contract.WAIT_BUCKETS,
        )

    def _from_store(self) -> Iterator[Metric]:
        stats = self.scanner.stats
        if stats is None:
            return
        entries = GaugeMetricFamily("bgq_store_entries", "Objects in the store.", labels=["kind"])
        size = GaugeMetricFamily("bgq_store_bytes", "Bytes in the store.", labels=["kind"])
        entries.add_metric(["results"], stats.results)
        entries.add_metric(["inputs"], stats.inputs)
        entries.add_metric(["masks"], stats.masks)
        size.add_metric(["results"], stats.result_bytes)
        size.add_metric(["inputs"], stats.input_bytes)
        size.add_metric(["masks"], stats.mask_bytes)
        yield entries
        yield size


def counter_metrics(stats: dict[str, float]) -> Iterator[Metric]:
    """The cluster's counters (STATS_KEY) and the hit ratio."""
    hits, misses = stats.get(Counter.CACHE_HITS, 0.0), stats.get(Counter.CACHE_MISSES, 0.0)
    yield CounterMetricFamily(
        "bgq_jobs_enqueued",
        "Jobs producers put on the queue.",
        stats.get(Counter.ENQUEUED, 0.0),
    )
    yield CounterMetricFamily(
        "bgq_cache_hits",
        "Submissions answered from the store (producers report in batches).",
        hits,
    )
    yield CounterMetricFamily(
        "bgq_cache_misses",
        "Submissions not in the store (enqueued or joined in flight).",
        misses,
    )
    ratio = GaugeMetricFamily("bgq_cache_hit_ratio", "hits / (hits + misses), since Redis began.")
    ratio.add_metric([], hits / (hits + misses) if hits + misses else 0.0)
    yield ratio
    results = CounterMetricFamily(
        "bgq_results",
        "Finished jobs by outcome: computed, skipped (already in the store), failed.",
        labels=["status"],
    )
    for outcome in OUTCOMES:
        results.add_metric([outcome.value], stats.get(outcome, 0.0))
    yield results
    yield CounterMetricFamily(
        "bgq_inferences",
        "Model runs, all workers: one per (input, model); output variants reuse its masks.",
        stats.get(Counter.INFERENCES, 0.0),
    )


def histogram(
    name: str,
    documentation: str,
    label: str,
    hashes: dict[str, dict[bytes, bytes]],
    bounds: tuple[float, ...],
) -> HistogramMetricFamily:
    """A histogram from Redis hashes of `le:<bound>` counts (not cumulative), `sum`, `count`."""
    family = HistogramMetricFamily(name, documentation, labels=[label])
    for value, raw in hashes.items():
        fields = {k.decode(): float(v) for k, v in raw.items()}
        buckets, cumulative = [], 0.0
        for bound in bounds:
            cumulative += fields.get(f"le:{bound:g}", 0.0)
            buckets.append((f"{bound:g}", cumulative))
        buckets.append(("+Inf", fields.get("count", 0.0)))
        family.add_metric([value], buckets, fields.get("sum", 0.0))
    return family


def lane_metrics(snapshot: Snapshot) -> Iterator[Metric]:
    """Per lane: jobs waiting and running, the oldest wait, the workers serving it; bulk runs."""
    gauges = {
        "waiting": GaugeMetricFamily(
            "bgq_lane_waiting",
            "Jobs waiting in each lane (bulk: let into bgq.bulk, or in their run's list).",
            labels=["lane"],
        ),
        "running": GaugeMetricFamily(
            "bgq_lane_running",
            "Jobs of each lane that workers hold (running; kombu's unacked messages).",
            labels=["lane"],
        ),
        "oldest": GaugeMetricFamily(
            "bgq_lane_oldest_wait_seconds",
            "Seconds the oldest waiting job of each lane has waited (0 when none waits).",
            labels=["lane"],
        ),
        "workers": GaugeMetricFamily(
            "bgq_lane_workers", "Live worker nodes that consume each lane.", labels=["lane"]
        ),
        "processes": GaugeMetricFamily(
            "bgq_lane_pool_processes",
            "Pool processes of the live workers that consume each lane.",
            labels=["lane"],
        ),
    }
    for lane, stats in snapshot.lanes.items():
        for field, gauge in gauges.items():
            gauge.add_metric([lane], getattr(stats, field) or 0)
    yield from gauges.values()
    runs = GaugeMetricFamily(
        "bgq_bulk_runs", "Bulk runs with jobs waiting to be let in (they share bulk round-robin)."
    )
    runs.add_metric([], len(snapshot.runs))
    yield runs
    yield from model_metrics(snapshot)


def model_metrics(snapshot: Snapshot) -> Iterator[Metric]:
    """Per known model: its jobs waiting and running by lane, the live workers serving it."""
    by_lane = {
        "waiting": GaugeMetricFamily(
            "bgq_model_waiting",
            "Jobs of each model waiting in each lane (bulk: let in, or in a run's list, "
            "counted under the model of the run's oldest job).",
            labels=["model", "lane"],
        ),
        "running": GaugeMetricFamily(
            "bgq_model_running",
            "Jobs of each model and lane that workers hold.",
            labels=["model", "lane"],
        ),
    }
    workers = GaugeMetricFamily(
        "bgq_model_workers", "Live worker nodes that serve each model.", labels=["model"]
    )
    processes = GaugeMetricFamily(
        "bgq_model_pool_processes",
        "Pool processes of the live workers that serve each model.",
        labels=["model"],
    )
    for model, stats in snapshot.models.items():
        for field, gauge in by_lane.items():
            for lane, count in getattr(stats, field).items():
                gauge.add_metric([model, lane], count)
        workers.add_metric([model], stats.workers)
        processes.add_metric([model], stats.processes)
    yield from (*by_lane.values(), workers, processes)


class Exporter:
    """The HTTP server of `bgq exporter` (its own thread); stop() shuts it down."""

    def __init__(self, settings: Settings, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        self.client = redis_client(settings, timeout=10)
        self.scanner = StoreScanner(settings).start()
        self.registry = CollectorRegistry()
        self.registry.register(BgqCollector(self.client, self.scanner))
        self.server: WSGIServer
        self.server, self.thread = start_http_server(port, host, registry=self.registry)
        self.port = self.server.server_port

    def stop(self) -> None:
        self.scanner.stop()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
        self.client.close()

    def wait_for_scan(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.scanner.stats is None and time.monotonic() < deadline:
            time.sleep(0.05)
