"""Routing by model (bgq/lanes.py, producer/enqueue.py), against a real Redis with no worker:
each job in its model's queue, each model's bulk queue as deep as the pool processes that serve
that model, and a message a worker took goes back to its own model's queue."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from kombu import Connection

from bgq import contract, defaults, lanes
from bgq.contract import BULK, INTERACTIVE, TaskArgs
from bgq.errors import ConfigError
from bgq.options import Options
from bgq.settings import Settings, load_settings
from producer import Producer, enqueue
from producer.ingest import Folder, Ingest
from tests.helpers import variant
from workers import handoff, lanes_step

P, N, S = "u2netp", "u2net", "silueta"  # two models with workers, one with none


@pytest.fixture
def idle(redis_url: str, tmp_path: Path) -> Iterator[tuple[Producer, redis.Redis]]:
    """A producer on the test Redis with no worker consuming; Redis flushed afterwards."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    with Producer(Settings(home=tmp_path, redis_url=redis_url)) as producer:
        yield producer, client
    client.flushdb()
    client.close()


def enqueue_job(producer: Producer, model: str, lane: str = BULK, run: str = "r") -> str:
    """Publish a job of `model` as a submit does (its guard, its message, its run's admission);
    no input is stored, since no worker runs it. Its key."""
    args = TaskArgs.build(hashlib.sha256(uuid.uuid4().bytes).hexdigest(), model, Options())
    token = lanes.guard_token(lane, uuid.uuid4().hex)
    assert enqueue.publish(producer.app, args, token, lane, run, True, 0) is None
    enqueue.hold(producer.app, args, token, lane, run)
    return args.key


def messages(client: redis.Redis, queue: str) -> list[dict[str, object]]:
    """A list's messages in the order a worker takes them (kombu pops the tail)."""
    return [json.loads(raw) for raw in reversed(client.lrange(queue, 0, -1))]


def keys(client: redis.Redis, queue: str) -> list[str]:
    return [str(message["headers"]["id"]) for message in messages(client, queue)]  # type: ignore[index]


@pytest.mark.parametrize("model", [P, N])
@pytest.mark.parametrize("lane", contract.LANES)
def test_a_job_waits_in_its_models_queue_and_carries_its_model(
    idle: tuple[Producer, redis.Redis], model: str, lane: str
) -> None:
    producer, client = idle
    key = enqueue_job(producer, model, lane)
    queue = contract.image_queue(lane, model)
    [message] = messages(client, queue)
    assert message["headers"]["id"] == key  # type: ignore[index]
    assert message["headers"][contract.MODEL_HEADER] == model  # type: ignore[index]
    assert message["properties"]["delivery_info"] == {"exchange": "", "routing_key": queue}  # type: ignore[index]
    others = {contract.image_queue(lane, m) for lane in contract.LANES for m in (P, N)} - {queue}
    assert not any(client.llen(other) for other in others)
    assert not client.keys("_kombu.binding.*")  # nothing declared by a producer


def register(client: redis.Redis, entries: dict[str, str]) -> None:
    """Capacity entries as workers write them (`<lanes>:<processes>[:<models>]`)."""
    for node, entry in entries.items():
        client.eval(lanes.REGISTER, 2, lanes.CAPACITY_KEY, lanes.SLOTS_KEY, node, entry, 60)


def let_in(client: redis.Redis, runs: dict[str, list[tuple[str, str]]]) -> dict[str, list[str]]:
    """Each run's jobs let in so far, by key, in the order a worker takes them: asserts that a
    run's jobs went in as a prefix of its own order and that the rest still wait in order."""
    taken = {q: keys(client, q) for q in (contract.image_queue(BULK, m) for m in (P, N, S))}
    for run, jobs in runs.items():
        waiting = keys(client, contract.run_queue(run))
        done = len(jobs) - len(waiting)
        assert waiting == [key for key, _ in jobs[done:]], run
        for key, model in jobs[:done]:
            assert key in taken[contract.image_queue(BULK, model)], (run, key)
        for queue in taken.values():
            mine = [key for key in queue if key in dict(jobs)]
            assert mine == [key for key, _ in jobs if key in mine], (run, "order")
    return taken


def test_each_models_bulk_queue_is_as_deep_as_its_own_pool_processes(
    idle: tuple[Producer, redis.Redis],
) -> None:
    producer, client = idle
    register(
        client,
        {
            "old@host": "b:2",  # an entry from before routing by model: it serves u2netp only
            "both@host": f"ib:3:{N},{P}",  # 3 processes serving both models
            "mine@host": f"i:9:{N}",  # no bulk lane: not counted
        },
    )
    plan = {"a": [N, N, N, N, P, P, P], "b": [P] * 6 + [S], "c": [S, S, S]}
    runs: dict[str, list[tuple[str, str]]] = {run: [] for run in plan}
    for i in range(max(map(len, plan.values()))):
        for run, models in plan.items():
            if i < len(models):
                runs[run].append((enqueue_job(producer, models[i], run=run), models[i]))
    lanes.dispatch(client)
    taken = let_in(client, runs)
    depths = {queue: len(found) for queue, found in taken.items()}
    assert depths == {
        contract.image_queue(BULK, P): 5,  # 2 + 3 processes
        contract.image_queue(BULK, N): 3,
        contract.image_queue(BULK, S): defaults.BULK_MIN_READY,  # no worker serves it
    }
    # Run a waits behind its 4th u2net job (u2net's queue is full), its u2netp jobs with it.
    assert keys(client, contract.run_queue("a"))[0] == runs["a"][3][0]
    # A worker takes a u2net job: a's next one goes in, and no other.
    client.rpop(contract.image_queue(BULK, N))
    assert lanes.dispatch(client) == 1
    assert keys(client, contract.image_queue(BULK, N))[-1] == runs["a"][3][0]
    assert keys(client, contract.run_queue("a")) == [key for key, _ in runs["a"][4:]]


def test_a_bulk_job_from_before_routing_goes_to_u2netps_bulk_queue(
    idle: tuple[Producer, redis.Redis],
) -> None:
    """A run's message with no `bgq_model` header (an older producer's) is u2netp's."""
    producer, client = idle
    register(client, {"n@host": f"b:1:{N}"})
    for model in (P, N):  # both bulk queues full: the next job waits in its run's list
        for _ in range(defaults.BULK_MIN_READY):
            enqueue_job(producer, model, run="old")
    key = enqueue_job(producer, N, run="old")
    raw = client.rpop(contract.run_queue("old"))
    assert isinstance(raw, bytes)
    message = json.loads(raw)
    del message["headers"][contract.MODEL_HEADER]
    client.rpush(contract.run_queue("old"), json.dumps(message))
    client.delete(contract.BULK_QUEUE)  # taken (by a worker from before routing, say)
    assert lanes.dispatch(client) == 0  # no u2netp worker: a pass waits for u2net's room
    client.rpop(contract.image_queue(BULK, N))  # the u2net worker takes one
    assert lanes.dispatch(client) == 1
    assert keys(client, contract.BULK_QUEUE) == [key]
    assert client.llen(contract.image_queue(BULK, N)) == defaults.BULK_MIN_READY - 1


def reads(client: redis.Redis) -> dict[str, int]:
    """How many times Redis ran each command that reads a run (scripts' calls count too)."""
    found = client.info("commandstats")
    return {cmd: found.get(f"cmdstat_{cmd}", {}).get("calls", 0) for cmd in ("lindex", "lmove")}


def test_a_pass_reads_no_run_while_every_served_models_bulk_queue_is_full(
    idle: tuple[Producer, redis.Redis],
) -> None:
    """Only u2net bulk workers, their queue full: `bgq.bulk` (u2netp's, which nobody takes
    from) has room, but a pass reads no run. With no bulk worker at all, u2netp's room counts."""
    producer, client = idle
    for i in range(defaults.BULK_MIN_READY + 5):  # no worker: u2netp's room lets them in
        enqueue_job(producer, N, run=f"r{i}")
    assert client.llen(contract.image_queue(BULK, N)) == defaults.BULK_MIN_READY
    register(client, {"n@host": f"b:1:{N}"})
    client.config_resetstat()
    assert lanes.dispatch(client) == 0
    assert reads(client) == {"lindex": 0, "lmove": 0}
    client.rpop(contract.image_queue(BULK, N))  # the worker takes one: a pass walks again
    assert lanes.dispatch(client) == 1
    assert reads(client)["lindex"] >= 1


def test_a_promotion_sends_the_copy_to_its_models_interactive_queue(
    idle: tuple[Producer, redis.Redis],
) -> None:
    """A waiting u2net bulk job asked for interactively: its copy waits in `bgq@u2net`, and the
    scheduler drops the bulk message (u2net's bulk queue full, then taken)."""
    producer, client = idle
    register(client, {"n@host": f"ib:1:{N}"})
    for i in range(defaults.BULK_MIN_READY):
        producer.submit(variant("car-1.jpg", (i, 0, 120 + i, 90)), N, lane=BULK)
    waiting = producer.submit(variant("car-1.jpg", (50, 0, 170, 90)), N, lane=BULK)
    assert lanes.waiting_runs(client) == {producer.run: 1}
    promoted = producer.submit(variant("car-1.jpg", (50, 0, 170, 90)), N)
    assert promoted.key == waiting.key
    [copy] = messages(client, contract.image_queue(INTERACTIVE, N))
    assert copy["headers"][contract.MODEL_HEADER] == N  # type: ignore[index]
    assert not client.llen(contract.QUEUE)
    client.delete(contract.image_queue(BULK, N))  # the worker took the two let in
    lanes.dispatch(client)
    assert not lanes.waiting_runs(client) and not client.llen(contract.image_queue(BULK, N))


@pytest.mark.parametrize(
    ("queues", "served_lanes", "served_models"),
    [
        (list(contract.consume_order([N, P])), list(contract.LANES), [N, P]),
        ([contract.image_queue(BULK, N), contract.WEBHOOK_QUEUE], [BULK], [N]),
        ([contract.WEBHOOK_QUEUE, contract.MAINTENANCE_QUEUE, contract.run_queue("x")], [], []),
    ],
)
def test_a_workers_entry_names_the_lanes_and_models_of_its_queues(
    queues: list[str], served_lanes: list[str], served_models: list[str]
) -> None:
    assert lanes_step.served_lanes(queues) == served_lanes
    assert lanes_step.served_models(queues) == served_models


@pytest.mark.parametrize(
    ("queue", "model", "served", "target"),
    [
        (contract.QUEUE, N, [P], contract.image_queue(INTERACTIVE, N)),  # an old producer's
        (contract.BULK_QUEUE, N, [P], contract.image_queue(BULK, N)),  # an old scheduler's
        (contract.run_queue("r"), N, [], contract.image_queue(BULK, N)),  # no image queue
        (contract.BULK_QUEUE, P, [N], None),  # its own model's queue (add_consumer): run here
        (contract.image_queue(INTERACTIVE, N), N, [N, P], None),
        ("", N, [P], None),  # taken from no queue (Task.apply)
    ],
)
def test_a_job_is_handed_on_when_taken_from_another_models_queue(
    queue: str, model: str, served: list[str], target: str | None
) -> None:
    request = SimpleNamespace(delivery_info={"routing_key": queue} if queue else None)
    assert handoff.destination(request, model, served) == target


def test_a_message_a_worker_took_goes_back_to_its_models_queue(
    idle: tuple[Producer, redis.Redis], redis_url: str
) -> None:
    """kombu's restore (a lease run out, a hand-back at shutdown, a killed pool process) puts
    a message back where its routing key says: its model's queue, never another model's."""
    producer, client = idle
    interactive = enqueue_job(producer, N, INTERACTIVE)
    bulk = enqueue_job(producer, N, BULK)  # let in: its routing key is now bgq.bulk@u2net
    queues = [contract.image_queue(lane, N) for lane in contract.LANES]
    with Connection(redis_url, transport_options={"visibility_timeout": 0}) as conn:
        channel = conn.default_channel
        held = [channel.basic_get(queue, no_ack=False) for queue in queues]
        assert [m.headers["id"] for m in held] == [interactive, bulk]
        assert not any(client.llen(queue) for queue in queues)
        channel.qos.restore_visible(num=10)
    assert [keys(client, queue) for queue in queues] == [[interactive], [bulk]]
    assert not client.llen(contract.QUEUE) and not client.llen(contract.BULK_QUEUE)


def test_a_workers_queues_are_ranked_by_lane_then_by_its_models(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every interactive queue first (in BGQ_MODELS' order), then webhooks and maintenance,
    then every bulk queue, whatever order -Q or add_consumer gave them."""
    monkeypatch.setenv("BGQ_MODELS", f"{N},{P}")
    order = lanes.LaneOrder()
    given = [*reversed(contract.consume_order([P, N])), "other"]
    order.update(given)
    assert order.consume(len(given)) == [*contract.consume_order([N, P]), "other"]
    assert contract.consume_order([P]) == contract.CONSUME_ORDER


def test_the_queue_that_delivered_goes_to_the_end_of_its_class(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kombu's rotate after each delivery: the models of one lane take turns, and a lane's
    queues never move ahead of another class's."""
    monkeypatch.setenv("BGQ_MODELS", f"{P},{N},{S}")
    order = lanes.LaneOrder()
    order.update([*contract.consume_order([P, N, S]), "other"])
    iP, iN, iS = (contract.image_queue(INTERACTIVE, m) for m in (P, N, S))
    bP, bN, bS = (contract.image_queue(BULK, m) for m in (P, N, S))
    hooks, upkeep = contract.WEBHOOK_QUEUE, contract.MAINTENANCE_QUEUE
    order.rotate(bP)
    assert order.consume(10) == [iP, iN, iS, hooks, upkeep, bN, bS, bP, "other"]
    order.rotate(iN)
    order.rotate(hooks)  # alone in its class: stays
    order.rotate("unknown")  # not consumed: nothing moves
    assert order.consume(10) == [iP, iS, iN, hooks, upkeep, bN, bS, bP, "other"]
    order.rotate(iP)
    order.rotate("other")
    assert order.consume(10) == [iS, iN, iP, hooks, upkeep, bN, bS, bP, "other"]


def test_a_two_model_consumer_takes_both_backlogs_in_turn(
    idle: tuple[Producer, redis.Redis], redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through kombu's own Redis channel (BRPOP, then rotate): with a backlog of both models in
    each lane, deliveries alternate between the models, interactive ones all before bulk."""
    monkeypatch.setenv("BGQ_MODELS", f"{P},{N}")
    producer, client = idle
    register(client, {"both@host": f"ib:9:{P},{N}"})  # room for every bulk job
    for lane in contract.LANES:
        for model in (P, N):
            for _ in range(3):
                enqueue_job(producer, model, lane)
    got: list[tuple[str, str]] = []
    with Connection(
        redis_url, transport_options={"queue_order_strategy": lanes.QUEUE_ORDER}
    ) as conn:
        channel = conn.default_channel
        for queue in contract.consume_order([P, N]):
            channel.basic_consume(queue, True, lambda m: got.append(route(m)), queue)
        for _ in range(12):
            conn.drain_events(timeout=5)
    assert got == [(lane, m) for lane in contract.LANES for _ in range(3) for m in (P, N)]


def route(message: object) -> tuple[str, str]:
    """A delivered message's (lane, model), from the queue it was taken from."""
    found = contract.queue_route(message.delivery_info["routing_key"])  # type: ignore[attr-defined]
    assert found is not None
    return found


@pytest.mark.parametrize(
    ("models", "model", "served"),
    [(None, N, [P, N]), (f"{N},{P}", P, [N, P]), (None, P, [P])],
)
def test_an_ingests_embedded_stack_serves_its_model(
    tmp_path: Path, models: str | None, model: str, served: list[str]
) -> None:
    """`bgq ingest --model` with no broker starts a stack whose worker serves that model too."""
    settings = Settings(home=tmp_path, models=models)
    ingest = Ingest(settings, Folder(tmp_path / "out"), model, Options())
    try:
        assert ingest.stack_settings().served_models == served
    finally:
        ingest.producer.close()


@pytest.mark.parametrize(
    ("value", "served", "error"),
    [
        (None, [P], None),
        (f" {N}, {P} ", [N, P], None),
        (f"{N},{N}", None, "names a model twice"),
        ("u2", None, "unknown model 'u2'"),
        (",", None, "must name at least one model"),
    ],
)
def test_bgq_models(
    monkeypatch: pytest.MonkeyPatch, value: str | None, served: list[str], error: str | None
) -> None:
    if value is not None:
        monkeypatch.setenv("BGQ_MODELS", value)
    if error is None:
        assert load_settings().served_models == served
    else:
        with pytest.raises(ConfigError, match=f"BGQ_MODELS=.*{error}"):
            load_settings()
