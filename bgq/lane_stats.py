"""What the lanes hold now, for `bgq exporter` and `bgq status`: per lane, the jobs waiting and
running and how long the oldest has waited; the bulk runs waiting for their share; the live
workers' pool processes per lane; and per model, its workers and the jobs in its queues.

Jobs are routed by model (contract.image_queue): a lane is every known model's queue of it
(`bgq`, `bgq@<model>`; `bgq.bulk`, `bgq.bulk@<model>`), so a lane's totals sum them. A bulk
run's list counts in the bulk lane, per run, and under one model: its tail's (its oldest
message's `bgq_model` header), read with the tail already read for the oldest wait. A run from
`bgq ingest` has one model; a run of API bulk jobs (one per key) may mix models, and then counts
whole under its oldest job's model.

Three round trips, whatever the backlog. A kombu list is pushed at its head and consumed from
its tail, so its tail (LINDEX -1) is its oldest message: one read per list gives each lane's
oldest wait, from the message's enqueue-time header. Running jobs are the messages workers hold
in kombu's `unacked` hash, counted by routing key in Redis (only the counts come back).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bgq import contract, defaults, lanes
from bgq.lanes import Node

if TYPE_CHECKING:
    import redis

# kombu's Redis transport keeps each message a worker took, until it is acked, in this hash:
# delivery tag -> JSON `[message, exchange, routing_key]`. kombu prefixes the name with the
# transport's `global_keyprefix` (and takes another name from `unacked_key`); bgq sets neither
# (bgq/connections.py; tests/test_lane_stats.py checks).
UNACKED_KEY = "unacked"

# KEYS: the unacked hash; ARGV: routing keys. How many held messages each routing key has. An
# entry ends with its routing key (`..., "bgq.bulk"]`): only its tail is matched, not decoded.
COUNT_HELD = """
local counts = {}
for i = 1, #ARGV do counts[ARGV[i]] = 0 end
for _, entry in ipairs(redis.call('HVALS', KEYS[1])) do
  local key = string.match(string.sub(entry, -200), '"([^"]*)"%]$')
  if key and counts[key] then counts[key] = counts[key] + 1 end
end
local found = {}
for i = 1, #ARGV do found[i] = counts[ARGV[i]] end
return found
"""

# Each lane's queue of each known model, as it is a routing key of the messages workers take
# from it: model -> lane -> queue.
MODELS = sorted(defaults.MODELS)
MODEL_QUEUES = {
    model: {lane: contract.image_queue(lane, model) for lane in contract.LANES} for model in MODELS
}


@dataclass(frozen=True)
class LaneStats:
    """One lane now."""

    waiting: int  # jobs not yet taken by a worker (bulk: let in, or still in their run's list)
    running: int  # jobs a worker holds: running, or taken by one that died (until requeued)
    oldest: float | None  # seconds the oldest waiting job has waited; None when none waits
    workers: int  # live worker nodes that consume the lane
    processes: int  # their pool processes


@dataclass(frozen=True)
class ModelStats:
    """One model now: its queues and the live workers that serve it."""

    waiting: dict[str, int]  # lane -> jobs waiting (bulk: let in, or in a run of the model)
    running: dict[str, int]  # lane -> jobs of the model that workers hold
    workers: int  # live worker nodes that serve the model (on any lane)
    processes: int  # their pool processes


@dataclass(frozen=True)
class Snapshot:
    """Every lane, the bulk runs waiting, the live workers, and every known model."""

    lanes: dict[str, LaneStats]
    runs: dict[str, int]  # bulk run -> jobs waiting in its list to be let in
    workers: dict[str, Node]  # worker node -> its lanes, pool processes, models
    models: dict[str, ModelStats]  # every known model (defaults.MODELS), served or not
    # queue -> messages in it: BASE_MODEL's queues, and the queues of each model with jobs or
    # workers (not a line per idle model)
    queues: dict[str, int] = field(default_factory=dict)


def header(raw: bytes | None, name: str) -> object:
    """One header of a kombu message, if it has it."""
    if raw is None:
        return None
    try:
        headers = json.loads(raw).get("headers") or {}
    except (ValueError, AttributeError):
        return None
    return headers.get(name) if isinstance(headers, dict) else None


def enqueued_at(raw: bytes | None) -> float | None:
    """The enqueue time (epoch seconds) a kombu message's headers carry, if any."""
    value = header(raw, contract.ENQUEUED_HEADER)
    return float(value) if isinstance(value, int | float) else None


def run_models(runs: dict[str, int], tails: list[bytes | None]) -> dict[str, int]:
    """The jobs waiting in run lists, by model: each run's under its tail message's model
    (no header: BASE_MODEL, as lanes.DISPATCH routes it)."""
    found: dict[str, int] = {}
    for count, tail in zip(runs.values(), tails, strict=True):
        model = header(tail, contract.MODEL_HEADER)
        model = model if isinstance(model, str) else contract.BASE_MODEL
        found[model] = found.get(model, 0) + count
    return found


def oldest_wait(tails: list[bytes | None], now: float) -> float | None:
    """How long the oldest of these lists' tail messages has waited."""
    times = [t for t in map(enqueued_at, tails) if t is not None]
    return max(0.0, now - min(times)) if times else None


def lane_stats(client: redis.Redis, now: float) -> Snapshot:
    """Read the lanes' state from Redis (`now`: epoch seconds, for the ages)."""
    queues = [queue for by_lane in MODEL_QUEUES.values() for queue in by_lane.values()]
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.llen(queue)
            pipe.lindex(queue, -1)
        pipe.lrange(lanes.RING_KEY, 0, -1)
        pipe.eval(COUNT_HELD, 1, UNACKED_KEY, *queues)
        *listed, ring, held = pipe.execute()
    depth = {queue: int(n) for queue, n in zip(queues, listed[0::2], strict=True)}
    tail = dict(zip(queues, listed[1::2], strict=True))
    running = {queue: int(n) for queue, n in zip(queues, held, strict=True)}
    runs, run_tails = run_lists([raw.decode() for raw in ring], client)
    workers = lanes.capacity(client)
    models = model_stats(depth, running, workers, run_models(runs, run_tails))
    found = {}
    for lane in contract.LANES:
        lane_queues = [by_lane[lane] for by_lane in MODEL_QUEUES.values()]
        tails = [tail[q] for q in lane_queues] + (run_tails if lane == contract.BULK else [])
        serving = [node.processes for node in workers.values() if lane in node.lanes]
        in_runs = sum(runs.values()) if lane == contract.BULK else 0
        found[lane] = LaneStats(
            waiting=sum(depth[q] for q in lane_queues) + in_runs,
            running=sum(running[q] for q in lane_queues),
            oldest=oldest_wait(tails, now),
            workers=len(serving),
            processes=sum(serving),
        )
    return Snapshot(found, runs, workers, models, shown_queues(depth, models))


def shown_queues(depth: dict[str, int], models: dict[str, ModelStats]) -> dict[str, int]:
    """The depths of BASE_MODEL's queues and of those of every model with jobs or workers."""
    shown = [
        model
        for model, stats in models.items()
        if model == contract.BASE_MODEL
        or stats.workers
        or any(stats.waiting.values())
        or any(stats.running.values())
    ]
    shown.sort(key=lambda model: model != contract.BASE_MODEL)
    return {queue: depth[queue] for model in shown for queue in MODEL_QUEUES[model].values()}


def model_stats(
    depth: dict[str, int],
    running: dict[str, int],
    workers: dict[str, Node],
    in_runs: dict[str, int] | None = None,
) -> dict[str, ModelStats]:
    """Each known model's jobs (waiting, with `in_runs`' in run lists, and held, by lane) and
    the workers serving it."""
    processes = lanes.served_models(workers)
    in_runs = in_runs or {}
    found = {}
    for model, by_lane in MODEL_QUEUES.items():
        serving = [node for node in workers.values() if node.lanes and model in node.models]
        waiting = {lane: depth[queue] for lane, queue in by_lane.items()}
        waiting[contract.BULK] += in_runs.get(model, 0)
        found[model] = ModelStats(
            waiting=waiting,
            running={lane: running[queue] for lane, queue in by_lane.items()},
            workers=len(serving),
            processes=processes.get(model, 0),
        )
    return found


def run_lists(ring: list[str], client: redis.Redis) -> tuple[dict[str, int], list[bytes | None]]:
    """The runs of the scheduler's ring with jobs waiting, how many each, and their lists'
    tails (a run leaves the ring lazily: one with an empty list is left out)."""
    with client.pipeline(transaction=False) as pipe:
        for run in ring:
            pipe.llen(contract.run_queue(run))
            pipe.lindex(contract.run_queue(run), -1)
        replies = pipe.execute()
    runs, tails = {}, []
    for run, count, tail in zip(ring, replies[0::2], replies[1::2], strict=True):
        if count:
            runs[run] = int(count)
            tails.append(tail)
    return runs, tails
