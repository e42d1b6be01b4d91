"""Leases (workers/leases.py): two real workers on one Redis of this module's own.

A job is held in a worker by a Gate (a named pipe in place of its input); then its holder is
killed, paused past its lease, or cut off from the store or from Redis. Leases are short here
(LEASE s) so that a takeover takes seconds.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis

from bgq import contract, defaults
from bgq.connections import renew_interval
from bgq.contract import INPUTS, RESULTS, Counter, TaskArgs
from bgq.options import Options
from bgq.process import free_port
from bgq.redis_server import EmbeddedRedis
from bgq.settings import Settings
from bgq.stack import LocalStack
from bgq.store import FileStore
from producer import Producer
from producer.job import Job
from tests.helpers import Gate, assert_same_pixels, stats, variant, wait_for

LEASE = 6  # seconds (the least BGQ_LEASE allows): a takeover within LEASE + LEASE/6
# The most a takeover may take: about LEASE + LEASE/6 (7 s) on an idle machine, more with the
# sweep, poll, prefetch and pool start on a loaded one. It still fails a job that is never taken
# over, taken over only by kombu's own restore (visibility timeout 3600 s: leases not applied),
# or after the default lease (BGQ_LEASE not applied: about 35 s).
TAKEOVER = defaults.LEASE - 5
assert LEASE + LEASE / 6 < TAKEOVER < defaults.LEASE


class Cluster:
    """This module's Redis (restartable on its port), a shared store, and its workers."""

    def __init__(self, root: Path, model_home: Path, lease: int = LEASE) -> None:
        self.root = root
        self.lease = lease
        self.port = free_port()
        self.redis: EmbeddedRedis | None = EmbeddedRedis.start(root / "redis", port=self.port)
        self.url = self.redis.url
        self.client = redis.Redis.from_url(self.url)
        self.model_home = model_home
        self.store = FileStore(root / "store")
        self.workers: list[LocalStack] = []

    def settings(self, name: str) -> Settings:
        return Settings(
            home=self.root / name,
            redis_url=self.url,
            models_dir=self.model_home,
            store_url=str(self.store.root),
            concurrency=1,
            lease=self.lease,
        )

    def start_worker(self) -> LocalStack:
        name = f"worker{len(self.workers)}"
        stack = LocalStack(self.settings(name), log=self.root / f"{name}.log")
        self.workers.append(stack)
        return stack.start()

    def stop_redis(self) -> None:
        assert self.redis is not None
        self.redis.stop()
        self.redis = None

    def start_redis(self) -> None:
        self.redis = EmbeddedRedis.start(self.root / "redis", port=self.port)

    def stop(self) -> None:
        for stack in self.workers:
            if stack.worker is not None:
                signal_group(stack, signal.SIGCONT)
            stack.stop()
        self.workers = []
        if self.redis is None:
            self.start_redis()
        self.client.flushdb()
        self.client.close()
        assert self.redis is not None
        self.redis.stop()


def signal_group(stack: LocalStack, sig: signal.Signals) -> None:
    """Send `sig` to a worker's main process and its pool (its own process group)."""
    assert stack.worker is not None
    os.killpg(stack.worker.pid, sig)


@pytest.fixture
def cluster(tmp_path: Path, model_home: Path) -> Iterator[Cluster]:
    """Two single-process workers on a new Redis and store."""
    cluster = Cluster(tmp_path, model_home)
    try:
        cluster.start_worker()
        cluster.start_worker()
        yield cluster
    finally:
        cluster.stop()


class HeldJob:
    """A job whose pool process is held at its input (a Gate) until `release()`."""

    def __init__(
        self,
        cluster: Cluster,
        producer: Producer,
        box: tuple[int, int, int, int],
        lane: str = contract.INTERACTIVE,
    ) -> None:
        self.cluster = cluster
        self.data = variant("car-1.jpg", box)
        self.path = cluster.store.path(INPUTS, contract.input_digest(self.data))
        self.gate = Gate(self.path)
        self.job: Job = producer.submit(self.data, lane=lane)
        self.gate.wait_for_reader()

    def holder(self, timeout: float = 60, among: list[LocalStack] | None = None) -> LocalStack:
        """The worker whose pool process is blocked on the input (looked for until found)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for stack in among or self.cluster.workers:
                if stack.worker is not None and self.gate._holder(stack.worker.pid):
                    return stack
            time.sleep(0.05)
        raise AssertionError(f"no worker took {self.job.key}")

    def release(self) -> None:
        """Give the blocked reader the input; later reads find a plain file."""
        self.gate.let_through(self.data)
        self.gate.remove()
        self.path.write_bytes(self.data)

    def counter(self, key: Callable[[str], str]) -> int:
        return int(self.cluster.client.get(key(self.job.key)) or 0)


@pytest.fixture
def producer(cluster: Cluster) -> Iterator[Producer]:
    with Producer(cluster.settings("producer")) as producer:
        yield producer


def other(cluster: Cluster, stack: LocalStack) -> LocalStack:
    return next(s for s in cluster.workers if s is not stack)


@pytest.mark.parametrize("lane", contract.LANES)
def test_a_lost_workers_job_runs_on_another_within_the_lease(
    cluster: Cluster, producer: Producer, reference: Callable[..., bytes], lane: str
) -> None:
    """SIGKILL of a whole worker (main process and pool: a host lost) holding a job: the
    other worker, idle on the same Redis, runs it within the lease and a sweep; the death of a
    whole worker is not a pool-process death (poison counter untouched). In either lane: a
    bulk job goes back to the bulk queue it was let into."""
    held = HeldJob(cluster, producer, (0, 0, 300, 220), lane)
    lost = held.holder()
    signal_group(lost, signal.SIGKILL)
    killed_at = time.monotonic()
    assert lost.worker is not None
    lost.worker.wait()
    lost.worker = None
    survivor = held.holder(timeout=TAKEOVER, among=[other(cluster, lost)])
    took = time.monotonic() - killed_at
    print(f"taken over {took:.1f}s after the kill (lease {LEASE}s)")
    assert took <= TAKEOVER
    assert survivor is not lost
    assert held.counter(contract.attempts_key) == 0  # no pool-process death counted
    assert held.counter(contract.starts_key) == 2  # started twice, finished never yet
    held.release()
    assert_same_pixels(held.job.read(timeout=120), reference(held.data))
    wait_for(lambda: stats(cluster.client).get(Counter.COMPUTED) == 1, 30, "the count")


def test_a_job_longer_than_the_lease_is_never_handed_out_twice(
    cluster: Cluster, producer: Producer
) -> None:
    """Held 2 x LEASE + 2 s in a live worker: its lease is renewed (the score moves), the
    other worker, idle, never gets it, and it is started and counted once."""
    held = HeldJob(cluster, producer, (0, 0, 310, 230))
    holder = held.holder()
    idle = other(cluster, holder)
    scores: set[float] = set()
    started = time.monotonic()
    while time.monotonic() - started < 2 * LEASE + 2:
        with cluster.client.pipeline() as pipe:  # one transaction: the score and Redis's time
            [(_tag, score)], (seconds, micros) = (
                pipe.zrange("unacked_index", 0, -1, withscores=True).time().execute()
            )
        # The lease never lapsed: a score older than LEASE is one any worker's sweep takes back.
        assert seconds + micros / 1e6 - score < LEASE, (seconds, micros, score)
        scores.add(score)
        assert idle.worker is not None and not held.gate._holder(idle.worker.pid)
        assert held.counter(contract.starts_key) == 1
        time.sleep(0.2)
    assert max(scores) > min(scores) + LEASE  # renewed beyond one lease
    held.release()
    held.job.wait(timeout=120)
    wait_for(lambda: stats(cluster.client).get(Counter.COMPUTED) == 1, 30, "the count")
    assert stats(cluster.client)[Counter.COMPUTED] == 1
    assert not cluster.client.hlen("unacked")


def test_a_holder_back_after_its_lease_was_taken_changes_nothing(
    cluster: Cluster, producer: Producer, reference: Callable[..., bytes]
) -> None:
    """A holder paused (SIGSTOP: no renewals) past its lease: the other worker takes the job.
    Resumed, the old holder finishes first: it writes the same bytes, its acknowledgement does
    not remove the new holder's record, and the job is counted once when both have ended.

    Only the new holder's pool process is paused meanwhile (so the old one reads the input):
    its main process keeps renewing the lease, so however long the old run takes on a loaded
    machine, no sweep takes the job from the new holder (a paused main process would lose it
    after LEASE s)."""
    held = HeldJob(cluster, producer, (0, 0, 320, 240))
    old = held.holder()
    signal_group(old, signal.SIGSTOP)
    try:
        new = held.holder(timeout=TAKEOVER, among=[other(cluster, old)])
        assert new.worker is not None
        waiting = held.gate.reader(new.worker.pid)
        waiting.suspend()  # the new holder's run waits; its main process renews its lease
        wait_for(lambda: waiting.status() == psutil.STATUS_STOPPED, 10, "the new run stopped")
        signal_group(old, signal.SIGCONT)
        held.gate.let_through(held.data)  # only the old holder's reads: it gets the bytes
        wait_for(lambda: stats(cluster.client).get(Counter.COMPUTED) == 1, 60, "the old run")
        wait_for(lambda: "lost the lease" in log_of(old), 30, "the old holder's fence")
        assert cluster.client.hlen("unacked") == 1  # the new holder's record is still there
        held.gate.wait_for_reader()  # the new holder's pool process still holds the pipe
        assert "lost the lease" not in log_of(new)  # renewed all along
        waiting.resume()
        held.gate.let_through(held.data)
    finally:
        for stack in cluster.workers:
            signal_group(stack, signal.SIGCONT)
    assert_same_pixels(held.job.read(timeout=120), reference(held.data))
    wait_for(lambda: not cluster.client.hlen("unacked"), 60, "the new holder's ack")
    counts = stats(cluster.client)
    assert counts[Counter.COMPUTED] == 1 and Counter.FAILED not in counts
    assert producer.task_meta(held.job.key)["status"] == "SUCCESS"


def log_of(stack: LocalStack) -> str:
    assert stack.log is not None
    return stack.log.read_text(errors="replace")


def test_a_store_that_cannot_be_written_never_fails_the_job(
    cluster: Cluster, producer: Producer, reference: Callable[..., bytes]
) -> None:
    """The store refuses the result's write (its results folder replaced by a file): the task
    retries, never FAILURE, and the job completes once the store is writable again."""
    results = cluster.store.root / RESULTS
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_bytes(b"not a folder")
    data = variant("car-1.jpg", (0, 0, 330, 250))
    job = producer.submit(data)
    wait_for(lambda: producer.task_meta(job.key)["status"] == "RETRY", 60, "a retry")
    assert producer.task_meta(job.key)["status"] != "FAILURE"
    results.unlink()
    assert_same_pixels(job.read(timeout=180), reference(data))
    wait_for(lambda: stats(cluster.client).get(Counter.COMPUTED) == 1, 30, "the count")
    assert Counter.FAILED not in stats(cluster.client)
    # Counted under the enqueue's guard token: the retries kept the task's headers.
    assert (cluster.client.get(contract.counted_key(job.key)) or b"").startswith(b"interactive:")


def test_redis_gone_at_the_retry_never_fails_the_job(
    cluster: Cluster, producer: Producer, reference: Callable[..., bytes]
) -> None:
    """Redis stops while a job runs, and the store refuses its write: the task cannot publish
    its retry (Celery would then reject it for good and store FAILURE). Its worker requeues it
    instead, or, Redis being still gone, leaves it to the lease: once Redis is back (same data)
    and the store writable, the job completes."""
    held = HeldJob(cluster, producer, (0, 0, 340, 260))
    holder = held.holder()
    results = cluster.store.root / RESULTS
    results.write_bytes(b"not a folder")
    cluster.stop_redis()
    held.release()
    rejected = f"Task {contract.TASK_NAME}[{held.job.key}] reject requeue=True"
    wait_for(lambda: rejected in log_of(holder), 120, "the retry's publish to fail")
    results.unlink()
    cluster.start_redis()
    assert_same_pixels(held.job.read(timeout=180), reference(held.data))
    assert Counter.FAILED not in stats(cluster.client)


def kill_connections(cluster: Cluster, stack: LocalStack) -> int:
    """CLIENT KILL every Redis connection of a worker's main process (what a Sentinel failover,
    a dropped half-open socket or a NAT reset looks like to it); how many were killed."""
    assert stack.worker is not None
    main = psutil.Process(stack.worker.pid)
    killed = 0
    for conn in main.net_connections(kind="tcp"):
        if conn.raddr and conn.raddr.port == cluster.port:
            killed += cluster.client.client_kill_filter(
                _id=None, addr=f"{conn.laddr.ip}:{conn.laddr.port}"
            )
    return killed


RECONNECTED = "Connection to broker lost"  # Celery's warning when its consumer reconnects


def test_a_reconnect_keeps_the_running_job_and_its_lease(
    cluster: Cluster, producer: Producer, reference: Callable[..., bytes]
) -> None:
    """The holder's connections are killed while Redis answers: its consumer reconnects, and
    kombu's restore at channel close (off in workers) does not requeue the job it still runs;
    the job's lease is renewed through the new channel (the other worker, idle, never gets it)
    and its acknowledgement reaches Redis; started and counted once."""
    held = HeldJob(cluster, producer, (0, 0, 350, 270))
    holder = held.holder()
    idle = other(cluster, holder)
    assert kill_connections(cluster, holder) >= 1
    wait_for(lambda: RECONNECTED in log_of(holder), 30, "the holder to reconnect")
    assert cluster.client.hlen("unacked") == 1, "the running job was requeued at the reconnect"
    score = cluster.client.zrange("unacked_index", 0, -1, withscores=True)[0][1]
    started = time.monotonic()
    while time.monotonic() - started < LEASE + renew_interval(LEASE) + 2:
        assert idle.worker is not None and not held.gate._holder(idle.worker.pid)
        assert not cluster.client.llen(contract.QUEUE), "the running job was requeued"
        assert cluster.client.hlen("unacked") == 1
        time.sleep(0.2)
    [(_tag, renewed)] = cluster.client.zrange("unacked_index", 0, -1, withscores=True)
    assert renewed > score + LEASE / 2, "not renewed after the reconnect"
    held.release()
    assert_same_pixels(held.job.read(timeout=120), reference(held.data))
    wait_for(lambda: not cluster.client.hlen("unacked"), 30, "the acknowledgement")
    wait_for(lambda: stats(cluster.client).get(Counter.COMPUTED) == 1, 30, "the count")
    assert "lost the lease" not in log_of(holder) and "could not settle" not in log_of(holder)


@pytest.fixture
def long_lease(tmp_path: Path, model_home: Path) -> Iterator[Cluster]:
    """One worker with a 30 s lease: a restart of Redis (seconds) expires none of its leases."""
    cluster = Cluster(tmp_path, model_home, lease=30)
    try:
        cluster.start_worker()
        yield cluster
    finally:
        cluster.stop()


def test_a_countdown_held_across_a_redis_restart_still_runs(long_lease: Cluster) -> None:
    """A retry waiting out its countdown in a worker when Redis restarts: Celery drops it at the
    reconnect (expecting a redelivery); its worker hands it back instead of renewing its lease
    for ever, and the job runs once its countdown is over."""
    cluster = long_lease
    with Producer(cluster.settings("producer")) as producer:
        countdown_across_a_restart(cluster, producer)


def countdown_across_a_restart(cluster: Cluster, producer: Producer) -> None:
    data = variant("car-1.jpg", (0, 0, 360, 280))
    args = TaskArgs.build(contract.input_digest(data), "u2netp", Options())
    producer.store.put_input(args.input_sha256, data)
    producer.app.send_task(
        contract.TASK_NAME, kwargs=args.to_kwargs(), task_id=args.key, countdown=COUNTDOWN
    )
    wait_for(lambda: cluster.client.hlen("unacked") == 1, 30, "a worker to take it")
    assert not cluster.client.llen(contract.QUEUE)
    cluster.stop_redis()
    wait_for(lambda: any(RECONNECTED in log_of(s) for s in cluster.workers), 30, "a reconnect")
    cluster.start_redis()
    wait_for(lambda: producer.task_meta(args.key)["status"] == "SUCCESS", 90, "the job to run")
    wait_for(lambda: not cluster.client.hlen("unacked"), 30, "the acknowledgement")


COUNTDOWN = 8  # seconds: past the restart, and short of a test's patience


def test_a_holder_scaled_down_after_losing_its_lease_hands_nothing_back(
    cluster: Cluster, producer: Producer, reference: Callable[..., bytes]
) -> None:
    """A holder paused past its lease (the other worker took the job, same delivery tag), then
    resumed and scaled down at once (SIGTERM, and a second one to end the grace): its hand-back
    leaves the new holder's record alone (nothing requeued while the new holder runs it)."""
    held = HeldJob(cluster, producer, (0, 0, 370, 290))
    old = held.holder()
    signal_group(old, signal.SIGSTOP)
    new = held.holder(timeout=TAKEOVER, among=[other(cluster, old)])
    assert old.worker is not None
    signal_group(old, signal.SIGCONT)
    old.worker.send_signal(signal.SIGTERM)
    wait_for(lambda: "taking no new jobs" in log_of(old), 30, "the old holder to drain")
    old.worker.send_signal(signal.SIGTERM)  # the grace is over: hand back what runs
    assert old.worker.wait(timeout=30) == 0
    old.worker = None
    assert "lost the lease" in log_of(old)
    assert not cluster.client.llen(contract.QUEUE), "the new holder's job was handed back"
    assert cluster.client.hlen("unacked") == 1  # the new holder's record
    [(_tag, score)] = cluster.client.zrange("unacked_index", 0, -1, withscores=True)
    wait_for(lambda: renewed_since(cluster, score), 30, "the new holder's next renewal")
    # Its record was there all along: it never found it gone, nor took the job a second time.
    assert "lost the lease" not in log_of(new)
    assert log_of(new).count(f"[{held.job.key}] received") == 1
    assert new.worker is not None and held.gate._holder(new.worker.pid)
    held.release()
    assert_same_pixels(held.job.read(timeout=120), reference(held.data))
    wait_for(lambda: not cluster.client.hlen("unacked"), 30, "the new holder's ack")
    wait_for(lambda: stats(cluster.client).get(Counter.COMPUTED) == 1, 30, "the count")


def renewed_since(cluster: Cluster, score: float) -> bool:
    rows = cluster.client.zrange("unacked_index", 0, -1, withscores=True)
    return any(row_score > score for _tag, row_score in rows)
