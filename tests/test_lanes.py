"""Lanes with real workers: interactive jobs before bulk ones, bulk runs in turn, promotion.

Each test holds the stack's one pool process on a first bulk job (its input is a named pipe in
the store, tests/helpers.py's Gate), queues what it needs behind it, lets it through and reads
the order in which the jobs finished from the states Celery stored. So the order is the
workers' doing, not the timing's.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from datetime import datetime

import pytest
import redis

from bgq import contract, lanes
from bgq.contract import BULK, INTERACTIVE, Counter, TaskArgs
from bgq.options import Options
from bgq.stack import LocalStack
from bgq.store import FileStore
from producer.client import Producer
from producer.job import Job
from tests.helpers import Gate, consume, settle, stats, variant, wait_for
from tests.stacks import StackFactory

pytestmark = pytest.mark.timeout(600)
HELD = itertools.count()


def image(i: int) -> bytes:
    """A small photo no other test submits (a crop of its own)."""
    x, y = 5 + 5 * (i % 30), 5 + 5 * (i // 30)  # within car-1.jpg's 480x360
    return variant("car-1.jpg", (x, y, x + 300, y + 220))


@pytest.fixture(scope="module")
def one(make_stack: StackFactory) -> LocalStack:
    """One pool process: jobs run one at a time, so their order is the lanes' order."""
    return make_stack(concurrency=1)


@pytest.fixture
def producer(one: LocalStack) -> Iterator[Producer]:
    with Producer(one.settings, run="tests") as producer:
        yield producer


class Held:
    """The pool process held on a first bulk job until `release()`."""

    def __init__(self, producer: Producer, data: bytes, run: str) -> None:
        store = producer.store
        assert isinstance(store, FileStore)
        self.data = data
        self.gate = Gate(store.path(contract.INPUTS, contract.input_digest(data)))
        self.job = producer.submit_data(data, "u2netp", Options(), lane=BULK, run=run)
        assert not self.job.cached
        self.gate.wait_for_reader()

    def release(self) -> None:
        self.gate.let_through(self.data)

    def remove(self) -> None:
        self.gate.remove()


@pytest.fixture
def held(producer: Producer, redis_client: redis.Redis) -> Iterator[Held]:
    gate = Held(producer, image(100 + next(HELD)), "first")  # a new one each time
    try:
        yield gate
    finally:
        gate.remove()
    wait_for(lambda: not busy(redis_client), 120, "the jobs to end")


def finish_order(producer: Producer, jobs: dict[str, Job]) -> list[str]:
    """The names of the jobs by the time their worker stored their end (all must succeed)."""
    for job in jobs.values():
        job.wait(timeout=300)
        settle(producer.app.backend.client, job.key)
    done = {}
    for name, job in jobs.items():
        meta = producer.task_meta(job.key)
        assert meta["status"] == "SUCCESS", (name, meta)
        done[name] = datetime.fromisoformat(meta["date_done"])
    return sorted(done, key=done.__getitem__)


def test_interactive_jobs_run_before_every_waiting_bulk_job(
    producer: Producer, held: Held, redis_client: redis.Redis, one: LocalStack
) -> None:
    """Two interactive jobs queued behind a bulk backlog run next, one after the other: no
    round-robin between the queues, and nothing of the backlog is held inside the worker; even
    after the interactive queue's consumer was cancelled and added again at run time (kombu
    then tries it last, but for bgq's queue order)."""
    consume(producer.app, one.hostname, contract.QUEUE, on=False)
    consume(producer.app, one.hostname, contract.QUEUE, on=True)
    bulk = {f"bulk{i}": producer.submit(image(i), lane=BULK, run="big") for i in range(1, 6)}
    # The bulk queue holds two (the least depth; one pool process), the run's list the rest;
    # the worker holds only the job it runs (prefetch hides no backlog).
    assert redis_client.llen(contract.BULK_QUEUE) == 2
    assert redis_client.llen(contract.run_queue("big")) == 3
    assert redis_client.hlen("unacked") == 1
    fast = {f"interactive{i}": producer.submit(image(10 + i)) for i in range(2)}
    held.release()
    order = finish_order(producer, {"held": held.job, **bulk, **fast})
    assert order[:3] == ["held", "interactive0", "interactive1"], order
    assert order[3:] == [f"bulk{i}" for i in range(1, 6)], order  # each run's own order


def test_a_message_priority_cannot_reorder_the_lanes(
    producer: Producer, held: Held, redis_client: redis.Redis
) -> None:
    """On Redis, priority 0 is kombu's highest: a bulk job sent with 0 and an interactive one
    with 9 still run interactive first (one priority step: every message is in its queue's
    one list)."""
    sent = {}
    for name, queue, priority, i in (("bulk", contract.BULK_QUEUE, 0, 20), ("fast", "bgq", 9, 21)):
        data = image(i)
        args = TaskArgs.build(contract.input_digest(data), "u2netp", Options())
        producer.store.put_input(args.input_sha256, data)
        producer.app.send_task(
            contract.TASK_NAME, kwargs=args.to_kwargs(), task_id=args.key, queue=queue,
            priority=priority,
        )  # fmt: skip
        sent[name] = Job(args.key, False, producer.store, producer, args=args)
    assert not [key for key in redis_client.keys("bgq*") if b"\x06\x16" in key]
    held.release()
    order = finish_order(producer, {"held": held.job, **sent})
    assert order == ["held", "fast", "bulk"], order


def test_bulk_runs_take_turns(producer: Producer, held: Held) -> None:
    """A small run started behind a big one is let in turn by turn, not after the big one."""
    big = {f"big{i}": producer.submit(image(30 + i), lane=BULK, run="big") for i in range(8)}
    small = {f"small{i}": producer.submit(image(40 + i), lane=BULK, run="small") for i in range(3)}
    held.release()
    order = finish_order(producer, {"held": held.job, **big, **small})
    # Two of the big run were let in before the small one came; from then on the runs alternate.
    assert order.index("small2") < order.index("big5"), order
    assert [n for n in order if n.startswith("big")] == [f"big{i}" for i in range(8)]


def test_an_interactive_submit_promotes_a_waiting_bulk_job(
    producer: Producer, held: Held, redis_client: redis.Redis
) -> None:
    """The same image asked for interactively while its bulk job waits: it runs next, once,
    and the bulk message is dropped when the scheduler reaches it."""
    ahead = {f"bulk{i}": producer.submit(image(50 + i), lane=BULK, run="big") for i in range(4)}
    waiting = producer.submit(image(60), lane=BULK, run="big")
    assert redis_client.llen(contract.run_queue("big")) >= 1
    before = stats(redis_client)
    promoted = producer.submit(image(60))
    assert promoted.key == waiting.key and not promoted.cached
    assert bytes(redis_client.get(contract.guard_key(waiting.key)) or b"").startswith(b"inter")
    held.release()
    order = finish_order(producer, {"held": held.job, **ahead, "promoted": promoted})
    assert order[:2] == ["held", "promoted"], order
    wait_for(lambda: not busy(redis_client), 120, "every bulk job to end")
    after = stats(redis_client)
    assert after.get(Counter.SKIPPED, 0) == before.get(Counter.SKIPPED, 0)  # never ran twice


def test_a_bulk_job_whose_pool_process_dies_comes_back_from_the_bulk_queue(
    producer: Producer, held: Held, redis_client: redis.Redis, one: LocalStack
) -> None:
    """kombu puts a message back where its routing key says: for a bulk job let in, that is
    the bulk queue (the scheduler rewrote it), never its run's list, which nobody may read
    again. The pool process holding it is killed; a new one takes it from there."""
    (entry,) = redis_client.hvals("unacked")  # type: ignore[misc]
    assert json.loads(entry)[1:] == ["", contract.BULK_QUEUE]  # exchange, routing key
    holder = held.gate.reader(one.worker.pid)
    holder.kill()
    holder.wait(timeout=60)  # gone, and its end of the pipe with it
    held.gate.close()  # the next reader is the redelivery's
    held.gate.wait_for_reader()
    assert not redis_client.exists(contract.run_queue("first"))
    held.release()
    held.job.wait(timeout=120)
    assert producer.task_meta(held.job.key)["status"] == "SUCCESS"


def busy(client: redis.Redis) -> bool:
    """Whether a bulk job still waits or a worker holds a job."""
    return bool(client.keys(f"{contract.BULK_QUEUE}*") or client.hlen("unacked"))


def waits(client: redis.Redis) -> dict[str, int]:
    """How many starts each lane's wait histogram has counted."""
    return {
        lane: int(client.hget(contract.wait_key(lane), "count") or 0) for lane in contract.LANES
    }


def test_the_wait_histograms_count_each_lane(producer: Producer, redis_client: redis.Redis) -> None:
    before = waits(redis_client)
    jobs = [producer.submit(image(70), lane=BULK), producer.submit(image(71))]
    for job in jobs:
        job.wait(timeout=120)
        settle(redis_client, job.key)
    assert waits(redis_client) == {INTERACTIVE: before[INTERACTIVE] + 1, BULK: before[BULK] + 1}
    nodes = lanes.capacity(redis_client)
    assert list(nodes.values()) == [lanes.Node([INTERACTIVE, BULK], 1, [contract.BASE_MODEL])]
