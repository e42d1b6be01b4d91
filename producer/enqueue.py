"""Enqueueing a job: the guard that makes identical submits enqueue once, the message in its
lane, and the promotion of a waiting bulk job that an interactive submit asks for.

Each function is one try of a Redis step; the Producer retries them through an outage.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import redis
from kombu import Queue

from bgq import contract, defaults, lanes
from bgq.contract import BULK, INTERACTIVE, Counter, TaskArgs

if TYPE_CHECKING:
    from celery import Celery

# KEYS: guard, Celery's state of the task; ARGV: TTL, this enqueue's token. Takes the guard;
# if won, forgets the old state. A retried enqueue whose first try took it wins again, with
# a fresh TTL.
TAKE_GUARD = """
if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'EX', ARGV[1]) then
  redis.call('DEL', KEYS[2])
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[2] then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

# KEYS: guard; ARGV: this enqueue's token. The task could not be sent: release the guard if
# this enqueue still holds it (one that expired meanwhile may be another producer's now).
DROP_GUARD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: guard; ARGV: TTL, this enqueue's token. Once the task is published, the guard this
# enqueue took lives until the job ends (or the TTL); one already released stays released.
HOLD_GUARD = """
if redis.call('GET', KEYS[1]) == ARGV[2] then
  return redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return 0
"""


# KEYS: guard; ARGV: TTL, the promoter's token. A promotion's claim: a guard a bulk enqueue
# holds becomes `promoting:<token>|<the bulk enqueue's token>`, so no other submitter promotes
# the job too (one interactive copy, not one per submitter). Returns the bulk enqueue's token,
# again to a retry of the same claim; nil if there is nothing to promote.
CLAIM = """
local holder = redis.call('GET', KEYS[1])
if not holder then return false end
local mine = 'promoting:' .. ARGV[2] .. '|'
if string.sub(holder, 1, #mine) == mine then return string.sub(holder, #mine + 1) end
if string.sub(holder, 1, 5) ~= 'bulk:' then return false end
redis.call('SET', KEYS[1], mine .. holder, 'EX', ARGV[1])
return holder
"""

# KEYS: guard, promoted mark; ARGV: TTL, the promoter's token. The interactive copy is sent:
# the guard becomes the copy's, and the mark names the promoted bulk enqueue (DISPATCH in
# bgq/lanes.py drops its message). A claim that expired meanwhile changes nothing: a waiter
# may have enqueued the job again, and the bulk message then simply runs too.
CONFIRM = """
local holder = redis.call('GET', KEYS[1])
local mine = 'promoting:' .. ARGV[2] .. '|'
if not holder or string.sub(holder, 1, #mine) ~= mine then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[1])
redis.call('SET', KEYS[2], string.sub(holder, #mine + 1), 'EX', ARGV[1])
return 1
"""


def publish(
    app: Celery, args: TaskArgs, token: str, lane: str, run: str, miss: bool, hits: int
) -> str | None:
    """One try of an enqueue: take the guard and count; if won, send the task (None), else
    the lane of the enqueue that holds the guard.

    The guard is taken for GUARD_PUBLISH_TTL only: a producer killed before its task is
    sent leaves a guard that soon expires, so a waiter for the job enqueues it again.
    """
    guard = contract.guard_key(args.key)
    client = app.backend.client
    with client.pipeline(transaction=False) as pipe:
        # Guard and forgetting an old run's state in one step, so no other submitter
        # can be answered by an old failure once this run holds the guard.
        state = app.backend.get_key_for_task(args.key)
        pipe.eval(TAKE_GUARD, 2, guard, state, defaults.GUARD_PUBLISH_TTL, token)
        pipe.get(guard)
        for sha in args.inputs:  # prune keeps the image and its bg_image while the job needs them
            pipe.sadd(contract.input_refs_key(sha), args.key)
            pipe.expire(contract.input_refs_key(sha), 2 * defaults.GUARD_TTL)
        pipe.hincrby(contract.STATS_KEY, Counter.CACHE_MISSES, int(miss))
        pipe.hincrby(contract.STATS_KEY, Counter.CACHE_HITS, hits)
        won, holder = pipe.execute()[:2]
    if not won:
        return lanes.holder_lane(holder) or "unknown"
    try:
        send(app, args, lane, run, token)
    except BaseException:
        with contextlib.suppress(redis.RedisError):
            client.eval(DROP_GUARD, 1, guard, token)
        raise
    return None


def send(app: Celery, args: TaskArgs, lane: str, run: str, token: str) -> None:
    """Publish the task to its lane: its model's interactive queue, or its bulk run's list.

    The headers carry the model (bgq/lanes.py lets a bulk job into its model's bulk queue by
    it), the lane, run and time for the workers' wait histograms and the exporter. Queues are
    never declared (no binding keys left behind; a producer need not know which models the
    workers serve): kombu pushes the message onto the list its routing key names.
    """
    name = contract.image_queue(INTERACTIVE, args.model)
    queue = Queue(name if lane == INTERACTIVE else contract.run_queue(run))
    headers = {
        contract.MODEL_HEADER: args.model,
        contract.LANE_HEADER: lane,
        contract.RUN_HEADER: run,
        contract.ENQUEUED_HEADER: round(time.time(), 3),
        contract.GUARD_HEADER: token,
    }
    app.send_task(
        contract.TASK_NAME,
        kwargs=args.to_kwargs(),
        task_id=args.key,
        queue=queue,
        headers=headers,
        declare=[],
    )


def hold(app: Celery, args: TaskArgs, token: str, lane: str, run: str) -> None:
    """The task is sent: its guard lives until the job ends (GUARD_TTL); count the enqueue;
    a bulk job's run joins the schedule, and waiting bulk jobs are let in."""
    client = app.backend.client
    with client.pipeline(transaction=False) as pipe:
        pipe.eval(HOLD_GUARD, 1, contract.guard_key(args.key), defaults.GUARD_TTL, token)
        pipe.hincrby(contract.STATS_KEY, Counter.ENQUEUED, 1)
        if lane == BULK:
            lanes.admit(pipe, run)
        pipe.execute()


def claim(app: Celery, args: TaskArgs, token: str) -> str | None:
    """Step 1 of a promotion: take over the guard a bulk enqueue holds (for GUARD_PUBLISH_TTL);
    that enqueue's token, or None if no bulk enqueue holds it (or another promotion does)."""
    guard = contract.guard_key(args.key)
    held = app.backend.client.eval(CLAIM, 1, guard, defaults.GUARD_PUBLISH_TTL, token)
    return held.decode() if isinstance(held, bytes) else None


def confirm(app: Celery, args: TaskArgs, token: str) -> None:
    """Step 3, once the interactive copy is sent: the guard is the copy's until the job ends,
    and the promoted bulk enqueue is marked (dropped if it still waits in its run's list)."""
    keys = (contract.guard_key(args.key), contract.promoted_key(args.key))
    app.backend.client.eval(CONFIRM, 2, *keys, defaults.GUARD_TTL, token)
