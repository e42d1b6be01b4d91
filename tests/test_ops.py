"""Operations: Flower, the exporter, cache stats and prune, beat; real Redis and workers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis
from celery import Celery
from celery.beat import PersistentScheduler
from kombu import Connection

from bgq import cache, contract, defaults
from bgq.contract import INPUTS, MASKS, RESULTS, Counter
from bgq.exporter import BgqCollector, Exporter
from bgq.process import free_port
from bgq.redis_server import EmbeddedRedis
from bgq.settings import Settings
from bgq.stack import LocalStack, restore_unacked
from bgq.store import Entry, FileStore, Store, open_store
from bgq.units import parse_duration, parse_size
from producer import Producer
from tests.helpers import (
    BGQ,
    LocalStackControl,
    answers,
    bgq,
    bgq_in_process,
    settle,
    stale_leftovers,
    variant,
    wait_for,
)
from tests.stacks import both_stores

DAY = 86400.0


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from a Prometheus text page (0 when absent)."""
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found[1]) if found else 0.0


# -- Flower --------------------------------------------------------------------------------


def test_up_with_flower_shows_workers_and_tasks_behind_basic_auth(
    env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    env = {**env, "BGQ_FLOWER_BASIC_AUTH": "admin:s3cret"}
    up = subprocess.Popen(
        [BGQ, "up", "--workers", "1", "--flower", "--flower-port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    auth = ("admin", "s3cret")
    try:
        wait_for(lambda: answers(f"{url}/healthcheck"), timeout=120, what="Flower")
        assert httpx.get(f"{url}/api/workers").status_code == 401
        assert httpx.get(f"{url}/", auth=("admin", "wrong")).status_code == 401

        def workers() -> list[str]:
            reply = httpx.get(f"{url}/api/workers", params={"refresh": "1"}, auth=auth, timeout=30)
            return list(reply.json()) if reply.status_code == 200 else []

        wait_for(lambda: any(w.startswith("bgq-") for w in workers()), what="a worker in Flower")
        image = tmp_path / "car.jpg"
        image.write_bytes(variant("car-1.jpg", (3, 3, 303, 203)))
        submitted = bgq("submit", str(image), env=env)
        assert submitted.returncode == 0, submitted.stderr
        key = submitted.stdout.split()[1]

        def task() -> dict[str, object]:
            reply = httpx.get(f"{url}/api/task/info/{key}", auth=auth, timeout=30)
            return dict(reply.json()) if reply.status_code == 200 else {}

        wait_for(lambda: task().get("state") == "SUCCESS", what="the task's events in Flower")
        assert float(str(task()["runtime"])) > 0
        metrics = httpx.get(f"{url}/metrics")
        assert metrics.status_code == 200 and "flower_events_total" in metrics.text
    finally:
        up.send_signal(signal.SIGINT)
        _, err = up.communicate(timeout=60)
    assert up.returncode == 0, err


def test_flower_refuses_a_public_address_without_auth(redis_url: str, env: dict[str, str]) -> None:
    result = bgq("flower", "--address", "0.0.0.0", env={**env, "BGQ_REDIS_URL": redis_url})
    assert result.returncode == 2 and "BGQ_FLOWER_BASIC_AUTH" in result.stderr


# -- bgq up's requeue at start ---------------------------------------------------------------

# A worker that takes a message and holds it unacknowledged (kombu: in `unacked`), connected.
HOLDER = """
import sys, time
from kombu import Connection

with Connection(sys.argv[1]) as conn:
    assert conn.default_channel.basic_get(sys.argv[2], no_ack=False) is not None
    print("held", flush=True)
    time.sleep(300)
"""


def queued_and_held(url: str) -> tuple[int, int]:
    """Messages in the `bgq` queue, and held (kombu's `unacked`), read on a connection closed
    at once: `restore_unacked` counts any other client as a worker."""
    with redis.Redis.from_url(url, single_connection_client=True) as client:
        return client.llen(contract.QUEUE), client.hlen("unacked")


def connections(url: str) -> int:
    """The clients connected to Redis, this one included."""
    with redis.Redis.from_url(url, single_connection_client=True) as client:
        return len(client.client_list())


def test_a_stack_requeues_at_once_only_what_no_connected_worker_holds(tmp_path: Path) -> None:
    """`bgq up` requeues what its killed worker held without waiting a lease, but not while
    another worker is connected to its Redis (a `bgq worker` on the stack's Redis may be
    running it): that one is left to the lease; once the holder is gone, requeued at once."""
    server = EmbeddedRedis.start(tmp_path / "run")
    holder = None
    try:
        with Connection(server.url) as conn:
            conn.SimpleQueue(contract.QUEUE).put({"job": 1})
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, server.url, contract.QUEUE],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert not restore_unacked(server.url)
        assert queued_and_held(server.url) == (0, 1)
        holder.kill()  # a host lost: no hand-back, its connection dropped
        holder.wait()
        holder.stdout.close()
        wait_for(lambda: connections(server.url) == 1, 10, "the holder's connection to close")
        assert restore_unacked(server.url)
        assert queued_and_held(server.url) == (1, 0)
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait()
        server.stop()


# -- exporter ------------------------------------------------------------------------------


@pytest.fixture
def exporter(stack: LocalStack) -> Iterator[Exporter]:
    server = Exporter(stack.settings, "127.0.0.1", 0)
    server.wait_for_scan()
    yield server
    server.stop()


def scrape(server: Exporter) -> str:
    return httpx.get(f"http://127.0.0.1:{server.port}/metrics").text


class StatsPipeline:
    """A pipeline that answers the exporter's reads: queue lengths 0, `stats` as STATS_KEY."""

    def __init__(self, stats: dict[bytes, bytes]) -> None:
        self.stats = stats
        self.replies: list[Any] = []

    def __enter__(self) -> StatsPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def llen(self, key: str) -> None:
        self.replies.append(0)

    def hgetall(self, key: str) -> None:
        self.replies.append(self.stats if key == contract.STATS_KEY else {})

    def execute(self) -> list[Any]:
        return self.replies


def test_exporter_names_each_counter() -> None:
    """Each field of STATS_KEY reaches its metric (names that dashboards and alerts use)."""
    values = {counter: float(n) for n, counter in enumerate(Counter, start=1)}
    raw = {counter.value.encode(): str(value).encode() for counter, value in values.items()}
    client = SimpleNamespace(pipeline=lambda transaction: StatsPipeline(raw))
    collector = BgqCollector(client, scanner=None)  # type: ignore[arg-type]
    samples = {
        (sample.name, tuple(sample.labels.values())): sample.value
        for family in collector._from_redis()
        for sample in family.samples
    }
    assert samples[("bgq_jobs_enqueued_total", ())] == values[Counter.ENQUEUED]
    assert samples[("bgq_cache_hits_total", ())] == values[Counter.CACHE_HITS]
    assert samples[("bgq_cache_misses_total", ())] == values[Counter.CACHE_MISSES]
    for outcome in (Counter.COMPUTED, Counter.SKIPPED, Counter.FAILED):
        assert samples[("bgq_results_total", (outcome.value,))] == values[outcome]
    assert samples[("bgq_inferences_total", ())] == values[Counter.INFERENCES]


def test_exporter_queue_depth_results_stages_and_cache_hits(
    stack: LocalStack, exporter: Exporter, redis_client: redis.Redis
) -> None:
    producer = Producer(stack.settings)
    images = [variant("anime-girl-1.jpg", (i, i, 400 + i, 300 + i)) for i in range(3)]
    before = scrape(exporter)
    control = LocalStackControl(stack)
    control.pause()
    try:
        jobs = [producer.submit(data) for data in images]
        queued = scrape(exporter)
        assert metric(queued, "bgq_queue_depth", 'queue="bgq"') == 3
        assert (
            metric(queued, "bgq_jobs_enqueued_total") - metric(before, "bgq_jobs_enqueued_total")
            == 3
        )
    finally:
        control.resume()
    for job in jobs:
        job.wait(timeout=120)
        settle(redis_client, job.key)
    done = scrape(exporter)
    assert metric(done, "bgq_queue_depth", 'queue="bgq"') == 0
    computed = 'status="computed"'
    assert (
        metric(done, "bgq_results_total", computed) - metric(before, "bgq_results_total", computed)
        == 3
    )
    for stage in ("decode", "inference", "encode", "write"):
        count = f'stage="{stage}"'
        assert metric(done, "bgq_stage_seconds_count", count) >= 3
        assert metric(done, "bgq_stage_seconds_bucket", f'le="+Inf",{count}') >= 3

    # A repeated submit is a cache hit, counted once the producer's batch reaches Redis.
    assert producer.submit(images[0]).cached and producer.submit(images[1]).cached
    producer.flush_stats()
    hits = scrape(exporter)
    assert metric(hits, "bgq_cache_hits_total") - metric(done, "bgq_cache_hits_total") == 2
    assert 0 < metric(hits, "bgq_cache_hit_ratio") < 1
    assert metric(hits, "bgq_redis_up") == 1


def test_exporter_store_size(stack: LocalStack, exporter: Exporter) -> None:
    stats = cache.store_stats(open_store(stack.settings))
    text = scrape(exporter)
    assert metric(text, "bgq_store_entries", 'kind="results"') == stats.results
    assert metric(text, "bgq_store_bytes", 'kind="results"') == stats.result_bytes


def test_exporter_command(stack: LocalStack, env: dict[str, str]) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [BGQ, "exporter", "--port", str(port)],
        env={**env, "BGQ_REDIS_URL": stack.url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = f"http://127.0.0.1:{port}/metrics"
        wait_for(lambda: answers(metrics, "bgq_queue_depth"), timeout=60, what="bgq exporter")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


# -- cache lifecycle ----------------------------------------------------------------------


def key(n: int) -> str:
    return f"{n:064x}"


def written(store: Store, kind: str, name: str, size: int) -> Entry:
    store.write(kind, name, b"x" * size)
    entry = store.stat(kind, name)
    assert entry is not None
    return entry


def test_prune_by_age_skips_in_flight_and_recent(store: Store, redis_client: redis.Redis) -> None:
    old, busy = written(store, RESULTS, key(1), 1000), written(store, RESULTS, key(3), 1000)
    redis_client.set(contract.guard_key(key(3)), "1", ex=60)  # its job is in flight
    try:
        recent = cache.prune(store, redis_client, max_age=0, now=busy.mtime + 10)
        assert recent.skipped_recent == 2 and recent.removed == 0  # used in the last minute
        report = cache.prune(store, redis_client, max_age=7 * DAY, now=busy.mtime + 10 * DAY)
        assert not store.has_output(old.name) and store.has_output(busy.name)
        assert (report.removed, report.skipped_in_flight) == (1, 1)
    finally:
        redis_client.delete(contract.guard_key(key(3)))


def test_prune_by_size_drops_the_least_recently_used(store: Store) -> None:
    first = written(store, RESULTS, key(1), 1000)
    time.sleep(1.1)  # distinct last uses (S3's Last-Modified has whole seconds)
    second = written(store, RESULTS, key(2), 1000)
    time.sleep(1.1)
    third = written(store, RESULTS, key(3), 1000)
    report = cache.prune(store, None, max_size=2000, keep_inputs=True, now=third.mtime + DAY)
    assert not store.has_output(first.name)
    assert store.has_output(second.name) and store.has_output(third.name)
    assert report.removed == 1 and not report.notes
    report = cache.prune(store, None, max_size=0, keep_inputs=True, now=third.mtime + 30)
    assert report.skipped_recent == 2 and report.notes  # still over the limit, and it says why


def test_prune_removes_temporary_files(tmp_path: Path) -> None:
    files, now = FileStore(tmp_path), time.time()
    tmp = files.local_path(key(7)).with_name(".x.png.abc.tmp")
    tmp.parent.mkdir(parents=True)
    tmp.write_bytes(b"x")
    os.utime(tmp, (now - DAY, now - DAY))
    assert cache.prune(files, None, max_age=7 * DAY, now=now).temporaries_removed == 1
    assert not tmp.exists()


@both_stores
def test_a_cache_hit_counts_as_a_use(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> None:
    producer = Producer(stack.settings)
    data = variant("car-1.jpg", (0, 0, 250, 250))
    job = producer.submit(data)
    job.wait(timeout=120)
    before = producer.store.stat(RESULTS, job.output)
    assert before is not None
    time.sleep(1.1)
    monkeypatch.setattr(defaults, "USE_RESOLUTION", 0.0)
    assert producer.submit(data).cached  # a hit re-stamps the result's last use
    report = cache.prune(producer.store, None, max_age=7 * DAY, now=before.mtime + 7 * DAY + 0.6)
    assert producer.store.has_output(job.output)
    assert report.removed == report.masks_removed == 1  # the hit used the result, not its mask


def test_prune_removes_inputs_no_job_needs(store: Store, redis_client: redis.Redis) -> None:
    done = written(store, INPUTS, "a" * 64, 100)
    needed = written(store, INPUTS, "b" * 64, 100)
    time.sleep(1.1)
    fresh = written(store, INPUTS, "c" * 64, 100)  # a producer may be enqueueing it
    now = max(done.mtime, needed.mtime) + defaults.PRUNE_INPUT_GRACE + 0.5
    redis_client.sadd(contract.input_refs_key("b" * 64), key(1))
    try:
        kept = cache.prune(store, redis_client, keep_inputs=True, now=now)
        assert kept.inputs_removed == 0 and store.stat(INPUTS, done.name)
        assert cache.prune(store, None, now=now).notes  # no Redis: inputs kept, said why
        report = cache.prune(store, redis_client, now=now)
        assert store.stat(INPUTS, done.name) is None
        assert store.stat(INPUTS, needed.name) and store.stat(INPUTS, fresh.name)
        assert (report.inputs_removed, report.inputs_kept) == (1, 1)
    finally:
        redis_client.delete(contract.input_refs_key("b" * 64))


def test_finished_jobs_release_their_inputs(producer: Producer, redis_client: redis.Redis) -> None:
    data = variant("cloth-1.jpg", (0, 0, 300, 300))
    job = producer.submit(data)
    assert job.args is not None
    assert redis_client.sismember(contract.input_refs_key(job.args.input_sha256), job.key)
    job.wait(timeout=120)
    settle(redis_client, job.key)
    assert not redis_client.exists(contract.input_refs_key(job.args.input_sha256))


def outputs(store: Store) -> list[str]:
    return sorted(entry.name for entry in [*store.scan(RESULTS), *store.scan(MASKS)])


def test_prune_task_runs_on_the_workers(stack: LocalStack) -> None:
    store = open_store(stack.settings)
    assert isinstance(store, FileStore)
    kept = outputs(store)
    stale_input, temporary = stale_leftovers(store)
    app = Producer(stack.settings).app
    sent = app.send_task(contract.PRUNE_TASK_NAME)
    wait_for(sent.ready, timeout=60, what="the prune")  # no .get(): its subscription leaks
    result = sent.result
    # These workers set no age or size limit: every result and mask stays, the leftovers go.
    assert (result["removed"], result["kept"]) == (0, len(kept)) and outputs(store) == kept
    assert result["inputs_removed"] >= 1 and result["temporaries_removed"] >= 1
    assert not stale_input.exists() and not temporary.exists()
    schedule = app.conf.beat_schedule if app.conf.beat_schedule else {}
    assert any(e["task"] == contract.PRUNE_TASK_NAME for e in schedule.values())


def test_cache_commands(stack: LocalStack, env: dict[str, str]) -> None:
    env = {**env, "BGQ_REDIS_URL": stack.url, "BGQ_HOME": str(stack.settings.home)}
    stats = bgq("cache", "stats", env=env)
    assert stats.returncode == 0, stats.stderr
    assert re.search(r"results:\s+\d+ \(", stats.stdout) and "hit rate:" in stats.stdout
    dry = bgq("cache", "prune", "--max-age", "0s", "--dry-run", env=env)
    assert dry.returncode == 0 and "would remove" in dry.stdout
    assert bgq_in_process("cache", "prune", "--max-size", "lots", env=env).returncode == 2


def test_cache_prune_with_nothing_running(env: dict[str, str]) -> None:
    result = bgq("cache", "prune", "--max-age", "7d", env=env)
    assert result.returncode == 0, result.stderr
    assert "removed 0 result(s)" in result.stdout and "inputs kept" in result.stdout


def overdue_prune(app: Celery, schedule: Path) -> None:
    """Write beat's schedule file as a beat that last sent the prune two intervals ago leaves
    it (it was down since): a beat started on it sends the prune at once, not in an hour."""
    schedule.parent.mkdir(parents=True, exist_ok=True)
    scheduler = PersistentScheduler(app=app, schedule_filename=str(schedule))
    try:
        entry = scheduler.schedule["bgq-prune-cache"]
        entry.last_run_at = entry.default_now() - timedelta(seconds=2 * defaults.PRUNE_INTERVAL)
    finally:
        scheduler.close()


def test_beat_sends_the_prune_and_the_workers_run_it(
    stack: LocalStack, env: dict[str, str], tmp_path: Path
) -> None:
    store = open_store(stack.settings)
    assert isinstance(store, FileStore)
    stale_input, temporary = stale_leftovers(store)
    beat_home = Settings(home=Path(env["BGQ_HOME"]))
    overdue_prune(Producer(stack.settings).app, beat_home.run_dir / "celerybeat-schedule")
    log = tmp_path / "beat.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [BGQ, "beat"], env={**env, "BGQ_REDIS_URL": stack.url}, stdout=out, stderr=out
        )
    try:
        wait_for(lambda: "beat: Starting" in log.read_text(), timeout=60, what="beat")
        sending = "Sending due task bgq-prune-cache (bgq.prune_cache)"
        wait_for(lambda: sending in log.read_text(), timeout=60, what="beat to send the prune")
        wait_for(
            lambda: not stale_input.exists() and not temporary.exists(),
            timeout=60,
            what="the workers to run the prune beat sent",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("15m", 900), ("12h", 43200), ("7d", 604800), ("90", 90)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"), [("20G", 20 * 2**30), ("500M", 500 * 2**20), ("1.5k", 1536), ("7", 7)]
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size
