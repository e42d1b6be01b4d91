"""The bulk scheduler (bgq/lanes.py) and lane publishing, against a real Redis with no worker:
the test pops the bulk queue as a worker would, so every step of the order is visible."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from bgq import contract, lanes
from bgq.contract import BULK, INTERACTIVE, TaskArgs
from bgq.errors import InvalidRequest, JobTimeout
from bgq.options import Options
from bgq.settings import Settings
from producer import Producer, enqueue
from tests.helpers import STAND_IN, StandInWorker, variant


@pytest.fixture
def idle(redis_url: str, tmp_path: Path) -> Iterator[tuple[Producer, redis.Redis]]:
    """A producer on the test Redis with no worker consuming (a stand-in entry serves the
    model, with no bulk pool process); Redis flushed afterwards."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    settings = Settings(home=tmp_path, redis_url=redis_url)
    with StandInWorker(redis_url), Producer(settings, run="mine") as producer:
        yield producer, client
    client.flushdb()
    client.close()


def image(i: int) -> bytes:
    x, y = 5 + 5 * (i % 30), 5 + 5 * (i // 30)
    return variant("car-1.jpg", (x, y, x + 100, y + 80))


def take(client: redis.Redis) -> str:
    """What a worker does: take the oldest message of the bulk queue (and, as the task
    starts, let the next one in); the job's run."""
    raw = client.rpop(contract.BULK_QUEUE)
    assert isinstance(raw, bytes), "the bulk queue is empty"
    lanes.dispatch(client)
    return str(json.loads(raw)["headers"][contract.RUN_HEADER])


def test_runs_are_let_in_round_robin(idle: tuple[Producer, redis.Redis]) -> None:
    producer, client = idle
    for i in range(5):
        producer.submit(image(i), lane=BULK, run="big")
    for i in range(2):
        producer.submit(image(10 + i), lane=BULK, run="small")
    # No worker announced itself: the bulk queue holds the least depth, the big run's first two.
    assert client.llen(contract.BULK_QUEUE) == 2
    assert lanes.waiting_runs(client) == {"big": 3, "small": 2}
    order = [take(client) for _ in range(7)]
    assert order == ["big", "big", "big", "small", "big", "small", "big"], order
    assert not client.exists(lanes.RING_KEY, lanes.RUNS_KEY, contract.run_queue("big"))


def test_the_bulk_queue_is_as_deep_as_the_live_workers_bulk_processes(
    idle: tuple[Producer, redis.Redis],
) -> None:
    producer, client = idle
    with client.pipeline() as pipe:
        lanes.register_worker(pipe, "a@host", [INTERACTIVE, BULK], 3, ["u2netp"])
        lanes.register_worker(pipe, "b@host", [BULK], 2, ["u2netp"])
        lanes.register_worker(pipe, "c@host", [INTERACTIVE], 7, ["u2netp"])  # serves no bulk
        lanes.register_worker(pipe, "d@host", [BULK], 9, ["u2netp"])
        pipe.execute()
    # d's entry was last renewed an hour ago (by Redis's clock, the only one that counts).
    client.zadd(lanes.CAPACITY_KEY, {"d@host": int(client.time()[0]) - 3600})
    for i in range(8):
        producer.submit(image(20 + i), lane=BULK)
    assert client.llen(contract.BULK_QUEUE) == 5
    live = {node for node in lanes.capacity(client) if not node.startswith(STAND_IN)}
    assert live == {"a@host", "b@host", "c@host"}
    assert not client.hexists(lanes.SLOTS_KEY, "d@host")  # the scheduler dropped its entry


def test_a_message_let_in_keeps_its_payload_but_routes_to_the_bulk_queue(
    idle: tuple[Producer, redis.Redis],
) -> None:
    producer, client = idle
    job = producer.submit(image(30), lane=BULK)
    message = json.loads(client.lindex(contract.BULK_QUEUE, -1) or b"null")
    assert message["headers"]["id"] == job.key
    assert message["properties"]["delivery_info"] == {
        "exchange": "",
        "routing_key": contract.BULK_QUEUE,
    }
    headers = message["headers"]
    assert headers[contract.LANE_HEADER] == BULK and headers[contract.RUN_HEADER] == "mine"
    assert abs(headers[contract.ENQUEUED_HEADER] - time.time()) < 60
    assert not [k for k in client.keys("_kombu.binding.*") if b"bulk" in k]  # never declared


@pytest.mark.parametrize("lane", contract.LANES)
def test_a_waiter_requeues_a_lost_job_in_its_lane(
    idle: tuple[Producer, redis.Redis], lane: str
) -> None:
    producer, client = idle
    queue = contract.QUEUE if lane == INTERACTIVE else contract.BULK_QUEUE
    job = producer.submit(image(40), lane=lane)
    assert client.llen(queue) == 1
    client.delete(queue, contract.guard_key(job.key))  # e.g. Redis lost its last writes
    with pytest.raises(JobTimeout):
        job.wait(timeout=0.3)
    assert client.llen(queue) == 1 and client.exists(contract.guard_key(job.key))


def test_a_promotion_drops_only_the_promoted_enqueue(idle: tuple[Producer, redis.Redis]) -> None:
    """An interactive submit of a waiting bulk job sends it to the interactive queue and the
    scheduler drops the bulk message; a later bulk enqueue of that job is not dropped."""
    producer, client = idle
    for i in range(2):
        producer.submit(image(50 + i), lane=BULK)  # fill the bulk queue's least depth
    waiting = producer.submit(image(52), lane=BULK)
    assert lanes.waiting_runs(client) == {"mine": 1}
    promoted = producer.submit(image(52))
    assert promoted.key == waiting.key and client.llen(contract.QUEUE) == 1
    assert [take(client) for _ in range(2)] == ["mine", "mine"]
    assert client.llen(contract.BULK_QUEUE) == 0 and not lanes.waiting_runs(client)
    # The job is lost (say); a later bulk enqueue of it is let in despite the old mark.
    client.delete(contract.guard_key(waiting.key), contract.QUEUE)
    producer.submit(image(52), lane=BULK)
    assert client.llen(contract.BULK_QUEUE) == 1


def test_a_started_job_is_not_promoted(idle: tuple[Producer, redis.Redis]) -> None:
    producer, client = idle
    for i in range(2):
        producer.submit(image(60 + i), lane=BULK)
    waiting = producer.submit(image(62), lane=BULK)
    state = producer.app.backend.get_key_for_task(waiting.key)
    client.set(state, json.dumps({"status": "STARTED", "result": None, "task_id": waiting.key}))
    producer.submit(image(62))
    assert client.llen(contract.QUEUE) == 0 and lanes.waiting_runs(client) == {"mine": 1}


@pytest.mark.parametrize(("lane", "run"), [("fast", None), (BULK, "no spaces"), (BULK, "")])
def test_bad_lanes_and_runs_are_refused(
    idle: tuple[Producer, redis.Redis], lane: str, run: str | None
) -> None:
    producer, _ = idle
    with pytest.raises(InvalidRequest, match=r"lane|run id"):
        producer.submit(image(70), lane=lane, run=run)


def test_only_one_of_two_promoters_sends_a_copy(idle: tuple[Producer, redis.Redis]) -> None:
    """Two interactive submitters (two API processes, say) of one waiting bulk job: one claims
    it and sends the copy; a retry of that claim gets the same answer; the other gets none."""
    producer, client = idle
    waiting = producer.submit(image(80), lane=BULK)
    assert waiting.args is not None
    bulk_token = client.get(contract.guard_key(waiting.key))
    first, second = "interactive:first", "interactive:second"
    assert enqueue.claim(producer.app, waiting.args, first) == bulk_token.decode()
    assert enqueue.claim(producer.app, waiting.args, first) == bulk_token.decode()  # a retry
    assert enqueue.claim(producer.app, waiting.args, second) is None
    enqueue.confirm(producer.app, waiting.args, first)
    assert client.get(contract.guard_key(waiting.key)) == first.encode()
    assert client.get(contract.promoted_key(waiting.key)) == bulk_token
    assert enqueue.claim(producer.app, waiting.args, second) is None  # interactive now


def test_concurrent_interactive_submits_promote_once(idle: tuple[Producer, redis.Redis]) -> None:
    producer, client = idle
    for i in range(2):
        producer.submit(image(81 + i), lane=BULK)  # fill the bulk queue's least depth
    producer.submit(image(83), lane=BULK)
    with Producer(producer.settings) as other:
        submits = [threading.Thread(target=p.submit, args=(image(83),)) for p in (producer, other)]
        for thread in submits:
            thread.start()
        for thread in submits:
            thread.join()
    assert client.llen(contract.QUEUE) == 1


def test_a_sweep_admits_a_run_whose_admission_was_lost(
    idle: tuple[Producer, redis.Redis],
) -> None:
    """A producer that died between its publish and the admission left a message in a run's
    list that is not in the ring: nothing lets it in until a worker's sweep finds it."""
    producer, client = idle
    for i in range(2):
        producer.submit(image(90 + i), lane=BULK)
    data = image(92)
    args = TaskArgs.build(contract.input_digest(data), "u2netp", Options())
    enqueue.send(producer.app, args, BULK, "orphan", "bulk:orphan-token")
    while client.rpop(contract.BULK_QUEUE):
        lanes.dispatch(client)
    assert client.llen(contract.run_queue("orphan")) == 1  # never let in
    assert lanes.sweep(client) == ["orphan"]
    assert lanes.sweep(client) == []  # one sweep per interval, cluster-wide
    client.delete(lanes.RUNS_KEY, lanes.RING_KEY)  # lost again, say: a worker starting sweeps
    assert lanes.sweep(client, now=True) == ["orphan"]
    lanes.dispatch(client)
    assert client.llen(contract.BULK_QUEUE) == 1 and not client.exists(contract.run_queue("orphan"))


def test_the_queue_order_is_the_lanes_whatever_order_queues_come_in() -> None:
    """kombu's cycle for bgq's connections: -Q in any order, or a queue re-added at run time
    (kombu appends it), still gives interactive first and bulk last."""
    order = lanes.LaneOrder()
    order.update(["bgq.bulk", "other", "bgq.maintenance", "bgq", "bgq.webhooks"])
    assert order.consume(5) == ["bgq", "bgq.webhooks", "bgq.maintenance", "bgq.bulk", "other"]
    order.rotate("bgq")  # kombu calls it after each delivery: the order stays
    assert order.consume(2) == ["bgq", "bgq.webhooks"]
