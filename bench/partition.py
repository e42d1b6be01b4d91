"""A worker host cut off from the network while it holds a job, with five hosts on one machine
(bench/netns.py): Redis, an S3 server (moto), two single-process workers and the producer, each
in its own network namespace. Run by `make bench-elastic` and tests/test_partition.py.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.netns import Network
from bench.s3server import AWS_ENV
from bench.workers import (
    Loss,
    failed_tasks,
    ingest_cmd,
    poll,
    small_catalog,
    started_on,
    stats_of,
    watch,
    worker_cmd,
    worker_env,
)
from bgq.redis_server import redis_server_binary
from bgq.settings import Settings

REDIS_PORT, S3_PORT = 6379, 5000
BUCKET = "bgq-partition"
UNACKED = "unacked"  # kombu's hash of the messages workers have taken and not acknowledged
SETTLE = 240.0  # s at most for the cut worker to reconnect and finish or drop its job


@dataclass
class Partition:
    """What happened: the ingest after the cut, then the cut worker once its link came back."""

    loss: Loss
    out: Path
    reconnected: float | None = None  # s after the restore until w2 answered and held nothing
    before: dict[str, str] = field(default_factory=dict)  # S3 key -> ETag, link still down
    after: dict[str, str] = field(default_factory=dict)  # the same once w2 has settled
    stats: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # task ids in state FAILURE
    leftovers: list[str] = field(default_factory=list)  # namespaces left after the teardown

    def after_line(self) -> str:
        back = "never" if self.reconnected is None else f"{self.reconnected:.1f} s"
        changed = sorted(set(self.before.items()) ^ set(self.after.items()))
        s = self.stats
        return (
            f"w2 reconnected and settled after {back}; store objects {len(self.after)}, "
            f"changed by w2's late work {len(changed)}; computed {s.get('computed', 0)} + "
            f"skipped {s.get('skipped', 0)} for {self.loss.images} inputs, failed "
            f"{s.get('failed', 0)}, model runs {s.get('inferences', 0)}; FAILURE states "
            f"{len(self.failed)}"
        )


class Hosts:
    """The five hosts and the settings every bgq process on them shares."""

    def __init__(self, net: Network, tmp: Path, model_home: Path) -> None:
        self.tmp = tmp
        self.redis, self.s3, self.w1, self.w2, self.prod = (
            net.add(name) for name in ("redis", "s3", "w1", "w2", "prod")
        )
        self.url = f"redis://{self.redis.address}:{REDIS_PORT}/0"
        self.endpoint = f"http://{self.s3.address}:{S3_PORT}"
        self.settings = Settings(
            home=tmp / "home",
            redis_url=self.url,
            models_dir=model_home,
            concurrency=1,
            store_url=f"s3://{BUCKET}/bgq",
            s3_endpoint_url=self.endpoint,
        )
        self.names = {host: f"{host.ns}" for host in (self.w1, self.w2)}

    def env(self, name: str) -> dict[str, str]:
        return {**worker_env(self.settings, self.tmp / name), **AWS_ENV}

    def start_servers(self) -> None:
        self.redis.popen(
            [redis_server_binary(), "--bind", self.redis.address, "--port", str(REDIS_PORT),
             "--save", "", "--appendonly", "no", "--protected-mode", "no",
             "--dir", str(self.tmp)],
            dict(os.environ), self.tmp / "redis.log",
        )  # fmt: skip
        self.s3.popen(
            [sys.executable, "-m", "moto.server", "-H", self.s3.address, "-p", str(S3_PORT)],
            {**os.environ, **AWS_ENV},
            self.tmp / "s3.log",
        )
        poll(lambda: self.prod.call(answers, self.redis.address, REDIS_PORT), 60, "Redis")
        poll(lambda: self.prod.call(s3_answers, self.endpoint), 60, "the S3 server")
        self.prod.call(lambda: s3_client(self.endpoint).create_bucket(Bucket=BUCKET))

    def start_workers(self) -> None:
        for host in (self.w1, self.w2):
            host.popen(worker_cmd(host.ns), self.env(host.ns), self.tmp / f"{host.ns}.log")
        want = set(self.names.values())
        poll(lambda: want <= set(self.prod.call(pings, self.settings)), 180, "both workers")

    def client_call(self, fn: Any, *args: object) -> Any:
        """`fn(client, *args)` with a Redis client on the producer's host."""

        def run() -> Any:
            with redis.Redis.from_url(self.url, socket_timeout=10) as client:
                return fn(client, *args)

        return self.prod.call(run)

    def snapshot(self) -> dict[str, str]:
        return self.prod.call(s3_objects, self.endpoint)

    def settled(self) -> bool:
        """w2 answers, runs nothing, and no message is held unacknowledged."""
        name = self.names[self.w2]
        if name not in self.prod.call(pings, self.settings):
            return False
        active = self.prod.call(active_on, self.settings, name)
        return active == [] and self.client_call(lambda c: c.hlen(UNACKED)) == 0


def partition(tmp: Path, model_home: Path, images: int = 16, cut_for: float = 300) -> Partition:
    """Cut w2's link once it has started a job, for `cut_for` s; then restore it and wait.
    Every process and namespace is gone when it returns, whatever happened."""
    net = Network()
    try:
        result = cut_and_restore(Hosts(net, tmp, model_home), images, cut_for)
    finally:
        net.close()
    result.leftovers = net.leftovers()
    return result


def cut_and_restore(hosts: Hosts, images: int, cut_for: float) -> Partition:
    tmp = hosts.tmp
    hosts.start_servers()
    hosts.start_workers()
    src, out = tmp / "src", tmp / "out"
    small_catalog(src, images, (480, 360))
    ingest = hosts.prod.popen(ingest_cmd(src, out), hosts.env("prod"), tmp / "ingest.log")
    w2 = hosts.names[hosts.w2]
    poll(lambda: hosts.client_call(started_on, w2), 120, "w2 to start a job")
    hosts.w2.cut()
    lost_at = time.monotonic()
    result = Partition(watch(ingest, out, images, lost_at), out)
    result.before = hosts.snapshot()
    time.sleep(max(0.0, lost_at + cut_for - time.monotonic()))  # the cut lasts cut_for s
    hosts.w2.restore()
    restored_at = time.monotonic()
    try:
        poll(hosts.settled, SETTLE, "w2 to reconnect and settle")
        result.reconnected = time.monotonic() - restored_at
    except AssertionError:
        pass  # reported: reconnected stays None
    result.after = hosts.snapshot()
    result.stats = hosts.client_call(stats_of)
    result.failed = hosts.client_call(failed_tasks)
    return result


def answers(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=1).close()
    except OSError:
        return False
    return True


def s3_answers(endpoint: str) -> bool:
    try:
        return httpx.get(endpoint + "/moto-api/", timeout=2).status_code < 500
    except httpx.TransportError:
        return False


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


def s3_objects(endpoint: str) -> dict[str, str]:
    """Every object of the bucket: key -> ETag (the MD5 of its bytes)."""
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return {obj["Key"]: obj["ETag"] for page in pages for obj in page.get("Contents", ())}


def celery_app(settings: Settings) -> Any:
    from celery import Celery

    import celeryconfig

    app = Celery("bgq-partition", set_as_current=False)
    app.conf.update(celeryconfig.build(settings))
    return app


def pings(settings: Settings) -> list[str]:
    """Node names (before @host) of the workers that answer a ping within a second."""
    app = celery_app(settings)
    with app.connection_for_write() as conn:
        replies = app.control.ping(timeout=1.0, connection=conn) or []
    return [name.split("@")[0] for reply in replies for name in reply]


def active_on(settings: Settings, name: str) -> list[Any] | None:
    """The tasks worker `name` runs now (None: it did not answer)."""
    app = celery_app(settings)
    with app.connection_for_write() as conn:
        replies = app.control.inspect(timeout=2.0, connection=conn).active() or {}
    for node, tasks in replies.items():
        if node.split("@")[0] == name:
            return list(tasks)
    return None
