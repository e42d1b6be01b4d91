"""The lanes in Redis: bulk runs let in round-robin, sized by the workers' capacity.

An interactive job is published straight to the interactive queue (`bgq`). A bulk job is
published to its run's waiting list (`bgq.bulk.<run>`, a plain kombu message), and the
scheduler below moves waiting messages into the bulk queue (`bgq.bulk`) one run at a time,
round-robin, only while that queue is shallower than the cluster's pool processes that serve
it. So the bulk queue stays about one cluster deep, a new run's first job waits behind at most
that many, and each run in flight gets an equal share of bulk capacity. Workers consume the
interactive queue before the bulk one (celeryconfig.py), so bulk backlog never delays an
interactive job by more than the tasks already running.

The scheduler is one Lua script, so any number of callers may run it at once: the producer
after it publishes a bulk job, each worker when it starts a bulk task, and each worker's main
process every few seconds. The scripts touch keys they compute (a run's list, a promoted mark):
fine on one Redis or Sentinel, not on Redis Cluster (which bgq does not support).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, cast

from kombu.utils.scheduling import priority_cycle

from bgq import contract, defaults
from bgq.errors import ConfigError
from bgq.settings import load_settings

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    import redis

RING_KEY = f"{defaults.KEY_PREFIX}bulk:ring"  # list: runs with waiting jobs, rotated
RUNS_KEY = f"{defaults.KEY_PREFIX}bulk:runs"  # set: the same runs, to add each once
CAPACITY_KEY = f"{defaults.KEY_PREFIX}capacity"  # zset: worker node -> when its entry expires
# hash: worker node -> "<lanes>:<processes>:<models>" (an entry without models, from a release
# before routing by model, serves contract.BASE_MODEL only: those are the queues it consumes)
SLOTS_KEY = f"{defaults.KEY_PREFIX}capacity:slots"

SWEEP_KEY = f"{defaults.KEY_PREFIX}bulk:sweep"  # held by the worker sweeping for lost runs
QUEUE_ORDER = "bgq.lanes:LaneOrder"  # kombu's queue_order_strategy for bgq (bgq/connections.py)

# KEYS: runs, ring; ARGV: run. A run with waiting jobs joins the ring once (at its end);
# 1 if it was not in it.
ADMIT = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""

# KEYS: capacity, slots; ARGV: node, its entry, seconds it lasts. Expiry by Redis's clock,
# the one DISPATCH and CAPACITY read, so a worker's own clock does not matter.
REGISTER = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# KEYS: capacity, slots. The live nodes' entries, as node, entry, node, entry...
CAPACITY = """
local now = tonumber(redis.call('TIME')[1])
local found = {}
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  found[#found + 1] = node
  found[#found + 1] = redis.call('HGET', KEYS[2], node) or '-:0'
end
return found
"""

# KEYS: ring, runs, BASE_MODEL's bulk queue, capacity, slots; ARGV: a run list's prefix, the
# promoted-mark prefix, the least depth, the most steps, the guard prefix, the guard's TTL,
# BASE_MODEL. Let waiting bulk jobs in, one run at a time, each into its model's bulk queue (the
# `bgq_model` header; none: BASE_MODEL's, `bgq.bulk`; else `bgq.bulk@<model>`) while that queue
# holds fewer than the live workers' bulk pool processes serving that model (at least the least
# depth). A run whose next message's model has a full queue is skipped for this pass (the
# message stays at the tail kombu pops from, so the run keeps its order); the pass ends when
# every run in the ring was skipped, or after the most steps. While the queues of every model
# some live bulk worker serves are full, a pass reads no run at all (a catalog's steady state
# costs no more with many runs waiting); a job of a model nobody serves waits until one of them
# has room. With no live bulk worker at all, BASE_MODEL's queue counts instead (so jobs are let
# in up to the least depth for the first worker to come). A message keeps kombu's format;
# only its routing key becomes its bulk queue, so that kombu puts it back there (not in its
# run's list) if its worker dies or it is retried. A message whose enqueue was promoted to the
# interactive lane (the mark holds that enqueue's guard token, its `bgq_guard` header) is
# dropped: its interactive copy runs instead. A later bulk enqueue of the same job has another
# token, so a mark left behind never drops it. A message let in renews its enqueue's guard: a
# job may wait its turn longer than GUARD_TTL.
DISPATCH = """
local now = tonumber(redis.call('TIME')[1])
local gone = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
if #gone > 0 then
  redis.call('ZREM', KEYS[4], unpack(gone))
  redis.call('HDEL', KEYS[5], unpack(gone))
end
local slots = {}
for _, entry in ipairs(redis.call('HVALS', KEYS[5])) do
  local lanes, count, sep, models = string.match(entry, '^([^:]*):(%d+)(:?)(.*)$')
  if lanes and string.find(lanes, 'b', 1, true) then
    if sep == '' then models = ARGV[7] end  -- an entry from before routing: u2netp's
    for model in string.gmatch(models, '[^,]+') do
      slots[model] = (slots[model] or 0) + tonumber(count)
    end
  end
end
local depths = {}
local function queue_of(model)
  if model == ARGV[7] then return KEYS[3] end
  return KEYS[3] .. '@' .. model
end
local function room(model)
  if depths[model] == nil then depths[model] = redis.call('LLEN', queue_of(model)) end
  return depths[model] < math.max(tonumber(ARGV[3]), slots[model] or 0)
end
local function model_of(msg)
  local _, j = string.find(msg, '"bgq_model": "', 1, true)
  if not j then return ARGV[7] end
  return string.sub(msg, j + 1, string.find(msg, '"', j + 1, true) - 1)
end
local open = next(slots) == nil and room(ARGV[7])
for model in pairs(slots) do open = open or room(model) end
if not open then return 0 end
local rounds = redis.call('LLEN', KEYS[1])
local skipped = {}
local blocked = 0
local moved = 0
local steps = 0
while steps < tonumber(ARGV[4]) and blocked < rounds do
  steps = steps + 1
  local run = redis.call('LMOVE', KEYS[1], KEYS[1], 'LEFT', 'RIGHT')
  if not run then break end
  local msg = redis.call('LINDEX', ARGV[1] .. run, -1)
  local model = msg and model_of(msg)
  if not msg then
    redis.call('LREM', KEYS[1], 0, run)
    redis.call('SREM', KEYS[2], run)
    rounds = rounds - 1
  elseif not skipped[run] and not room(model) then
    skipped[run] = true
    blocked = blocked + 1
  end
  if msg and not skipped[run] then
    redis.call('RPOP', ARGV[1] .. run)
    local ok, decoded = pcall(cjson.decode, msg)
    local headers = ok and type(decoded) == 'table' and decoded['headers']
    local promoted = false
    if type(headers) == 'table' and type(headers['id']) == 'string' then
      local mark = redis.call('GET', ARGV[2] .. headers['id'])
      promoted = mark ~= false and mark == headers['bgq_guard']
    end
    if not promoted then
      if type(headers) == 'table' and type(headers['id']) == 'string' then
        local guard = ARGV[5] .. headers['id']
        if redis.call('GET', guard) == headers['bgq_guard'] then
          redis.call('EXPIRE', guard, ARGV[6])
        end
      end
      local queue = queue_of(model)
      local from = '"routing_key": "' .. ARGV[1] .. run .. '"'
      local i, j = string.find(msg, from, 1, true)
      if i then
        local to = '"routing_key": "' .. queue .. '"'
        msg = string.sub(msg, 1, i - 1) .. to .. string.sub(msg, j + 1)
      end
      redis.call('LPUSH', queue, msg)
      depths[model] = depths[model] + 1
      moved = moved + 1
    end
  end
end
return moved
"""


class LaneOrder(priority_cycle):
    """kombu's queue order on bgq's connections: a worker tries its queues strictly by class,
    contract.consume_order's (every model's interactive queue, webhooks, maintenance, every
    model's bulk queue; models in BGQ_MODELS' order at first), however they were added: -Q in
    any order, or `add_consumer` at run time (kombu appends a new queue at the end). Other
    queues keep their order after bgq's. Within a class the models take turns: the queue that
    delivered goes to the end of its class (`rotate`), so a worker serving two models serves
    both backlogs alternately rather than one model's to the end first."""

    def update(self, it: Any) -> None:
        models = {model: i for i, model in enumerate(_served_models())}
        self.items[:] = sorted(it, key=lambda queue: queue_rank(queue, models))

    def rotate(self, last_used: str) -> str:
        """kombu calls this after each delivery: `last_used` goes after the other queues of its
        class (its lane), never ahead of another class."""
        items = self.items
        if last_used in items:
            rank = queue_rank(last_used, {})[0]
            items.remove(last_used)
            end = max(
                (i + 1 for i, q in enumerate(items) if queue_rank(q, {})[0] <= rank), default=0
            )
            items.insert(end, last_used)
        return last_used


CLASSES = {contract.WEBHOOK_QUEUE: 1, contract.MAINTENANCE_QUEUE: 2}  # between the two lanes


def queue_rank(queue: str, models: dict[str, int]) -> tuple[int, int]:
    """Where `queue` comes in a worker's order: its class, then its model's place in `models`."""
    route = contract.queue_route(queue)
    if route is None:
        return CLASSES.get(queue, len(CLASSES) + 2), 0
    lane, model = route
    return (0 if lane == contract.INTERACTIVE else len(CLASSES) + 1), models.get(model, len(models))


def _served_models() -> list[str]:
    """This process's BGQ_MODELS (their order ranks a worker's queues of one lane)."""
    try:
        return load_settings().served_models
    except ConfigError:
        return []


def guard_token(lane: str, token: str) -> str:
    """The value of an enqueue guard: the enqueuer's lane, then its own token."""
    return f"{lane}:{token}"


def holder_lane(value: bytes | str | None) -> str | None:
    """The lane of the enqueue that holds a guard, from the guard's value."""
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else value
    lane = text.partition(":")[0]
    return lane if lane in contract.LANES else None


def dispatch_args() -> tuple[list[str], list[Any]]:
    """DISPATCH's keys and arguments."""
    keys = [RING_KEY, RUNS_KEY, contract.BULK_QUEUE, CAPACITY_KEY, SLOTS_KEY]
    argv: list[Any] = [
        contract.run_queue(""),
        contract.promoted_key(""),
        defaults.BULK_MIN_READY,
        defaults.BULK_DISPATCH_STEPS,
        contract.guard_key(""),
        defaults.GUARD_TTL,
        contract.BASE_MODEL,
    ]
    return keys, argv


def admit(pipe: Any, run: str) -> None:
    """Queue, on a pipeline: the run's list joins the ring, and waiting jobs are let in."""
    pipe.eval(ADMIT, 2, RUNS_KEY, RING_KEY, run)
    dispatch_on(pipe)


def dispatch_on(pipe: Any) -> None:
    """Queue DISPATCH on a pipeline (or run it on a client): let waiting bulk jobs in."""
    keys, argv = dispatch_args()
    pipe.eval(DISPATCH, len(keys), *keys, *argv)


def dispatch(client: redis.Redis) -> int:
    """Let waiting bulk jobs in now, each into its model's bulk queue; how many were."""
    keys, argv = dispatch_args()
    return int(client.eval(DISPATCH, len(keys), *keys, *argv))


def sweep(client: redis.Redis, now: bool = False) -> list[str]:
    """Admit the runs whose list holds jobs but which are not in the ring (a producer died
    between its publish and the admission, or a failover lost the admission); the runs found.

    One worker sweeps at a time, at most once per SWEEP_INTERVAL: a SCAN of the keyspace.
    `now`: sweep whatever the interval (a worker that starts, perhaps after a crash of the
    whole stack, finds such runs at once rather than up to a minute later).
    """
    if not client.set(SWEEP_KEY, "1", nx=not now, ex=defaults.SWEEP_INTERVAL) and not now:
        return []
    prefix = contract.run_queue("")
    runs = []
    for raw in client.scan_iter(match=f"{prefix}*", count=1000, _type="LIST"):
        run = raw.decode()[len(prefix) :]
        if contract.RUN_RE.fullmatch(run):
            runs.append(run)
    with client.pipeline(transaction=False) as pipe:
        for run in runs:
            pipe.eval(ADMIT, 2, RUNS_KEY, RING_KEY, run)
        added = pipe.execute()
    return [run for run, new in zip(runs, added, strict=True) if new]


def register_worker(
    pipe: Any, node: str, lanes: list[str], processes: int, models: list[str]
) -> None:
    """Queue on a pipeline: this worker node serves `lanes` for `models` with `processes` pool
    processes, for WORKER_ENTRY_TTL seconds (by Redis's clock) unless it says so again."""
    code = "".join(lane[0] for lane in lanes) or "-"
    entry = f"{code}:{processes}:{','.join(models)}"
    pipe.eval(REGISTER, 2, CAPACITY_KEY, SLOTS_KEY, node, entry, defaults.WORKER_ENTRY_TTL)


def beat_file(run_dir: Path, node: str) -> Path:
    """The file a worker node's main process touches at each beat, Redis or not: what
    `bgq probe alive` reads (a stale one means its loop is stuck)."""
    return run_dir / f"beat-{node}"


def unregister_worker(client: redis.Redis, node: str) -> None:
    """This worker node stops: its pool processes no longer count."""
    with client.pipeline() as pipe:
        pipe.zrem(CAPACITY_KEY, node)
        pipe.hdel(SLOTS_KEY, node)
        pipe.execute()


class Node(NamedTuple):
    """A live worker node's capacity entry."""

    lanes: list[str]
    processes: int
    models: list[str]


def parse_entry(entry: str) -> Node:
    """A capacity entry, `<lanes>:<processes>[:<models>]`, read: a models part, even an empty
    one (a webhooks-only worker), names exactly its models; none (an older release) means
    BASE_MODEL, the only queues such a worker consumes."""
    code, _, rest = entry.partition(":")
    count, has_models, models = rest.partition(":")
    lanes = [lane for lane in contract.LANES if lane[0] in code]
    served = [m for m in models.split(",") if m] if has_models else [contract.BASE_MODEL]
    return Node(lanes, int(count) if count.isdigit() else 0, served)


def capacity(client: redis.Redis) -> dict[str, Node]:
    """The live worker nodes: each one's lanes, pool processes and models."""
    flat: list[bytes] = client.eval(CAPACITY, 2, CAPACITY_KEY, SLOTS_KEY)
    return {
        node.decode(): parse_entry(entry.decode())
        for node, entry in zip(flat[0::2], flat[1::2], strict=True)
    }


def served_models(nodes: Mapping[str, Node], lane: str | None = None) -> dict[str, int]:
    """Each model some live worker serves on `lane` (None: on any lane), and its pool
    processes in all."""
    found: dict[str, int] = {}
    for node in nodes.values():
        if (lane in node.lanes) if lane is not None else bool(node.lanes):
            for model in node.models:
                found[model] = found.get(model, 0) + node.processes
    return found


def observe_wait(pipe: Any, lane: str, seconds: float) -> None:
    """Queue on a pipeline: one job of `lane` waited `seconds` from enqueue to start."""
    bound = next((b for b in contract.WAIT_BUCKETS if seconds <= b), None)
    key = contract.wait_key(lane)
    pipe.hincrby(key, f"le:{bound:g}" if bound is not None else "le:+Inf", 1)
    pipe.hincrbyfloat(key, "sum", max(0.0, seconds))
    pipe.hincrby(key, "count", 1)


def waiting_runs(client: redis.Redis) -> dict[str, int]:
    """Each bulk run with jobs waiting to be let in, and how many."""
    ring = cast("list[bytes]", client.lrange(RING_KEY, 0, -1))
    runs = [raw.decode() for raw in ring]
    with client.pipeline(transaction=False) as pipe:
        for run in runs:
            pipe.llen(contract.run_queue(run))
        counts = pipe.execute()
    return {run: int(n) for run, n in zip(runs, counts, strict=True) if n}
