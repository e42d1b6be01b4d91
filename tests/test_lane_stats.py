"""Seeing the lanes: the exporter's lane metrics, `bgq status`, Flower's routing keys, and a
worker of the interactive queue alone; real Redis, real prefork workers, the real model."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import httpx
import redis

import celeryconfig
from bgq import contract
from bgq.contract import BULK, INPUTS, INTERACTIVE
from bgq.exporter import Exporter
from bgq.lane_stats import COUNT_HELD, UNACKED_KEY, LaneStats, Snapshot, enqueued_at, lane_stats
from bgq.lanes import Node
from bgq.process import free_port
from bgq.settings import Settings
from bgq.stack import LocalStack
from bgq.store import FileStore
from bgq.units import format_duration
from producer import Producer
from producer.cli.services import lane_lines, worker_lines
from tests.helpers import (
    BGQ,
    Gate,
    StandInWorker,
    answers,
    bgq,
    inspect_worker,
    settle,
    variant,
    wait_for,
)
from tests.stacks import StackFactory
from tests.test_ops import metric

# -- reading Redis ------------------------------------------------------------------------


def message(enqueued: object) -> bytes:
    """A kombu message as producers publish it, with our enqueue-time header."""
    headers = {"id": "x", "task": contract.TASK_NAME, contract.ENQUEUED_HEADER: enqueued}
    return json.dumps({"body": "e30=", "headers": headers, "properties": {}}).encode()


def test_enqueue_time_comes_from_the_header() -> None:
    assert enqueued_at(message(1700000000.25)) == 1700000000.25
    assert enqueued_at(message("soon")) is None  # not a time: ignored, not a crash
    assert enqueued_at(b"not json") is None and enqueued_at(None) is None


def test_held_messages_are_counted_by_routing_key(redis_client: redis.Redis) -> None:
    """COUNT_HELD on entries laid out as kombu writes them (`[message, exchange, key]`)."""
    scratch = "bgq:test:unacked"
    keys = ["bgq", "bgq", "bgq.bulk", "bgq.webhooks", "bgq.bulk", "bgq"]
    entries = {
        f"tag-{i}": json.dumps([json.loads(message(i)), "", key]) for i, key in enumerate(keys)
    }
    try:
        redis_client.hset(scratch, mapping=entries)
        counts = redis_client.eval(COUNT_HELD, 1, scratch, contract.QUEUE, contract.BULK_QUEUE)
        assert counts == [3, 2]
        assert redis_client.eval(COUNT_HELD, 1, "bgq:test:none", contract.QUEUE) == [0]
    finally:
        redis_client.delete(scratch)


def test_the_unacked_hash_has_kombus_plain_name(tmp_path: Path) -> None:
    """kombu would prefix `unacked` with a global_keyprefix, or rename it: bgq sets neither."""
    config = celeryconfig.build(Settings(home=tmp_path, redis_url="redis://127.0.0.1:1/0"))
    options = config["broker_transport_options"]
    assert UNACKED_KEY == "unacked"
    assert "global_keyprefix" not in options and "unacked_key" not in options


# -- bgq status's lines --------------------------------------------------------------------


def test_status_lines() -> None:
    snapshot = Snapshot(
        lanes={
            INTERACTIVE: LaneStats(waiting=0, running=2, oldest=None, workers=2, processes=6),
            BULK: LaneStats(waiting=9, running=0, oldest=200.0, workers=0, processes=0),
        },
        runs={f"run-{i}": i for i in range(1, 8)},
        workers={
            "a@h": Node([INTERACTIVE, BULK], 4, ["u2netp"]),
            "b@h": Node([INTERACTIVE], 2, ["u2netp"]),
        },
        models={},  # tests/test_served.py: the lines per model
    )
    assert lane_lines(snapshot) == [
        "interactive: 0 waiting, 2 running",
        "bulk:        9 waiting, 0 running, the oldest for 3 min 20 s "
        "(no worker consumes this lane)",
        "bulk runs:   7 waiting their turn: run-7 (7), run-6 (6), run-5 (5), run-4 (4), "
        "run-3 (3) and 2 more",
    ]
    assert worker_lines(["a@h", "b@h", "hooks@h"], snapshot) == (
        "workers:     3 online, 4 pool processes (interactive, bulk), "
        "2 pool processes (interactive)\n"
        "  a@h: 4 pool processes (interactive, bulk)\n"
        "  b@h: 2 pool processes (interactive)\n"
        "  hooks@h: no image queue"
    )
    assert [format_duration(s) for s in (4.25, 192, 7500)] == ["4.2 s", "3 min 12 s", "2 h 5 min"]


# -- the exporter and bgq status on real workers -------------------------------------------


def images(first: int, count: int) -> list[bytes]:
    return [variant("anime-girl-1.jpg", (i, i, 280 + i, 250 + i)) for i in range(first, count)]


def status_env(stack: LocalStack, env: dict[str, str]) -> dict[str, str]:
    return {**env, "BGQ_REDIS_URL": stack.url, "BGQ_HOME": str(stack.settings.home)}


def test_the_lanes_in_the_exporter_and_in_status(
    stack: LocalStack, env: dict[str, str], redis_client: redis.Redis
) -> None:
    """Both pool processes held at a gate (one job of each lane), then one interactive job and
    five bulk ones of two runs waiting: two let into bgq.bulk (as deep as the pool), three
    still in their runs' lists."""
    producer = Producer(stack.settings, run="catalog-a")
    store = producer.store
    assert isinstance(store, FileStore)
    data = images(0, 8)
    gates = [Gate(store.path(INPUTS, contract.input_digest(d))) for d in data[:2]]
    exporter = Exporter(stack.settings, "127.0.0.1", 0)
    try:
        before = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics").text
        jobs = [producer.submit(data[0])]
        gates[0].wait_for_reader()
        jobs.append(producer.submit(data[1], lane=BULK))
        gates[1].wait_for_reader()
        start = time.time()
        jobs.append(producer.submit(data[2]))
        jobs += [producer.submit(d, lane=BULK) for d in data[3:6]]
        jobs += [producer.submit(d, lane=BULK, run="catalog-b") for d in data[6:8]]
        end = time.time()

        now = time.time()  # the ages are from the headers: bounded by the submits' times
        snapshot = lane_stats(redis_client, now)
        interactive, bulk = snapshot.lanes[INTERACTIVE], snapshot.lanes[BULK]
        assert (interactive.waiting, interactive.running) == (1, 1)
        assert (bulk.waiting, bulk.running) == (5, 1)
        assert snapshot.runs == {"catalog-a": 1, "catalog-b": 2}
        assert interactive.oldest is not None and bulk.oldest is not None
        assert now - end <= bulk.oldest <= interactive.oldest <= now - start
        assert (interactive.workers, interactive.processes) == (bulk.workers, bulk.processes)
        assert (bulk.workers, bulk.processes) == (1, 2)

        text = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics").text
        expected = {"bgq_lane_waiting": (1, 5), "bgq_lane_running": (1, 1)}
        expected |= {"bgq_lane_workers": (1, 1), "bgq_lane_pool_processes": (2, 2)}
        for name, (n_interactive, n_bulk) in expected.items():
            assert metric(text, name, 'lane="interactive"') == n_interactive, name
            assert metric(text, name, 'lane="bulk"') == n_bulk, name
        assert metric(text, "bgq_bulk_runs") == 2
        assert metric(text, "bgq_queue_depth", 'queue="bgq.bulk"') == 2
        waited = metric(text, "bgq_lane_oldest_wait_seconds", 'lane="interactive"')
        assert 0 <= waited <= time.time() - start

        status = bgq("status", env=status_env(stack, env))
        assert status.returncode == 0, status.stderr
        lines = status.stdout.splitlines()
        assert "queue depth: 1 (bgq), 2 (bgq.bulk)" in lines
        assert any(
            line.startswith("interactive: 1 waiting, 1 running, the oldest for ") for line in lines
        )
        assert any(
            line.startswith("bulk:        5 waiting, 1 running, the oldest for ") for line in lines
        )
        assert "bulk runs:   2 waiting their turn: catalog-b (2), catalog-a (1)" in lines
        assert "workers:     1 online, 2 pool processes (interactive, bulk)" in lines
        assert f"  {stack.hostname}: 2 pool processes (interactive, bulk)" in lines

        released = time.time()
        for gate, held in zip(gates, data[:2], strict=True):
            gate.let_through(held)
        for job in jobs:
            job.wait(timeout=120)
            settle(redis_client, job.key)
        wait_for(
            lambda: lane_stats(redis_client, time.time()).lanes[BULK].running == 0,
            timeout=30,
            what="the last bulk message to be acked",
        )
        done = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics").text
    finally:
        exporter.stop()
        for gate in gates:
            gate.remove()
    for name in ("bgq_lane_waiting", "bgq_lane_running", "bgq_lane_oldest_wait_seconds"):
        assert metric(done, name, 'lane="interactive"') == metric(done, name, 'lane="bulk"') == 0
    assert metric(done, "bgq_bulk_runs") == 0

    def added(name: str, lane: str) -> float:
        return metric(done, name, f'lane="{lane}"') - metric(before, name, f'lane="{lane}"')

    assert added("bgq_lane_wait_seconds_count", INTERACTIVE) == 2
    assert added("bgq_lane_wait_seconds_count", BULK) == 6
    # The waiting interactive job waited at least as long as the gates held the pool.
    assert added("bgq_lane_wait_seconds_sum", INTERACTIVE) >= released - end
    infinite = 'lane="bulk",le="+Inf"'
    assert metric(done, "bgq_lane_wait_seconds_bucket", infinite) == metric(
        done, "bgq_lane_wait_seconds_count", 'lane="bulk"'
    )


# -- Flower ---------------------------------------------------------------------------------


def test_flower_shows_the_queue_each_task_came_from(stack: LocalStack, env: dict[str, str]) -> None:
    """`bgq flower` shows each task's routing key (from the producer's task-sent event): `bgq`
    for an interactive job, `bgq.bulk.<run>` for a bulk one; its tasks page has the column."""
    port = free_port()
    auth = ("ops", "s3cret")
    proc = subprocess.Popen(
        [BGQ, "flower", "--port", str(port)],
        env={**status_env(stack, env), "BGQ_FLOWER_BASIC_AUTH": ":".join(auth)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(f"{url}/healthcheck"), timeout=120, what="Flower")

        def workers() -> list[str]:
            try:  # a refresh asks the workers: slow while Flower starts on a busy machine
                reply = httpx.get(f"{url}/api/workers", params={"refresh": "1"}, auth=auth)
            except httpx.TimeoutException:
                return []
            return list(reply.json()) if reply.status_code == 200 else []

        # Once Flower lists the worker it receives events (a task sent before is not seen).
        wait_for(lambda: stack.hostname in workers(), what="the worker in Flower")
        producer = Producer(stack.settings, run="flower-run")
        interactive = producer.submit(images(20, 21)[0])
        bulk = producer.submit(images(21, 22)[0], lane=BULK)
        for job in (interactive, bulk):
            job.wait(timeout=120)

        def task(key: str) -> dict[str, object]:
            reply = httpx.get(f"{url}/api/task/info/{key}", auth=auth, timeout=30)
            return dict(reply.json()) if reply.status_code == 200 else {}

        for job in (interactive, bulk):
            wait_for(lambda job=job: task(job.key).get("state") == "SUCCESS", what="Flower")
        assert task(interactive.key)["routing_key"] == contract.QUEUE
        assert task(bulk.key)["routing_key"] == contract.run_queue("flower-run")
        page = httpx.get(f"{url}/tasks", auth=auth, timeout=30).text
        assert 'data-column="routing_key"' in page and "Routing Key" in page
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGTERM), err


# -- hard isolation: a worker of the interactive queue alone --------------------------------


def test_a_worker_of_bgq_alone_leaves_bulk_jobs_waiting(
    make_stack: StackFactory, env: dict[str, str], redis_client: redis.Redis
) -> None:
    """`-Q bgq`: an idle worker with a bulk job let into bgq.bulk before an interactive one is
    sent runs the interactive one only; a bulk worker that joins later runs the bulk one."""
    stack = make_stack(queues=[contract.QUEUE], concurrency=1)
    producer = Producer(stack.settings, run="isolated")
    bulk_data, interactive_data = images(30, 32)
    # A bulk worker's entry while the bulk job is sent (a job is refused in a lane that no live
    # worker of its model serves), gone when the interactive one is.
    with StandInWorker(stack.url, lanes=(BULK,)):
        bulk = producer.submit(bulk_data, lane=BULK)
    wait_for(lambda: redis_client.llen(contract.BULK_QUEUE) == 1, what="the bulk job let in")
    producer.submit(interactive_data).wait(timeout=120)
    assert producer.task_meta(bulk.key)["status"] == "PENDING"
    assert redis_client.llen(contract.BULK_QUEUE) == 1
    queues = inspect_worker(producer.app, stack.hostname, "active_queues")
    assert [queue["name"] for queue in queues] == [contract.QUEUE]
    snapshot = lane_stats(redis_client, time.time())
    assert (snapshot.lanes[BULK].waiting, snapshot.lanes[BULK].processes) == (1, 0)
    assert snapshot.lanes[INTERACTIVE].processes == 1
    status = bgq("status", env=status_env(stack, env))
    assert "(no worker consumes this lane)" in status.stdout, status.stdout + status.stderr
    assert "1 online, 1 pool process (interactive)" in status.stdout

    with LocalStack(stack.settings, workers=1, queues=[contract.BULK_QUEUE]):
        bulk.wait(timeout=120)  # it waited, it was not lost
